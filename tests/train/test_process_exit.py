"""A command's process ends without the interpreter's finalisation, and loses nothing by it: its status,
every line it printed (piped, so block-buffered) and every exit handler registered after the entry point."""

import subprocess
import sys

from tests.train.helpers import REPO

from zephyr_fast.config import keys_help


def _run(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def test_status_and_later_exit_handlers_survive(tmp_path):
    marker, finalised = tmp_path / "handler-ran", tmp_path / "finalised"
    code = ("import atexit, sys\n"
            "from zephyr_fast.cli import exit_without_finalisation, run_command\n"
            "exit_without_finalisation()\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
            # a global's finaliser runs in the interpreter's teardown: the one step that is skipped
            f"class Probe:\n    def __del__(self, _open=open):\n        _open({str(finalised)!r}, 'w').write('yes')\n"
            "probe = Probe()\n"
            "print('x' * 100000)\n"  # more than one pipe buffer, still in the stdout buffer at exit
            "sys.exit(run_command(lambda argv: 3, []))\n")
    p = _run("-c", code)
    assert p.returncode == 3 and marker.read_text() == "yes" and p.stdout == "x" * 100000 + "\n"
    assert not finalised.exists()
    # control: without the call the same finaliser does run at teardown
    plain = _run("-c", code.replace("exit_without_finalisation()\n", ""))
    assert plain.returncode == 3 and finalised.read_text() == "yes"


def test_a_command_that_raises_exits_the_normal_way(tmp_path):
    code = ("from zephyr_fast.cli import exit_without_finalisation, run_command\n"
            "exit_without_finalisation()\n"
            "def boom(argv):\n    raise RuntimeError('boom')\n"
            "run_command(boom, [])\n")
    p = _run("-c", code)
    assert p.returncode == 1 and "RuntimeError: boom" in p.stderr


def test_train_script_prints_everything_and_returns_its_status(tmp_path):
    full = _run("-m", "zephyr_fast.train", "--help")
    assert full.returncode == 0 and full.stdout.rstrip().endswith(keys_help().rstrip())
    bad = _run("-m", "zephyr_fast.train", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "missing.yaml" in bad.stderr
