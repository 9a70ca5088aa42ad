"""An HTTP transport whose timeout is a total deadline per request, not a limit per socket read.

``httpx`` (under the ``openai`` client) applies its timeout to each connect / read / write: a server
that trickles a byte every few seconds holds a request for ever.  :func:`deadline_client` gives an
``httpx.Client`` whose network streams clamp every operation to the time left until the request's
deadline, and fail with a read timeout once it has passed -- whatever phase the request is in
(connecting, sending, waiting for the status line, headers or body).  The deadline is set per
request, per thread (:func:`deadline`), so concurrent requests on one client each keep their own.
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpcore
import httpx

_local = threading.local()


@contextlib.contextmanager
def deadline(seconds: float):
    """Every network operation of this thread inside the block ends by ``seconds`` from now."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def _clamp(timeout):
    end = getattr(_local, "deadline", None)
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the request's total deadline (--timeout) passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner):
        self._inner = inner

    def read(self, max_bytes: int, timeout=None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout))

    def write(self, buffer: bytes, timeout=None) -> None:
        self._inner.write(buffer, _clamp(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout)))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self):
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return _Stream(self._inner.connect_tcp(host, port, _clamp(timeout), local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        return _Stream(self._inner.connect_unix_socket(path, _clamp(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def deadline_client(timeout: float) -> httpx.Client:
    """An ``httpx.Client`` whose direct connections, made inside :func:`deadline`, end by its deadline
    (a proxy from the environment keeps httpx's per-read timeout)."""
    transport = httpx.HTTPTransport()
    pool = transport._pool  # noqa: SLF001 - httpx exposes no network-backend option
    if not isinstance(pool, httpcore.ConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("judge: this httpx version has no connection pool to put the request deadline on")
    pool._network_backend = _Backend()  # noqa: SLF001
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=True)
