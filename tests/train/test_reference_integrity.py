"""Reference log-prob cache integrity (issue 12): one atomic file holding key + tensors + sha256,
real bit flips refused in one line naming the file, no stale two-file pair, model identity by
resolved hub commit / cached local file digests, and a ``ref_model_name_or_path`` cache reused by DPO."""

import builtins
import json
import os
import types

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from zephyr_fast.data import identity
from zephyr_fast.objectives import DPOStage, RefLogpsStage
from zephyr_fast.training import fingerprint as fp
from zephyr_fast.training import reference as refmod
from zephyr_fast.training.reference import (CorruptRefLogpsError, ReferenceIdentity, ReferencePass, RefLogps,
                                            StaleRefLogpsError, cache_key, cache_path, read_cache,
                                            reference_identity, write_cache)
from zephyr_fast.config import DPOConfig

SHA1, SHA2 = "1" * 40, "2" * 40


class FakeTokenizer:
    """Just what tokenizer_fingerprint reads."""

    chat_template = "{{ messages }}"
    special_tokens_map = {"eos_token": "</s>"}

    def get_vocab(self):
        return {"a": 0, "b": 1}


def examples(n):
    return [{"index": 2 * i, "prompt_ids": [1, i], "chosen_ids": [3, i], "rejected_ids": [4]} for i in range(n)]


def split_data(n):
    return types.SimpleNamespace(rows=[{"row": i} for i in range(n)], examples=examples(n))


def make_key(n=4, weights="files:abc", split="train"):
    s = split_data(n)
    return cache_key(split=split, rows=s.rows, examples=s.examples, tokenizer=FakeTokenizer(), weights=weights,
                     max_length=16, max_prompt_length=8, dtype="float32")


def make_ref(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RefLogps(torch.arange(n, dtype=torch.int64) * 2, -4000 * torch.rand(n, generator=g),
                    -4000 * torch.rand(n, generator=g), seconds=1.5, tokens=100)


def written(tmp_path, n=4, weights="files:abc"):
    key = make_key(n, weights)
    write_cache(str(tmp_path), "train", key, make_ref(n))
    return key, cache_path(str(tmp_path), "train")


def header_len(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def flip(path, positions):
    with open(path, "r+b") as f:
        for pos in positions:
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 0xFF]))


def refused_in_one_line(err, path):
    msg = str(err.value)
    assert path in msg and "\n" not in msg, msg


# ---- format -----------------------------------------------------------------------------------------

