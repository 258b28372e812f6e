"""A scripted OpenAI-compatible chat completions server on 127.0.0.1, for exact judge answers.

A real HTTP server (threaded, keep-alive; a given `port` lets a test restart "the same"
server, whose cached replies then count) answering `POST /v1/chat/completions` with whatever
`answer(prompt)` returns (`answer(prompt, body)` with `pass_body=True`, for replies that
depend on the model or sampling parameters). Faults are scripted per prompt: `fail[prompt] = n`
answers the first n requests for that prompt with HTTP 500, `stall[prompt] = n` stalls the
first n past the client's timeout; `down_after = n` answers 503 to everything after n good
replies. It counts requests, keeps each request body, and the most requests it had in flight
at once.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many clients connect at once
    daemon_threads = True


class JudgeServer:
    def __init__(
        self,
        answer: Callable[..., str],
        delay_s: float = 0.0,
        *,
        pass_body: bool = False,
        port: int = 0,
    ):
        self.answer = answer
        self.pass_body = pass_body
        self.bodies: list[dict] = []
        self.delay_s = delay_s
        self.fail: Counter[str] = Counter()
        self.stall: Counter[str] = Counter()
        self.stall_s = 2.0
        self.down_after: int | None = None
        self.requests = 0
        self.good = 0
        self.prompts: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave at once, as real servers do

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = server._handle(self.path, body)
                payload = json.dumps(
                    {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                    if status == 200
                    else {"error": text}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (timeout test)
                    self.wfile.write(payload)

        self._httpd = _Server(("127.0.0.1", port), Handler)  # port 0: any free port
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _handle(self, path: str, body: dict) -> tuple[int, str]:
        if path != "/v1/chat/completions":
            return 404, f"no route {path}"
        prompt = body["messages"][0]["content"]
        with self._lock:
            self.requests += 1
            self.prompts.append(prompt)
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            down = self.down_after is not None and self.good >= self.down_after
            fail = self.fail[prompt] > 0
            stall = self.stall[prompt] > 0
            if fail:
                self.fail[prompt] -= 1
            if stall:
                self.stall[prompt] -= 1
        try:
            if stall:
                time.sleep(self.stall_s)
            if self.delay_s:
                time.sleep(self.delay_s)
            if down:
                return 503, "server going down"
            if fail:
                return 500, "scripted failure"
            with self._lock:
                self.good += 1
            return 200, self.answer(prompt, body) if self.pass_body else self.answer(prompt)
        finally:
            with self._lock:
                self.in_flight -= 1

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
