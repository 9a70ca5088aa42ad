"""A small real HTTP server speaking the OpenAI chat-completions wire format, with injectable faults.

Used by the fault tests (the happy path is tested against ``transformers serve``).  Answers are
deterministic functions of the request: an UltraFeedback-format rating, an MT-Bench ``[[r]]`` or a
pairwise ``[[A]]``/``[[B]]``/``[[C]]`` verdict, chosen by hashing the user message.

Faults (``Faults``): the first ``fail_count`` requests get HTTP ``fail_status`` (429 with
``Retry-After: 0``); the first ``slow_count`` sleep ``delay`` s before answering; ``garbage`` answers
are unparseable; ``die_after`` = n makes the process ``os._exit`` on request n+1 (a crash mid-run);
``logprobs`` adds per-character top log-probs; the first ``bad_count`` requests get ``bad_body``
(status 200, ``bad_type`` content type: an HTML page, a JSON body without ``choices``, ``choices: []``,
``content: null``); ``trickle`` > 0 sends every byte of the response (status line and headers
included) ``trickle`` s apart.  Every request is logged (``log``: JSONL path) with
the sha256 of its messages.

    python -m tests.aif.fake_openai --port 0 --port-file F [--die-after N] [--log L] [--garbage]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


@dataclass
class Faults:
    fail_status: int = 0
    fail_count: int = 0
    slow_count: int = 0
    delay: float = 0.0
    garbage: bool = False
    die_after: Optional[int] = None
    logprobs: bool = False
    log: Optional[str] = None
    bad_body: Optional[str] = None
    bad_type: str = "application/json"
    bad_count: int = 0
    trickle: float = 0.0
    echo_auth: bool = False  # error bodies quote the Authorization header (as some proxies do)


def messages_hash(messages) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()


def answer_for(messages) -> str:
    """The deterministic answer to a judge request."""
    user = messages[-1]["content"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    h = int(hashlib.sha256(user.encode()).hexdigest(), 16)
    if "[[A]]" in system:
        return "Both are similar, but one is better. [[" + "ABC"[h % 3] + "]]"
    if "[[rating]]" in user or "[[rating]]" in system:
        return f"The answer is adequate. Rating: [[{1 + h % 10}]]"
    n = len(re.findall(r"^<text \d> ", user.split("## Annotation")[-1], re.M))
    return "\n\n".join(_text_answer(k, 1 + (h >> (8 * (k - 1))) % 5, "Type: [List" in user) for k in range(1, n + 1))


def _text_answer(k: int, r: int, typed: bool) -> str:
    """UltraFeedback's output block for text ``k`` (texts 2.. only in multi-text requests)."""
    if typed:
        return f"#### Output for Text {k}\nType: None\nRationale: No issue.\nRating: {r}\nRationale: Fine."
    return f"#### Output for Text {k}\nRating: {r}\nRationale: Looks like a {r}."


def _logprobs(text: str) -> dict:
    content = []
    for ch in text:
        if ch.isdigit() and ch != "0":
            d = int(ch)
            top = {str(d): math.log(0.7)}
            for o, p in ((d + 1, 0.2), (d - 1, 0.1)):
                if 1 <= o <= 9:
                    top[str(o)] = math.log(p)
        else:
            top = {ch: 0.0}
        content.append({"token": ch, "logprob": top.get(ch, 0.0), "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]})
    return {"content": content}


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-openai/1"

    def log_message(self, *a):  # quiet
        pass

    def _send(self, status: int, body, headers: Optional[dict] = None, content_type="application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        head = [f"HTTP/1.0 {status} X", f"Content-Type: {content_type}", f"Content-Length: {len(data)}",
                *(f"{k}: {v}" for k, v in (headers or {}).items())]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        if not self.server.faults.trickle:
            self.wfile.write(raw)
            return
        for i in range(len(raw)):  # one byte at a time: every read gets something before its timeout
            self.wfile.write(raw[i:i + 1])
            self.wfile.flush()
            time.sleep(self.server.faults.trickle)

    def do_POST(self):  # noqa: N802
        srv, f = self.server, self.server.faults
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with srv.lock:
            srv.count += 1
            n = srv.count
        if f.die_after is not None and n > f.die_after:
            os._exit(3)
        status = f.fail_status if n <= f.fail_count else 200
        if f.log:
            with srv.lock, open(f.log, "a") as fh:
                fh.write(json.dumps({"n": n, "hash": messages_hash(body["messages"]), "status": status}) + "\n")
        if status != 200:
            message = f"injected; got {self.headers.get('Authorization')}" if f.echo_auth else "injected"
            return self._send(status, {"error": {"message": message, "type": "server_error"}},
                              {"Retry-After": "0"} if status == 429 else None)
        if n <= f.bad_count:
            return self._send(200, f.bad_body, content_type=f.bad_type)
        if n <= f.slow_count:
            time.sleep(f.delay)
        text = "~~ garbage ~~ no rating here" if f.garbage else answer_for(body["messages"])
        if body.get("max_tokens") == 1 and not f.garbage:  # a constrained judge: one rating token
            text = next((c for c in text[text.rfind("Rating"):] if c.isdigit()), "1")
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text},
                  "logprobs": _logprobs(text) if f.logprobs and body.get("logprobs") else None}
        usage = {"prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                 "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._send(200, {"id": f"fake-{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [choice], "usage": usage})


def make_server(faults: Faults, port: int = 0) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.faults, srv.count, srv.lock = faults, 0, threading.Lock()
    srv.daemon_threads = True
    return srv


def start_in_thread(faults: Faults):
    """``(server, base_url)``; stop with ``server.shutdown()``."""
    srv = make_server(faults)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--die-after", type=int)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--slow-count", type=int, default=0)
    ap.add_argument("--log")
    ap.add_argument("--garbage", action="store_true")
    a = ap.parse_args(argv)
    srv = make_server(Faults(die_after=a.die_after, log=a.log, garbage=a.garbage, delay=a.delay,
                             slow_count=a.slow_count), a.port)
    with open(a.port_file + ".tmp", "w") as fh:
        fh.write(str(srv.server_address[1]))
    os.replace(a.port_file + ".tmp", a.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    main()
