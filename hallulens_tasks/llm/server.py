"""LLM calls (judge or generator) over any OpenAI-compatible chat completions server.

`vllm serve`, llama.cpp's server, hosted APIs.

Requests run concurrently from a few worker threads, each keeping one keep-alive connection.
Connection errors, timeouts, 429 and 5xx replies are retried with exponential backoff; other
HTTP errors stop the pass at once with the server's message (a wrong model name will not get
better by asking again). Replies are handed to `done` as they arrive, so the cache holds
everything answered before an interruption. Ctrl-C stops the pass at once: no new request is
sent, and the workers are daemon threads, so the process does not wait for the ones in flight.
A reply is short: one larger than `MAX_REPLY_BYTES` is not read further and is kept as a note
that no parser reads as a verdict (it counts as unparseable).
"""

from __future__ import annotations

import http.client
import json
import logging
import queue
import random
import threading
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from hallulens_capture.errors import Interrupted
from hallulens_tasks.llm.settings import LLMSettings, server_url
from hallulens_tasks.llm.spec import LLMError

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_REPLY_BYTES = 256 << 10  # of the HTTP body; judge replies are a few hundred bytes


def oversized_reply(size: str) -> str:
    """What is kept of a reply over the limit: a note no verdict parser accepts."""
    return f"[reply not kept: {size}, over the {MAX_REPLY_BYTES >> 10} KiB limit]"


class _Retry(Exception):
    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


class OpenAIBackend:
    """A client per call; servers take constraints each their own way, so none are sent."""

    in_process = False
    constrained = False

    def __init__(self, settings: LLMSettings):
        self.model = settings.spec.model
        self.settings = settings
        url = urlsplit(server_url(settings.base_url, f"{settings.role} base URL"))
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port
        self._path = url.path.rstrip("/") + "/chat/completions"
        self._local = threading.local()
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            conn = cls(self._host, self._port, timeout=self.settings.timeout_s)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(self, prompt: str, sampling: dict) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                **{k: v for k, v in sampling.items() if v is not None},
            }
        )
        conn = self._connection()
        try:
            conn.request("POST", self._path, body=body, headers=self._headers)
            reply = conn.getresponse()
            data = reply.read(MAX_REPLY_BYTES + 1)
        except TimeoutError as exc:
            self._drop_connection()
            raise _Retry(f"no reply within {self.settings.timeout_s:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise _Retry(f"connection failed: {exc or type(exc).__name__}") from exc
        if reply.status in _RETRY_STATUS:
            after = reply.getheader("Retry-After")
            wait_s = float(after) if after and after.replace(".", "", 1).isdigit() else None
            raise _Retry(f"HTTP {reply.status}", wait_s)
        if len(data) > MAX_REPLY_BYTES:
            self._drop_connection()  # the rest of the body is never read
            length = reply.getheader("Content-Length")
            return oversized_reply(f"{length} bytes" if length else "longer")
        if reply.status != 200:
            raise LLMError(
                f"{self.settings.role} openai:{self.model} at {self.settings.base_url}: "
                f"HTTP {reply.status}: "
                f"{data[:300].decode('utf-8', 'replace').strip()}"
            )
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Retry("reply is not a chat completion") from exc
        return content or ""

    def ask(self, prompt: str, sampling: dict, stop: threading.Event) -> str | None:
        """One prompt, retried with backoff; LLMError once the retries are used up, None when
        `stop` is set while waiting to retry."""
        attempts = self.settings.retries + 1
        role = self.settings.role
        for attempt in range(attempts):
            try:
                return self._request(prompt, sampling)
            except _Retry as retry:
                if attempt + 1 == attempts:
                    raise LLMError(
                        f"{role} openai:{self.model} at {self.settings.base_url}: {retry} "
                        f"(after {attempts} attempts); replies so far are cached, re-run to resume"
                    ) from None
                wait_s = retry.wait_s
                if wait_s is None:
                    wait_s = min(30.0, 0.5 * 2**attempt) * (0.5 + random.random())
                log.warning("%s request failed (%s); retrying in %.1f s", role, retry, wait_s)
                if stop.wait(wait_s):
                    return None
        raise AssertionError("unreachable")

    def complete(
        self,
        prompts: Sequence[str],
        choices: Sequence[tuple[str, ...] | None],
        done: Callable[[int, str], None],
        sampling: dict,
    ) -> None:
        """Ask every prompt, each reply to `done` as it arrives. On a failed request no new
        request starts, the ones in flight are kept, then the failure is raised; on Ctrl-C the
        pass stops at once (`Interrupted`).

        `sampling` goes into each request body as is (temperature, max_tokens, top_p, seed).
        """
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(prompts)):
            todo.put(i)
        replies: queue.SimpleQueue[tuple[int, str | None, BaseException | None]]
        replies = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    replies.put((i, self.ask(prompts[i], sampling, stop), None))
                except BaseException as exc:  # handed to the caller's thread
                    replies.put((i, None, exc))

        workers = [
            threading.Thread(target=work, name=f"hallulens-{self.settings.role}", daemon=True)
            for _ in range(min(self.settings.concurrency, len(prompts)))
        ]
        for worker in workers:
            worker.start()
        failure: BaseException | None = None
        received = 0
        try:
            while any(w.is_alive() for w in workers) or not replies.empty():
                try:
                    i, text, exc = replies.get(timeout=0.2)
                except queue.Empty:
                    continue
                if exc is not None:
                    failure = failure or exc
                    stop.set()  # the requests in flight still finish and are kept
                elif text is not None:
                    done(i, text)
                    received += 1
        except KeyboardInterrupt:
            stop.set()
            raise Interrupted(
                f"{self.settings.role} pass interrupted: {received} of {len(prompts)} replies "
                "received are cached; run the same command again to resume"
            ) from None
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._drop_connection()
