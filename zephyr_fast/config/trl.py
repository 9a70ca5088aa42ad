"""The rest of TRL's ``DPOConfig`` / ``SFTConfig`` (and transformers' ``TrainingArguments``): the fields
zephyr_fast has no section field for, so that a config written out from TRL loads.

* :data:`UNSET_ONLY` -- a feature zephyr_fast does not implement. Accepted at TRL's default (the feature
  off: its value, or an empty / null one), silently; any other value is refused in one line saying
  what to use instead.
* :data:`MORE_NO_EFFECT` -- keys that cannot change a result whatever their value (worker, logging,
  device plumbing): accepted, listed in the run's start notice (``recipe_keys.NO_EFFECT`` joins them).
* :data:`EQUIVALENT` -- a TRL switch whose other value zephyr_fast does not run, but whose numbers are the
  same: accepted with a notice saying so (the value zephyr_fast runs is ``recipe_keys.ALWAYS``).

``tests/recipes/test_trl_fields.py`` walks every field of the installed TRL and checks that each loads
at TRL's default.
"""

from __future__ import annotations

# key -> (the values that mean "off", what to use instead)
UNSET_ONLY = {
    "accelerator_config": ((), "the launcher sets accelerate's options (docs/LAUNCH.md)"),
    "activation_offloading": ((False,), "activation offloading is not implemented; use gradient_checkpointing"),
    "auto_find_batch_size": ((False,), "the batch is the recipe's; `zephyr-fast plan RECIPE` shows its memory"),
    "batch_eval_metrics": ((False,), "evaluation metrics are TRL's, summed over the whole split"),
    "chat_template_path": ((), "set chat_template (the template text) or tokenizer_name_or_path"),
    "completion_only_loss": ((True,), "the SFT loss is on the assistant turns: set assistant_only_loss instead"),
    "data_seed": ((), "the data order follows seed"),
    "dataset_text_field": (("text",), "raw-text (continued pretraining) data is not implemented: zephyr_fast "
                                      "trains on chat `messages` (sft) or `chosen`/`rejected` pairs (dpo)"),
    "do_predict": ((False,), "use `zephyr-fast evaluate RECIPE --split test`"),
    "enable_jit_checkpoint": ((False,), "checkpoints are written at save_steps / save_strategy"),
    "eval_delay": ((0, 0.0), "evaluation follows eval_strategy / eval_steps from the start"),
    "fp16_full_eval": ((False,), "evaluation runs in the model's dtype"),
    "fsdp": ((False,), "FSDP is not wired: ZeRO-3 (recipes/deepspeed/zero3.json) shards the same way"),
    "fsdp_config": ((), "FSDP is not wired: ZeRO-3 (recipes/deepspeed/zero3.json) shards the same way"),
    "full_determinism": ((False,), "runs are deterministic for a seed on CPU; CUDA determinism flags are not set"),
    "hub_always_push": ((False,), "uploads follow hub_strategy"),
    "ignore_data_skip": ((False,), "a resumed run continues exactly at its step (the plan depends only on "
                                   "seed and epoch)"),
    "ld_alpha": ((), "LD-DPO's length desensitisation is not implemented"),
    "liger_kernel_config": ((), "the loss is always zephyr_kernels' fused head; Liger's RMSNorm/SwiGLU/RoPE: "
                                "use_liger_ops"),
    "neftune_noise_alpha": ((), "NEFTune embedding noise is not implemented"),
    "optim_target_modules": ((), "GaLore / APOLLO optimisers are not implemented"),
    "parallelism_config": ((), "tensor / context parallelism is not implemented: ZeRO-3 data parallelism"),
    "router_aux_loss_coef": ((), "mixture-of-experts router losses are not implemented"),
    "save_on_each_node": ((False,), "rank 0 writes the output folder on storage every node sees"),
    "sync_ref_model": ((False,), "TR-DPO's reference syncing is not implemented: the reference is fixed and "
                                 "precomputed"),
    "torch_compile": ((False,), "the model is not compiled; the loss head is zephyr_kernels' fused Triton kernels"),
    "torch_compile_backend": ((), "the model is not compiled (torch_compile)"),
    "torch_compile_mode": ((), "the model is not compiled (torch_compile)"),
    "train_sampling_strategy": (("random",), "each epoch is a seeded shuffle of the train split"),
}

