"""A local judge server never outlives the run that started it: SIGKILL the run (no cleanup code runs)
and the `transformers serve` process ends too (Linux PR_SET_PDEATHSIG, armed before the server execs)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from .helpers import save_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")]

RUN = """
import sys, time
from zephyr_fast.aif.serve import start_server
server = start_server(sys.argv[1])
print(server.process.pid, server.healthy(), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_server_ends_when_the_run_is_killed(tmp_path):
    model = save_tiny_model(str(tmp_path / "judge"))
    run = subprocess.Popen([sys.executable, "-c", RUN, model], stdout=subprocess.PIPE, text=True)
    try:
        pid, healthy = run.stdout.readline().split()
        pid = int(pid)
        assert healthy == "True" and _alive(pid)
        os.kill(run.pid, signal.SIGKILL)  # the run dies without running any exit handler
        run.wait(timeout=30)
        deadline = time.time() + 30  # the server's own shutdown on SIGTERM
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "transformers serve outlived the run that started it"
    finally:
        run.kill()
