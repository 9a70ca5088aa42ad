"""One ZeRO-3 training step on 2 CPU ranks; launched by test_zero3.py through the DeepSpeed launcher:

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port P tests/model/zero3_step.py --workdir DIR

``DIR/spec.json`` lists cases ``{"name", "layout", "pairs": [rank0, rank1], "ref_chosen",
"ref_rejected"}``, each with a model in ``DIR/<name>/`` (safetensors).  For every case each rank
computes the fused DPO loss on its pairs with the logits-free path (``forward_hidden`` through the
engine, ``lm_head_weight`` gathering the partitioned head), steps SGD, then rank 0 writes
``<name>.safetensors`` (every parameter, gathered) and each rank ``<name>.loss<rank>.json``.
"""

import argparse
import json
import os
import sys

import deepspeed
import torch
from safetensors.torch import save_file

import zephyr_kernels as zk
from zephyr_fast.data.batch import loss_inputs
from zephyr_fast.data.packing import dpo_batch
from zephyr_fast.model import forward_hidden, lm_head_weight, load_model

LR = 1.0
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "train_batch_size": 2,
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults to 1.0; the reference step is unclipped
    # threshold 0: even this tiny model's LM head is partitioned, so the gather path is exercised
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes of
    # C++ build on 2 cores); gloo alone is all this test needs.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()

    with open(os.path.join(args.workdir, "spec.json")) as f:
        cases = json.load(f)
    for case in cases:
        run_case(args.workdir, case, rank)
    torch.distributed.destroy_process_group()


def run_case(workdir, case, rank):
    name = case["name"]
    model = load_model(os.path.join(workdir, name), zero3=DS_CONFIG, attn_impl="sdpa_segments")
    head = model.get_output_embeddings().weight
    assert head.ds_tensor.numel() < head.ds_numel, "LM head should be partitioned"
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=DS_CONFIG)
    batch = dpo_batch(case["pairs"][rank], layout=case["layout"])
    ref_c, ref_r = (torch.tensor(case[k][rank]) for k in ("ref_chosen", "ref_rejected"))

    hidden = forward_hidden(engine, batch)
    rows, labels, segment_ids = loss_inputs(hidden, batch)
    with lm_head_weight(engine) as w:
        assert w.numel() == head.ds_numel, "the fused loss must see the full LM head"
        loss, _ = zk.fused_linear_dpo_loss(rows, w, labels, segment_ids, ref_c, ref_r, beta=0.1, impl="torch")
    engine.backward(loss)
    engine.step()

    with open(os.path.join(workdir, f"{name}.loss{rank}.json"), "w") as f:
        json.dump({"loss": loss.item()}, f)
    out = {}
    for pname, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            out[pname] = p.detach().clone()
    if rank == 0:
        save_file(out, os.path.join(workdir, f"{name}.safetensors"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
