"""Start a local OpenAI-compatible judge with ``transformers serve`` (loopback only) and stop it.

    with serve_local(MODEL_DIR) as server:        # server.base_url == "http://127.0.0.1:PORT/v1"
        JudgeConfig(base_url=server.base_url, model=server.model, ...)

``transformers serve`` comes with ``pip install "transformers[serving]"`` (fastapi, uvicorn,
openai).  The model is loaded once (``FORCE_MODEL``); the server's model name is the path given.
It listens on 127.0.0.1 only; ``HF_HUB_OFFLINE=1`` is set so it never reaches the network.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

from ..training.fingerprint import local_fingerprint


class ServeError(RuntimeError):
    pass


@dataclass
class LocalServer:
    process: subprocess.Popen
    port: int
    model: str
    log_path: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @functools.cached_property
    def endpoint_id(self) -> str:
        """What a judge cache names this server by: the served model's content, not its port (a fresh one
        each run)."""
        return f"transformers-serve:{local_fingerprint(self.model)}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill``, else SIGTERM then SIGKILL after 10 s)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs the server command in place of itself after asking Linux to send it SIGTERM when its parent (this
# process) dies, even by SIGKILL: a killed `aif` / `judge` run leaves no server behind. The server has its
# own session (so a Ctrl-C of the run does not reach it before stop()), so nothing else would end it.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the parent died before the signal was armed\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _command(model_dir: str, port: int) -> list:
    exe = shutil.which("transformers")
    base = [exe] if exe else [sys.executable, "-m", "transformers.cli.transformers"]
    serve = base + ["serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                    "--log-level", "warning"]
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *serve]


def start_server(model_dir: str, *, port: Optional[int] = None, startup_timeout: float = 180.0,
                 device: str = "cpu") -> LocalServer:
    """Launch ``transformers serve MODEL_DIR`` on 127.0.0.1 and wait for ``/health``.

    Raises:
        ServeError: the server exited or did not answer within ``startup_timeout`` (log tail included).
    """
    port = port or free_port()
    log_path = os.path.join(tempfile.gettempdir(), f"zephyr_fast_serve_{port}.log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = _command(model_dir, port)
    if device != "cpu":
        cmd[cmd.index("--device") + 1] = device
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = LocalServer(proc, port, model_dir, log_path)
    deadline = time.time() + startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"transformers serve exited with {proc.returncode}: {_tail(log_path)}")
        if server.healthy():
            return server
        time.sleep(0.5)
    server.stop(kill=True)
    raise ServeError(f"transformers serve did not answer /health within {startup_timeout:.0f} s: {_tail(log_path)}")


def _tail(path: str, n: int = 1500) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


@contextlib.contextmanager
def serve_local(model_dir: str, **kw):
    """Context manager around :func:`start_server`; the server is stopped on exit."""
    server = start_server(model_dir, **kw)
    try:
        yield server
    finally:
        server.stop()