def test_roundtrip_is_one_file_with_key_and_digest(tmp_path):
    key, path = written(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["train.safetensors"]  # no key file, no temp file
    ref = read_cache(str(tmp_path), "train", key)
    expect = make_ref()
    assert ref.reused and ref.path == path and ref.tokens == 100
    assert torch.equal(ref.index, expect.index) and torch.equal(ref.rejected, expect.rejected)


def test_same_cache_same_bytes_and_no_timing_in_it(tmp_path):
    """safetensors orders the metadata by a per-map random hash: without the canonical header the same
    cache came out in different bytes from run to run. Timing is not part of the file either."""
    blobs = set()
    for i in range(12):
        d = tmp_path / str(i)
        ref = make_ref()
        ref.seconds = float(i)  # a different wall time every write
        write_cache(str(d), "train", make_key(), ref)
        blobs.add((d / "train.safetensors").read_bytes())
    assert len(blobs) == 1
    key, path = written(tmp_path / "x")
    meta = json.loads(open(path, "rb").read()[8:8 + header_len(path)])["__metadata__"]
    assert list(meta) == sorted(meta) and json.loads(meta["stats"]) == {"tokens": 100}
    assert read_cache(str(tmp_path / "x"), "train", key).tokens == 100  # still verifies and reads


def test_sixteen_flipped_bytes_in_the_rejected_logps_are_refused(tmp_path):
    n = 64
    key, path = written(tmp_path, n=n)
    size = os.path.getsize(path)
    # the last tensor region is ref_rejected_logps (sorted names): flip 16 bytes of its first four floats
    start = size - 4 * n
    flip(path, range(start, start + 16))
    with pytest.raises(CorruptRefLogpsError, match="sha256 does not match") as err:
        read_cache(str(tmp_path), "train", key)
    refused_in_one_line(err, path)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_any_single_tensor_byte_flip_is_refused(tmp_path, where):
    key, path = written(tmp_path)
    lo, hi = 8 + header_len(path), os.path.getsize(path) - 1
    flip(path, [{"first": lo, "middle": (lo + hi) // 2, "last": hi}[where]])
    with pytest.raises(CorruptRefLogpsError) as err:
        read_cache(str(tmp_path), "train", key)
    refused_in_one_line(err, path)


def test_every_header_byte_flip_is_refused(tmp_path):
    key, path = written(tmp_path)
    with open(path, "rb") as f:
        pristine = f.read()
    for pos in range(8 + header_len(path)):  # the length prefix and every byte of the JSON header
        with open(path, "wb") as f:
            f.write(pristine)
        flip(path, [pos])
        with pytest.raises(StaleRefLogpsError) as err:
            read_cache(str(tmp_path), "train", key)
        refused_in_one_line(err, path)


def test_refused_cache_is_recomputed_when_asked(tmp_path):
    key, path = written(tmp_path)
    flip(path, [os.path.getsize(path) - 1])
    notes = []
    assert read_cache(str(tmp_path), "train", key, recompute=True, log=notes.append) is None
    assert "recomputing" in notes[0] and path in notes[0]


def test_truncated_file_is_refused(tmp_path):
    key, path = written(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(CorruptRefLogpsError) as err:
        read_cache(str(tmp_path), "train", key)
    refused_in_one_line(err, path)


def test_unsorted_or_non_finite_values_are_refused_even_with_a_matching_digest(tmp_path):
    key = make_key()
    bad = make_ref()
    bad.rejected[1] = float("nan")
    write_cache(str(tmp_path), "train", key, bad)
    with pytest.raises(CorruptRefLogpsError, match="ref_rejected_logps has non-finite values"):
        read_cache(str(tmp_path), "train", key)
    shuffled = make_ref()
    shuffled.index = shuffled.index.flip(0)
    write_cache(str(tmp_path), "train", key, shuffled)
    with pytest.raises(CorruptRefLogpsError, match="index is not strictly increasing"):
        read_cache(str(tmp_path), "train", key)


def test_key_mismatch_names_the_file_and_the_component(tmp_path):
    _, path = written(tmp_path)
    with pytest.raises(StaleRefLogpsError, match=r"train.safetensors: .*model_weights changed") as err:
        read_cache(str(tmp_path), "train", make_key(weights="files:other"))
    assert not isinstance(err.value, CorruptRefLogpsError)
    refused_in_one_line(err, path)


# ---- crash safety and the old two-file format ---------------------------------------------------------

def test_old_two_file_crash_pair_is_refused(tmp_path):
    """Version 2 wrote tensors and key separately: new tensors beside an old key were reused."""
    old_key = make_key()
    save_file({"index": make_ref().index, "ref_chosen_logps": make_ref(seed=1).chosen,
               "ref_rejected_logps": make_ref(seed=1).rejected}, str(tmp_path / "train.safetensors"),
              metadata={"split": "train"})  # the "new" tensors of another model ...
    with open(tmp_path / "train.json", "w") as f:
        json.dump(old_key, f)  # ... under the old key: exactly what a crash between the renames left
    path = cache_path(str(tmp_path), "train")
    with pytest.raises(StaleRefLogpsError, match="old-format .*recompute") as err:
        read_cache(str(tmp_path), "train", old_key)
    refused_in_one_line(err, path)
    assert read_cache(str(tmp_path), "train", old_key, recompute=True, log=lambda *_: None) is None
    write_cache(str(tmp_path), "train", old_key, make_ref())  # the recompute replaces both
    assert sorted(os.listdir(tmp_path)) == ["train.safetensors"]
    assert read_cache(str(tmp_path), "train", old_key).reused


def test_crash_before_the_rename_keeps_the_old_cache_whole(tmp_path, monkeypatch):
    old_key, path = written(tmp_path)

    def crash(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(refmod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_cache(str(tmp_path), "train", make_key(weights="files:new"), make_ref(seed=3))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["train.safetensors"]  # the temp file is gone
    ref = read_cache(str(tmp_path), "train", old_key)  # old key, old tensors: still a consistent pair
    assert torch.equal(ref.chosen, make_ref().chosen)


def test_a_file_without_the_embedded_key_is_refused(tmp_path):
    save_file({"index": make_ref().index}, str(tmp_path / "train.safetensors"))
    with pytest.raises(CorruptRefLogpsError, match="not a zephyr_fast reference log-prob cache"):
        read_cache(str(tmp_path), "train", make_key())


# ---- hub identity --------------------------------------------------------------------------------

def fake_hub(tmp_path, monkeypatch, sha):
    repo = tmp_path / "hub" / "models--org--tiny"
    for s in (SHA1, SHA2):
        (repo / "snapshots" / s).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / s / "config.json").write_text(json.dumps({"sha": s}))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_is_keyed_by_the_resolved_commit(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch, SHA1)
    first = fp.weights_fingerprint("org/tiny", revision="main")
    fake_hub(tmp_path, monkeypatch, SHA2)  # main moved
    second = fp.weights_fingerprint("org/tiny", revision="main")
    assert first == f"hub:org/tiny@{SHA1}" and second == f"hub:org/tiny@{SHA2}"
    assert fp.weights_fingerprint("org/tiny", revision=SHA1) == first  # a pinned sha is its own identity


def test_moved_revision_refuses_the_cache(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch, SHA1)
    cache = tmp_path / "cache"
    write_cache(str(cache), "train", make_key(weights=fp.weights_fingerprint("org/tiny")), make_ref())
    fake_hub(tmp_path, monkeypatch, SHA2)
    with pytest.raises(StaleRefLogpsError, match="model_weights changed"):
        read_cache(str(cache), "train", make_key(weights=fp.weights_fingerprint("org/tiny")))


def test_unresolvable_hub_id_is_never_reused(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch, SHA1)
    a, b = fp.weights_fingerprint("org/absent"), fp.weights_fingerprint("org/absent")
    assert a.startswith("unresolved:hub:org/absent@main") and a != b  # equals no stored key


def test_online_resolution_uses_model_info(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    fake_hub(tmp_path, monkeypatch, SHA1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    calls = []

    def model_info(self, repo_id, revision=None, timeout=None):
        calls.append((repo_id, revision))
        return types.SimpleNamespace(sha=SHA2)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(fp, "hub_unreachable", lambda: None)  # the Hub answers (model_info stands in for it)
    assert fp.weights_fingerprint("org/tiny") == f"hub:org/tiny@{SHA2}" and calls == [("org/tiny", "main")]


# ---- local directory identity ------------------------------------------------------------------------

def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir(parents=True)
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text('{"hidden_size": 8}')
    return str(d)


def count_weight_reads(monkeypatch):
    opened = []
    real_open = builtins.open

    def counting(file, *a, **kw):
        if str(file).endswith(".safetensors"):
            opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(identity, "open", counting, raising=False)  # fingerprint reads through file_digest
    return opened


def test_local_dir_is_hashed_once_then_on_change(tmp_path, monkeypatch):
    d = model_dir(tmp_path)
    opened = count_weight_reads(monkeypatch)
    first = fp.weights_fingerprint(d)
    assert first.startswith("files:") and len(opened) == 1
    assert os.path.exists(os.path.join(d, fp.FINGERPRINT_FILE))
    assert fp.weights_fingerprint(d) == first and len(opened) == 1  # second start: no weight file read

    path = os.path.join(d, "model.safetensors")
    st = os.stat(path)
    flip(path, [st.st_size - 1])  # same size, and the mtime put back: ctime still moves
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = fp.weights_fingerprint(d)
    assert changed != first and len(opened) == 2
    flip(path, [st.st_size - 1])  # content restored: identity is content, not stat
    assert fp.weights_fingerprint(d) == first


def test_local_dir_identity_covers_the_config(tmp_path):
    d = model_dir(tmp_path)
    first = fp.weights_fingerprint(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"hidden_size": 8, "rope_theta": 1.0}')
    assert fp.weights_fingerprint(d) != first


def test_unwritable_dir_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    d = model_dir(tmp_path)
    os.mkdir(os.path.join(d, fp.FINGERPRINT_FILE))  # cannot be written whoever runs this (root too)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    opened = count_weight_reads(monkeypatch)
    first = fp.weights_fingerprint(d)
    assert fp.weights_fingerprint(d) == first and len(opened) == 1
    assert len(os.listdir(tmp_path / "xdg" / "zephyr_fast" / "fingerprints")) == 1
    assert sorted(os.listdir(d)) == [fp.FINGERPRINT_FILE, "config.json", "model.safetensors"]  # no temp left


def _rank_worker(rank, store, d, out):
    """One gloo rank: fingerprint ``d`` (rank 0 only reads it) and a failing fingerprint (no hang)."""
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    reads, real = [], identity.file_digest

    def counting(path):
        reads.append(path)
        return real(path)

    fp.file_digest = counting  # this child process only
    value = fp.weights_fingerprint(d)

    def fail():
        raise OSError("disk gone")

    try:
        fp.on_rank0(fail)
        error = ""
    except Exception as e:  # rank 0 re-raises its own error, the others a RuntimeError naming it
        error = f"{type(e).__name__}: {e}"
    tdist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"value": value, "reads": len(reads), "error": error}, f)


def test_fingerprint_is_computed_on_rank_0_and_broadcast(tmp_path):
    d = model_dir(tmp_path)
    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), d, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["value"] == r1["value"] == fp.weights_fingerprint(d)
    assert (r0["reads"], r1["reads"]) == (2, 0)  # the weights and config.json, on rank 0 only
    assert r0["error"] == "OSError: disk gone" and "rank 0 could not fingerprint" in r1["error"]


# ---- ref_model_name_or_path: written by stage ref_logps, reused by stage dpo ---------------------------

def test_ref_model_cache_is_reused_by_dpo(tmp_path):
    policy, reference = model_dir(tmp_path / "p"), model_dir(tmp_path / "r")
    with open(os.path.join(reference, "config.json"), "w") as f:
        f.write('{"hidden_size": 8, "other": true}')
    dpo = DPOConfig(ref_model_name_or_path=reference)
    m = types.SimpleNamespace(model_revision="main", model_init=None)
    made = reference_identity(RefLogpsStage("torch", dpo), m, path=reference)  # its model_path: the ref model
    used = reference_identity(DPOStage("torch", dpo), m, path=policy)
    assert used.weights == made.weights and not used.computable
    assert reference_identity(DPOStage("torch", DPOConfig()), m, path=policy).weights != made.weights  # the policy's
    assert reference_identity(DPOStage("torch", dpo), m, path=reference).computable  # the ref model is the policy

    rp = ReferencePass(cache_dir=str(tmp_path / "cache"), max_tokens=64, recompute=False,
                       lengths={"max_length": 16, "max_prompt_length": 8}, dtype="float32", seed=0, impl="torch")
    write_cache(rp.cache_dir, "train", make_key(weights=made.weights), make_ref())  # what stage ref_logps wrote
    refs = rp.run(None, {"train": split_data(4), "test": None}, FakeTokenizer(), used, dist=None,
                  log=lambda *_: None)
    assert refs["train"].reused and torch.equal(refs["train"].chosen, make_ref().chosen)


def test_dpo_never_computes_the_ref_model_cache_with_the_policy(tmp_path):
    rp = ReferencePass(cache_dir=str(tmp_path / "cache"), max_tokens=64, recompute=True,
                       lengths={"max_length": 16, "max_prompt_length": 8}, dtype="float32", seed=0, impl="torch")
    other = ReferenceIdentity("files:ref", source="/models/ref", computable=False)
    with pytest.raises(StaleRefLogpsError, match=r"no reference log-probs of ref_model_name_or_path=/models/ref.*"
                                                 r"--stage=ref_logps"):
        rp.run(None, {"train": split_data(4)}, FakeTokenizer(), other, dist=None, log=lambda *_: None)
    write_cache(rp.cache_dir, "train", make_key(weights="files:policy"), make_ref())
    with pytest.raises(StaleRefLogpsError, match="model_weights changed.*--stage=ref_logps"):
        rp.run(None, {"train": split_data(4)}, FakeTokenizer(), other, dist=None, log=lambda *_: None)
