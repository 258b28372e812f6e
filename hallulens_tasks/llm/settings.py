"""How to reach an LLM: server, key, engine arguments, concurrency, timeouts, cache file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from hallulens_tasks.llm.spec import LLMError, LLMSpec

ENV_OPENAI_BASE_URL = "OPENAI_BASE_URL"
ENV_OPENAI_API_KEY = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


@dataclass(frozen=True)
class LLMSettings:
    """Everything that decides where prompts go. `role` ("judge", "generator") names the LLM
    in messages."""

    spec: LLMSpec
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    model_args: dict[str, str] = field(default_factory=dict)
    concurrency: int = 16
    timeout_s: float = 300.0
    retries: int = 4
    cache_path: Path | None = None
    role: str = "judge"

    @property
    def identity(self) -> str:
        """What answered, for cache keys: a server's model is only known by its URL too (a reply
        cached from one server is not replayed for another)."""
        if self.spec.backend == "openai":
            return f"{self.spec}@{self.base_url}"
        return str(self.spec)


def server_url(preferred: str | None, origin: str) -> str:
    """The OpenAI-compatible base URL: `preferred`, else $OPENAI_BASE_URL, else the local
    default; checked here so that a typo is one line, not a traceback mid-pass."""
    url = (preferred or os.environ.get(ENV_OPENAI_BASE_URL) or DEFAULT_BASE_URL).strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number or out of range)
    except ValueError as exc:
        raise LLMError(f"{origin} {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LLMError(f"{origin} {url!r} is not an http(s) URL")
    return url.rstrip("/")


def api_key() -> str | None:
    return os.environ.get(ENV_OPENAI_API_KEY) or None


def parse_model_args(text: str | None, origin: str) -> dict[str, str]:
    """Engine arguments `k=v,k=v` (gguf: Llama(...), hf: HFLM, vllm: LLM(...))."""
    args: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise LLMError(f"{origin}: {part!r} is not key=value")
        args[key.strip()] = value.strip()
    return args
