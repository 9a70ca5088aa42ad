"""Step plan (which micro-batches form a step, global loss denominators) and LR schedules."""

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from zephyr_fast.config import TrainingConfig
from zephyr_fast.data.packing import pack_sft
from zephyr_fast.training.build import build_optimizer, build_scheduler
from zephyr_fast.training.plan import denominators, make_plan, micro_stats


def test_global_step_content_depends_only_on_world_times_accumulation():
    single = make_plan(12, world_size=1, grad_accum=4, seed=3, num_train_epochs=2, max_steps=-1)
    multi = make_plan(12, world_size=2, grad_accum=2, seed=3, num_train_epochs=2, max_steps=-1)
    assert single.total_steps == multi.total_steps == 6
    for epoch in (0, 1):
        o1, o2 = single.epoch_order(epoch), multi.epoch_order(epoch)
        for step in range(single.steps_per_epoch):
            s1, s2 = single.step_micro(step, o1), multi.step_micro(step, o2)
            assert s1 == s2
            ranks = multi.rank_micro(s2, 0) + multi.rank_micro(s2, 1)
            assert ranks == s2  # the two ranks split the step without overlap
    assert single.epoch_order(0) != single.epoch_order(1)  # reshuffled every epoch


def test_plan_errors_and_max_steps():
    with pytest.raises(ValueError, match="not enough data for one optimiser step"):
        make_plan(3, world_size=2, grad_accum=2, seed=0, num_train_epochs=1, max_steps=-1)
    assert make_plan(8, world_size=1, grad_accum=2, seed=0, num_train_epochs=1, max_steps=11).total_steps == 11
    assert make_plan(8, world_size=1, grad_accum=2, seed=0, num_train_epochs=0.5, max_steps=-1).total_steps == 2


def test_denominators_count_targets_of_the_whole_step():
    examples = [{"index": i, "input_ids": list(range(1, 6 + i)), "loss_mask": [0, 0] + [1] * (3 + i)}
                for i in range(6)]
    batches = list(pack_sft(examples, 16, seed=0))
    stats = [micro_stats(b) for b in batches]
    for b, s in zip(batches, stats):
        assert s.targets == int((b.labels != -100).sum()) and s.tokens == b.num_tokens
        lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        assert s.attn_sq == int((lens ** 2).sum())
    plan = make_plan(len(batches), world_size=1, grad_accum=len(batches), seed=0, num_train_epochs=1, max_steps=-1)
    assert denominators(plan, stats, 0, "targets") == [sum(s.targets for s in stats)]


def test_schedule_from_packed_data():
    """The step plan over packed data (replaces packing.shard_batches / num_training_steps): packed
    with ``num_shards = world x accumulation``, every step gives each rank the same number of
    micro-batches, an epoch covers every micro-batch once, ``max_steps`` overrides the epochs."""
    examples = [{"index": i, "input_ids": list(range(1, 20 + (37 * i) % 300)), "loss_mask": [1] * (19 + (37 * i) % 300)}
                for i in range(50)]
    batches = pack_sft(examples, 512, seed=0, num_shards=4 * 2)
    plan = make_plan(len(batches), world_size=4, grad_accum=2, seed=0, num_train_epochs=3, max_steps=-1)
    assert len(batches) % 8 == 0 and plan.steps_per_epoch == len(batches) // 8
    assert plan.total_steps == 3 * plan.steps_per_epoch
    assert make_plan(len(batches), world_size=4, grad_accum=2, seed=0, num_train_epochs=3, max_steps=7).total_steps == 7
    order = plan.epoch_order(0)
    for step in range(plan.steps_per_epoch):
        shards = [plan.rank_micro(plan.step_micro(step, order), r) for r in range(4)]
        assert {len(s) for s in shards} == {2}
    assert sorted(i for s in range(plan.steps_per_epoch) for i in plan.step_micro(s, order)) == list(range(len(batches)))


@pytest.mark.parametrize("kind, ref", [("cosine", get_cosine_schedule_with_warmup),
                                       ("linear", get_linear_schedule_with_warmup)])
def test_schedules_match_transformers(kind, ref):
    total, ratio = 37, 0.1
    t = TrainingConfig(learning_rate=1e-3, lr_scheduler_type=kind, warmup_ratio=ratio)
    p1, p2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    ours = build_scheduler(build_optimizer([p1], t), t, total)
    opt2 = torch.optim.AdamW([p2], lr=1e-3)
    theirs = ref(opt2, num_warmup_steps=4, num_training_steps=total)  # ceil(0.1 * 37) = 4
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12, abs=1e-15)
        ours.optimizer.step()
        opt2.step()
        ours.step()
        theirs.step()


def test_optimizers_and_weight_decay_groups():
    lin = torch.nn.Linear(3, 4)
    t = TrainingConfig(optim="rmsprop", weight_decay=0.1)
    opt = build_optimizer(lin.parameters(), t)
    assert isinstance(opt, torch.optim.RMSprop)
    decays = {tuple(p.shape): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {(4, 3): 0.1, (4,): 0.0}  # biases / norms are not decayed
    assert isinstance(build_optimizer(lin.parameters(), TrainingConfig(optim="adamw_torch")), torch.optim.AdamW)


def test_palm_flops_mfu_inputs_and_metric_files(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from zephyr_fast.training import metrics as M

    model = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    n_all = sum(p.numel() for p in model.parameters())
    assert M.count_matmul_params(model) == n_all - 100 * 32  # the input embedding table is a lookup
    # two packed sequences of 3 and 5 tokens: 6·N·8 + 12·L·d·(3² + 5²)
    assert M.train_flops(1000, 2, 32, 8, 34) == 6 * 1000 * 8 + 12 * 2 * 32 * 34
    assert M.detect_peak_tflops(torch.device("cpu")) is None
    log = M.MetricLogger(str(tmp_path), enabled=True, report_to=[])
    log.log(1, {"loss": torch.tensor(2.0), "rewards/margins": 0.1})
    log.log(2, {"loss": 1.5, "rewards/margins": 0.4, "eval_loss": 1.7})
    log.close()
    rows = M.read_jsonl(log.path)
    assert rows == [{"step": 1, "loss": 2.0, "rewards/margins": 0.1},
                    {"step": 2, "loss": 1.5, "rewards/margins": 0.4, "eval_loss": 1.7}]
    png = M.plot_runs({"run": log.path}, str(tmp_path / "p.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
