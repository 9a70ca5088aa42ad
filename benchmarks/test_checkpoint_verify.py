"""Checkpoint verification cost (issue 12): loading a checkpoint while its manifest digests are
checked, against loading it unverified, with the shipped XXH3-128 digests and with sha256.

One plain-torch ``optimizer.pt`` of 1.125 GiB (4 fp32 tensors, the size class of one ZeRO rank's
optimiser shard of a ~1B model) in a checkpoint folder with its manifest; files are in the page cache
(the worst case for the overhead: nothing hides the hashing behind disk reads). The row to read is
``time ÷ zephyr`` of ``load only``: the fraction of the verified load that is the load itself.
Like the rest of the CPU suite: one untimed warm-up, then the median of 3 timed rounds (a load of
1.1 GiB from the page cache varies little between rounds; 9 rounds only lengthened the suite).
"""

import hashlib
import os

import pytest
import torch
import xxhash

from zephyr_fast.training import manifest as M
from zephyr_fast.training.distributed import DistInfo

from .harness import record, run_timed

DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), use_deepspeed=False)
HASHERS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "checkpoint-1"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save({f"exp_avg.{i}": torch.randn(2048, 36864, generator=g) for i in range(4)}, root / "optimizer.pt")
    (root / "trainer_state.json").write_text("{}")
    return str(root)


def _load(root):
    return torch.load(os.path.join(root, "optimizer.pt"), weights_only=True)


@pytest.mark.benchmark(group="checkpoint-verify-cpu")
@pytest.mark.parametrize("variant", ["load + verify (xxh3_128)", "load + verify (sha256)", "load only"])
def test_checkpoint_verification_cost(benchmark, checkpoint, monkeypatch, variant):
    digest = "sha256" if "sha256" in variant else "xxh3_128"
    monkeypatch.setattr(M.xxhash, "xxh3_128", HASHERS[digest])  # the chunk hasher write/verify use
    M.write_manifest(checkpoint, step=1, save_index=1, dist=DIST)

    def verified():
        with M.verifying(checkpoint, dist=DIST):
            return _load(checkpoint)

    run_timed(benchmark, _load if variant == "load only" else verified, lambda: (checkpoint,) if variant == "load only"
              else (), dev=torch.device("cpu"), rounds=3)
    record(benchmark, suite="checkpoint_verify", provider="zephyr_fast", mode="full", shape="optimizer.pt 1.125 GiB",
           dtype="float32", dev=torch.device("cpu"), variant=variant,
           ablation=None if variant == "load + verify (xxh3_128)" else True)
