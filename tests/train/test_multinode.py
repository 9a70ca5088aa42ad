"""Two nodes on one machine, each form of docs/LAUNCH.md's "Several machines" section as written: two
launchers (one rank each) meeting on 127.0.0.1 as two hosts would — torchrun with a c10d rendezvous,
accelerate with ``--num_machines 2`` and a machine rank each, and ``recipes/multinode/launch.slurm``
under stand-ins for ``srun`` (starts the job's task once per node, here) and ``scontrol``. The 2-rank
job runs 1 accumulation step of what the one-process reference runs in 2, so it must log the same
losses."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from tests.train.helpers import REPO
from tests.train.test_launch import _assert_same_run, _env, _free_port, two_steps  # noqa: F401

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


SRUN = """#!/bin/bash
# stand-in for SLURM's srun: the job step's task once per node ($SLURM_NNODES), all on this machine
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


def _accelerate(path, port, rank):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            "recipes/accelerate/deepspeed_zero3.yaml", "--num_machines", "2", "--num_processes", "2",
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no", "zephyr_fast/train.py", str(path)]


def _run_nodes(cmds, env):
    nodes = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0] * len(nodes), "\n".join(o[-3000:] for o in outs)


def _slurm(tmp_path, path, port):
    """The SLURM script's one command, with ``srun`` / ``scontrol`` / ``python`` stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[0-1]", SLURM_NNODES="2",
               SLURM_JOB_ID="4242", GPUS_PER_NODE="1", MASTER_PORT=str(port))
    return [["bash", "recipes/multinode/launch.slurm", str(path)]], env


# the SLURM script's command is torchrun's c10d form, so "slurm" covers both (CI time)
@pytest.mark.parametrize("form", ["accelerate", "slurm"])
def test_two_nodes_match_one_process(two_steps, tmp_path, form):  # noqa: F811
    r, ref = two_steps
    r = {**r, "output_dir": str(tmp_path / "out")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    port = _free_port()
    if form == "slurm":
        _run_nodes(*_slurm(tmp_path, path, port))
    else:
        _run_nodes([_accelerate(path, port, rank) for rank in range(2)], _env())
    with open(os.path.join(r["output_dir"], "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(r["output_dir"], "metrics.jsonl")) as f:
        got = [json.loads(line) for line in f if '"loss"' in line]
    assert summary["world_size"] == 2
    _assert_same_run(got, ref)
