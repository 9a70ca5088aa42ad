"""Step plan (which micro-batches form a step: token bins or exactly the recipe's examples) and LR schedules."""

import numpy as np
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from zephyr_fast.config import TrainingConfig
from zephyr_fast.data.loading import DataConfig
from zephyr_fast.data.packing import pack_sft, pair_tokens
from zephyr_fast.objectives import DPOStage, SFTStage
from zephyr_fast.training.build import build_optimizer, build_scheduler
from zephyr_fast.training.plan import (Batching, ExampleSchedule, TokenSchedule, _train_schedule, make_plan,
                                       micro_stats, total)


def _sft_examples(n, base=5, spread=300):
    return [{"index": i, "input_ids": list(range(1, base + (37 * i) % spread)),
             "loss_mask": [0, 0] + [1] * (base - 3 + (37 * i) % spread)} for i in range(n)]


def _dpo_examples(n):
    return [{"index": i, "prompt_ids": list(range(1, 3 + i % 7)), "chosen_ids": list(range(2, 4 + (5 * i) % 11)),
             "rejected_ids": list(range(3, 5 + (3 * i) % 13))} for i in range(n)]


def _token_plan(batches, *, world, accum, seed=3, epochs=2, max_steps=-1):
    sched = TokenSchedule(batches, per_step=world * accum, seed=seed)
    return make_plan(sched, world_size=world, grad_accum=accum, num_train_epochs=epochs, max_steps=max_steps)


def _example_plan(examples, *, per_device, world, accum, seed=3, epochs=1, max_steps=-1, drop_last=False):
    stage = DPOStage() if "prompt_ids" in examples[0] else SFTStage()
    data = DataConfig(dataset_mixer={"x": 1.0}, max_length=512)
    sched = ExampleSchedule(examples, [stage.size(ex, data) for ex in examples], lambda e: stage.collate(e, data),
                            per_micro=per_device, micro_per_step=world * accum, seed=seed, drop_last=drop_last)
    return make_plan(sched, world_size=world, grad_accum=accum, num_train_epochs=epochs, max_steps=max_steps)


def _ids(micros):
    return [m.batch.input_ids.tolist() for m in micros]


def test_global_step_content_depends_only_on_world_times_accumulation():
    batches = pack_sft(_sft_examples(40), 256, seed=0, num_shards=4)
    single, multi = _token_plan(batches, world=1, accum=4), _token_plan(batches, world=2, accum=2)
    assert single.total_steps == multi.total_steps == 2 * len(batches) // 4
    for step in range(single.total_steps):
        s1, s2 = single.step_micro(step), multi.step_micro(step)
        assert _ids(s1) == _ids(s2)
        assert _ids(multi.rank_micro(s2, 0) + multi.rank_micro(s2, 1)) == _ids(s2)  # ranks split the step
    spe = single.steps_per_epoch
    assert _ids(single.step_micro(0)) != _ids(single.step_micro(spe))  # reshuffled every epoch


def test_plan_errors_and_max_steps():
    batches = pack_sft(_sft_examples(8), 64, seed=0, num_shards=2)
    with pytest.raises(ValueError, match="not enough data for one optimiser step"):
        _token_plan(batches[:3], world=2, accum=2)
    with pytest.raises(ValueError, match="has 6 examples, one step needs 8"):
        _example_plan(_dpo_examples(6), per_device=2, world=2, accum=2, drop_last=True)
    small = _example_plan(_dpo_examples(6), per_device=2, world=2, accum=2)  # TRL: one smaller step
    assert small.steps_per_epoch == 1 and total(small.step_micro(0), "pairs") == 6
    assert _token_plan(batches, world=1, accum=2, max_steps=11).total_steps == 11
    assert _token_plan(batches, world=1, accum=2, epochs=0.5).total_steps == len(batches) // 4


def test_micro_stats_count_targets_tokens_and_attention():
    for b in pack_sft(_sft_examples(6, base=6, spread=7), 16, seed=0):
        s = micro_stats(b)
        assert s.targets == int((b.labels != -100).sum()) and s.tokens == b.num_tokens
        lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        assert s.attn_sq == int((lens ** 2).sum()) and s.examples == b.num_segments


def test_token_schedule_covers_every_micro_batch_once_per_epoch():
    """Packed with ``num_shards = world x accumulation``: every step gives each rank the same number
    of micro-batches, an epoch covers every micro-batch once, ``max_steps`` overrides the epochs."""
    batches = pack_sft(_sft_examples(50, base=20), 512, seed=0, num_shards=4 * 2)
    plan = _token_plan(batches, world=4, accum=2, seed=0, epochs=3)
    assert len(batches) % 8 == 0 and plan.steps_per_epoch == len(batches) // 8
    assert plan.total_steps == 3 * plan.steps_per_epoch
    assert _token_plan(batches, world=4, accum=2, epochs=3, max_steps=7).total_steps == 7
    seen = []
    for step in range(plan.steps_per_epoch):
        micros = plan.step_micro(step)
        assert {len(plan.rank_micro(micros, r)) for r in range(4)} == {2}
        seen += _ids(micros)
    assert sorted(seen) == sorted(b.input_ids.tolist() for b in batches)


