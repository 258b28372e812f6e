"""LLM calls (judge or generator) over any OpenAI-compatible chat completions server.

`vllm serve`, llama.cpp's server, hosted APIs.

Requests run concurrently from a thread pool, each thread keeping one keep-alive connection.
Connection errors, timeouts, 429 and 5xx replies are retried with exponential backoff; other
HTTP errors stop the pass at once with the server's message (a wrong model name will not get
better by asking again). Replies are handed to `done` as they arrive, so the cache holds
everything answered before an interruption.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from urllib.parse import urlsplit

from hallulens_tasks.llm.settings import LLMSettings, server_url
from hallulens_tasks.llm.spec import LLMError

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _Retry(Exception):
    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


class OpenAIBackend:
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
            data = reply.read()
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

    def ask(self, prompt: str, sampling: dict) -> str:
        """One prompt, retried with backoff; LLMError once the retries are used up."""
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
                time.sleep(wait_s)
        raise AssertionError("unreachable")

    def complete(
        self,
        prompts: Sequence[str],
        choices: Sequence[tuple[str, ...] | None],
        done: Callable[[int, str], None],
        sampling: dict,
    ) -> None:
        """Ask every prompt, each reply to `done` as it arrives; on a failure, keep what is
        answered and then raise it.

        `sampling` goes into each request body as is (temperature, max_tokens, top_p, seed).
        """
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
            futures = {
                pool.submit(self.ask, prompt, sampling): i for i, prompt in enumerate(prompts)
            }
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        if failure is None:
                            failure = future.exception()
                            for other in pending:
                                other.cancel()
                        continue
                    done(futures[future], future.result())
        if failure is not None:
            raise failure

    def close(self) -> None:
        self._drop_connection()