# keys -> why they cannot change a result (whatever the value)
MORE_NO_EFFECT = {
    "dataloader_in_order": "batches come from the seeded plan in order; there is no DataLoader",
    "dataloader_multiprocessing_context": "batches are packed in memory before training; there is no DataLoader",
    "dataloader_persistent_workers": "batches are packed in memory before training; there is no DataLoader",
    "dataloader_pin_memory": "batches are packed in memory before training; there is no DataLoader",
    "dataloader_prefetch_factor": "batches are packed in memory before training; there is no DataLoader",
    "ddp_backend": "DeepSpeed picks the backend (nccl on CUDA, gloo on CPU)",
    "ddp_broadcast_buffers": "DeepSpeed runs the ranks",
    "ddp_bucket_cap_mb": "DeepSpeed runs the ranks (its JSON sets bucket sizes)",
    "ddp_static_graph": "DeepSpeed runs the ranks",
    "debug": "transformers' debug checks do not change a result",
    "disable_tqdm": "progress bars go to stderr",
    "eval_do_concat_batches": "evaluation sums its metrics on the host step by step",
    "eval_packing": "evaluation batches are always packed; an eval average does not depend on how",
    "eval_use_gather_object": "evaluation sums its metrics on the host step by step",
    "include_for_metrics": "evaluation metrics are TRL's",
    "include_num_input_tokens_seen": "tokens are always counted (train_tokens_per_second)",
    "label_names": "the stage decides its labels",
    "length_column_name": "packing measures lengths itself",
    "local_rank": "the launcher's LOCAL_RANK is used",
    "log_level_replica": "only rank 0 logs",
    "log_on_each_node": "only rank 0 logs",
    "logging_nan_inf_filter": "a NaN / inf loss stops the run with one line instead of being filtered",
    "pad_to_multiple_of": "batches are padding-free",
    "pad_token": "packed batches never pad (generation uses the tokenizer's pad or EOS)",
    "precompute_ref_batch_size": "the reference pass's batch is ref_logps_max_tokens",
    "prediction_loss_only": "evaluation computes the loss and TRL's metrics",
    "project": "trackio's project; zephyr_fast reports to tensorboard / wandb",
    "ref_model_mixup_alpha": "used only by sync_ref_model (not implemented)",
    "ref_model_sync_steps": "used only by sync_ref_model (not implemented)",
    "restore_callback_states_from_checkpoint": "zephyr_fast has no callbacks; resume restores the whole run",
    "shuffle_dataset": "each epoch is a seeded shuffle of the packed / batched train split",
    "skip_memory_metrics": "peak memory is always logged (summary.json)",
    "torch_empty_cache_steps": "the CUDA cache is left to the allocator",
    "trackio_bucket_id": "zephyr_fast reports to tensorboard / wandb",
    "trackio_space_id": "zephyr_fast reports to tensorboard / wandb",
    "trackio_static_space_id": "zephyr_fast reports to tensorboard / wandb",
    "use_cache": "training never uses the KV cache",
}

# TRL switch -> (the value zephyr_fast runs instead, why the numbers are the same)
EQUIVALENT = {
    "padding_free": (True, "zephyr_fast always trains on padding-free packed batches; the loss is the padded "
                           "batch's"),
    "use_liger_kernel": (True, "zephyr_fast always computes the loss with its fused zephyr_kernels head; the loss "
                               "is the unfused one's"),
    "precompute_ref_log_probs": (True, "zephyr_fast always precomputes the reference log-probs once (stage "
                                       "ref_logps); they are the numbers an in-step reference forward gives"),
}

# TRL renamed keys -> zephyr_fast's
MORE_ALIASES = {
    "hub_revision": "hub_model_revision",
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}

SFT_LOSS_TYPES = ("nll", "dft")  # SFTConfig.loss_type (the DPO section's loss_type is another key)


def unset(value) -> bool:
    """What "not set" looks like in a dumped config: null, or an empty string / list / mapping."""
    return value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


def check_unset_only(key: str, value) -> None:
    """``ValueError`` unless ``value`` turns ``key``'s feature off (:data:`UNSET_ONLY`)."""
    allowed, instead = UNSET_ONLY[key]
    if unset(value) or value in allowed:
        return
    raise ValueError(f"{key}: {value!r} is not supported: {instead}")


def sft_loss_type(value) -> bool:
    """Whether ``loss_type`` holds SFTConfig's value (``nll`` / ``dft``) rather than DPO losses; ``dft``
    (Dynamic Fine-Tuning) is refused."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    if not names or any(n not in SFT_LOSS_TYPES for n in names):
        return False
    if "dft" in names:
        raise ValueError("loss_type: 'dft' (Dynamic Fine-Tuning) is not implemented: the SFT loss is nll")
    return True