@pytest.mark.parametrize("world, accum, per_device", [(1, 1, 4), (2, 2, 3), (4, 2, 1), (8, 1, 4)])
def test_example_schedule_makes_exactly_the_recipes_pairs_per_step(world, accum, per_device):
    """TRL's count: every optimiser step holds exactly per_device x accumulation x world pairs, every
    micro-batch exactly per_device; with drop_last an epoch uses each pair at most once and leaves out
    fewer than a step; the pairs of a step are balanced by tokens across its micro-batches."""
    examples = _dpo_examples(103)
    plan = _example_plan(examples, per_device=per_device, world=world, accum=accum, epochs=2, drop_last=True)
    per_step = per_device * accum * world
    assert plan.steps_per_epoch == 103 // per_step and plan.total_steps == 2 * (103 // per_step)
    for epoch in range(2):
        seen = []
        for s in range(plan.steps_per_epoch):
            micros = plan.step_micro(epoch * plan.steps_per_epoch + s)
            assert len(micros) == world * accum
            assert [m.stats.pairs for m in micros] == [per_device] * (world * accum)
            assert sum(len(plan.rank_micro(micros, r)) for r in range(world)) == world * accum
            for m in micros:
                seen += m.batch.pair_index.tolist()
                assert m.batch.num_tokens == sum(pair_tokens(examples[i], "separate") for i in m.batch.pair_index.tolist())
            sizes = [m.stats.tokens for m in micros]
            biggest = max(pair_tokens(examples[i], "separate") for m in micros for i in m.batch.pair_index.tolist())
            assert max(sizes) - min(sizes) <= biggest  # balanced: within one pair of each other
        assert len(seen) == len(set(seen)) == plan.steps_per_epoch * per_step
        assert 103 - len(seen) < per_step


@pytest.mark.parametrize("world, accum, per_device, n", [(1, 1, 4, 103), (2, 2, 3, 103), (4, 2, 1, 103),
                                                        (2, 2, 4, 18), (8, 1, 4, 5)])
def test_example_schedule_keeps_each_epochs_remainder_as_a_last_step(world, accum, per_device, n):
    """dataloader_drop_last: false (TRL's and HF's default): every pair once per epoch, full steps as the
    recipe says, then one smaller last step of the remainder split over every micro-batch (a remainder
    below the micro-batch count is topped up from the start of the epoch's order, as DistributedSampler
    pads)."""
    examples = _dpo_examples(n)
    plan = _example_plan(examples, per_device=per_device, world=world, accum=accum, epochs=2)
    per_step, micro = per_device * accum * world, world * accum
    full, rem = divmod(n, per_step)
    assert plan.steps_per_epoch == full + (rem > 0) and plan.total_steps == 2 * plan.steps_per_epoch
    for epoch in range(2):
        steps = [plan.step_micro(epoch * plan.steps_per_epoch + s) for s in range(plan.steps_per_epoch)]
        assert all(total(m, "pairs") == per_step for m in steps[:full])
        seen = [i for micros in steps for m in micros for i in m.batch.pair_index.tolist()]
        last = steps[-1]
        assert len(last) == micro and all(m.stats.pairs >= 1 for m in last)
        assert max(m.stats.pairs for m in last) - min(m.stats.pairs for m in last) <= 1
        if rem >= micro or rem == 0:
            assert sorted(seen) == list(range(n))  # each pair exactly once
        else:  # topped up: every pair, plus (micro - rem) repeats from the start of the order
            assert sorted(set(seen)) == list(range(n)) and len(seen) == n + micro - rem


def test_example_schedule_is_invariant_to_world_vs_accumulation_and_reshuffles():
    examples = _dpo_examples(43)  # 5 full steps of 8 and a last one of 3, topped up to 4
    a = _example_plan(examples, per_device=2, world=1, accum=4, epochs=2)
    b = _example_plan(examples, per_device=2, world=2, accum=2, epochs=2)
    assert a.steps_per_epoch == 6
    for step in range(a.total_steps):
        assert _ids(a.step_micro(step)) == _ids(b.step_micro(step))
    first = lambda p, e: sorted(i for m in p.step_micro(e * p.steps_per_epoch) for i in m.batch.pair_index.tolist())
    assert first(a, 0) != first(a, 1)


def test_example_schedule_sft_without_packing_takes_whole_sequences():
    examples = _sft_examples(20)
    plan = _example_plan(examples, per_device=3, world=1, accum=2)
    for m in plan.step_micro(0):
        assert m.batch.num_segments == 3 == m.stats.examples
        assert m.stats.targets == int((m.batch.labels != -100).sum())


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


# --- compact examples (zephyr_fast.data.examples): the same steps, and a plan that holds no token ids --


def _compact(examples):
    """The tokenisers' container holding exactly ``examples`` (dicts)."""
    from zephyr_fast.data.examples import DPOBuilder, SFTBuilder

    if "prompt_ids" in examples[0]:
        b = DPOBuilder()
        for ex in examples:
            b.add(ex["index"], ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"])
    else:
        b = SFTBuilder()
        for ex in examples:
            b.add(ex["index"], ex["input_ids"], np.asarray(ex["loss_mask"], dtype=np.int8))
    return b.finish()


def _schedule(examples, stage, *, per_device=3, world=2, accum=2, batch_by="examples"):
    data = DataConfig(dataset_mixer={"x": 1.0}, max_length=512, batch_by=batch_by, max_tokens_per_batch=120,
                      dpo_layout="prefix_shared")
    b = Batching(batch_by, per_device, 120, 900, world, accum, 3)
    return _train_schedule(examples, data, stage, b)


@pytest.mark.parametrize("kind, batch_by", [("sft", "examples"), ("dpo", "examples"), ("sft", "tokens"),
                                            ("dpo", "tokens")])
def test_compact_examples_give_the_same_steps_and_counts_without_building(kind, batch_by):
    examples = _sft_examples(37) if kind == "sft" else _dpo_examples(37)
    stage = SFTStage() if kind == "sft" else DPOStage()
    eager = _schedule(examples, stage, batch_by=batch_by)
    lazy = _schedule(_compact(examples), stage, batch_by=batch_by)
    assert lazy.steps_per_epoch == eager.steps_per_epoch > 1
    for epoch in range(2):
        for s in range(eager.steps_per_epoch):
            want = eager.step(epoch, s)
            assert lazy.step_stats(epoch, s) == [m.stats for m in want] == eager.step_stats(epoch, s)
            assert _ids(lazy.step(epoch, s)) == _ids(want)


def test_a_plans_examples_hold_no_token_ids_and_its_memory_does_not_grow_with_the_rows(tmp_path, monkeypatch):
    """``prepare(keep_tokens=False)`` (what ``zephyr-fast plan`` runs) gives the run's reports, packing
    and step counts; its examples keep lengths, not token ids; with 8x the rows its peak Python memory
    grows by far less than 8x (rows stream through tokenisation a chunk at a time)."""
    import tracemalloc

    from zephyr_fast.config import build_config
    from zephyr_fast.data import loading, sft
    from zephyr_fast.training.plan import prepare
    from zephyr_fast.training.run import batching, recipe_tokenizer
    from zephyr_fast.objectives import make_stage
    from tests.train.helpers import ASSETS, cut_turns, read_jsonl, recipe, write_jsonl

    monkeypatch.setattr(sft, "TOKENIZE_CHUNK", 16)
    monkeypatch.setattr(loading, "JSON_CHUNK_ROWS", 16)
    base = read_jsonl(ASSETS / "data" / "ultrachat_200k" / "sample16.jsonl")

    def setup(n):
        d = tmp_path / f"rows{n}"
        rows = [{"messages": cut_turns(r["messages"], 300)} for r in (base * (n // 16))]
        write_jsonl(str(d / "train.jsonl"), rows)
        write_jsonl(str(d / "test.jsonl"), rows[:8])
        cfg = build_config(recipe("sft", tmp_path / "out", str(d), max_seq_length=256), source="test")
        stage = make_stage(cfg)
        return cfg, stage, recipe_tokenizer(cfg), batching(cfg, stage, 1)

    def run(n, keep_tokens, measure=False):
        cfg, stage, tok, b = setup(n)
        if measure:
            tracemalloc.start()
        data = prepare(cfg.data, stage, tok, b, log=lambda *a: None, keep_tokens=keep_tokens)
        stats = [data["train"].schedule.step_stats(0, s) for s in range(data["train"].schedule.steps_per_epoch)]
        peak = tracemalloc.get_traced_memory()[1] if measure else 0
        if measure:
            tracemalloc.stop()
        return data, stats, peak

    full, full_stats, _ = run(64, True)
    bare, bare_stats, _ = run(64, False)
    assert bare_stats == full_stats and bare["train"].packing == full["train"].packing
    assert bare["train"].report == full["train"].report and bare["test"].packing == full["test"].packing
    ex = bare["train"].examples
    assert not ex.has_token_ids and ex.nbytes < 64 * len(ex) + ex.num_tokens // 8 + 64
    # 8x the rows (warm: the first prepare pays one-off imports and caches). Measured: ~1.15x here,
    # ~3.5x before the rows were streamed (every row a dict, every token a Python int)
    small, big = run(64, False, measure=True)[2], run(512, False, measure=True)[2]
    assert big < 1.5 * small
