"""Which judge runs, and how: `HALLULENS_JUDGE=<backend>:<model>` and the other judge env vars.

Defaults are HalluLens' own judges, reached over an OpenAI-compatible server (`vllm serve`),
as upstream did. Every knob is an environment variable because the harness gives filters no
other channel from the command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hallulens_capture.errors import HalluLensError

BACKENDS = ("openai", "vllm", "hf", "gguf")
ENV_JUDGE = "HALLULENS_JUDGE"
ENV_BASE_URL = "HALLULENS_JUDGE_BASE_URL"
ENV_MODEL_ARGS = "HALLULENS_JUDGE_MODEL_ARGS"
ENV_CONCURRENCY = "HALLULENS_JUDGE_CONCURRENCY"
ENV_TIMEOUT = "HALLULENS_JUDGE_TIMEOUT"
ENV_RETRIES = "HALLULENS_JUDGE_RETRIES"
ENV_PARSE_RETRIES = "HALLULENS_JUDGE_PARSE_RETRIES"
ENV_CACHE = "HALLULENS_JUDGE_CACHE"
ENV_MAX_TOKENS = "HALLULENS_JUDGE_MAX_TOKENS"
ENV_CONSTRAINED = "HALLULENS_JUDGE_CONSTRAINED"
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"

# HalluLens' judges: temperature 0, up to 512 new tokens, one user turn.
DEFAULT_MAX_TOKENS = 512


class JudgeError(HalluLensError):
    """The judge is misconfigured or unreachable; judged items so far stay in the cache."""


@dataclass(frozen=True)
class JudgeSpec:
    backend: str
    model: str

    @classmethod
    def parse(cls, text: str, origin: str = ENV_JUDGE) -> JudgeSpec:
        backend, sep, model = text.strip().partition(":")
        if not sep or backend not in BACKENDS or not model.strip():
            raise JudgeError(
                f"{origin}={text!r}: expected <backend>:<model> with backend one of "
                f"{', '.join(BACKENDS)} (e.g. openai:meta-llama/Llama-3.1-70B-Instruct, "
                "hf:smollm2, gguf:/models/judge.gguf)"
            )
        return cls(backend, model.strip())

    def __str__(self) -> str:
        return f"{self.backend}:{self.model}"


def _number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise JudgeError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise JudgeError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise JudgeError(f"{name}={raw!r}: use 1 or 0")


def _model_args(raw: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise JudgeError(f"{ENV_MODEL_ARGS}: {part!r} is not key=value")
        args[key.strip()] = value.strip()
    return args


def default_cache_path() -> Path:
    from hallulens_models.embedded import cache_dir

    return cache_dir() / "judge-cache.sqlite"


@dataclass(frozen=True)
class JudgeSettings:
    """How to reach an LLM and how to ask it; `hallulens generate` uses it for its generators.

    `role` ("judge", "generator") names the LLM in messages.
    """

    spec: JudgeSpec
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    model_args: dict[str, str] = field(default_factory=dict)
    concurrency: int = 16
    timeout_s: float = 300.0
    retries: int = 4
    parse_retries: int = 2
    cache_path: Path | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    constrained: bool = False
    role: str = "judge"

    @property
    def sampling(self) -> dict:
        """Sampling parameters; part of every cache key."""
        params: dict = {"temperature": 0.0, "max_tokens": self.max_tokens}
        if self.constrained:
            params["constrained"] = True
        return params

    @classmethod
    def from_env(cls, default_model: str) -> JudgeSettings:
        """The judge for a task whose HalluLens default judge is `default_model`."""
        raw = os.environ.get(ENV_JUDGE, "").strip()
        spec = JudgeSpec.parse(raw) if raw else JudgeSpec("openai", default_model)
        cache = os.environ.get(ENV_CACHE, "").strip()
        settings = cls(
            spec=spec,
            base_url=(
                os.environ.get(ENV_BASE_URL)
                or os.environ.get("OPENAI_BASE_URL")
                or DEFAULT_BASE_URL
            ).rstrip("/"),
            api_key=os.environ.get("OPENAI_API_KEY") or None,
            model_args=_model_args(os.environ.get(ENV_MODEL_ARGS, "")),
            concurrency=int(_number(ENV_CONCURRENCY, 16, 1)),
            timeout_s=_number(ENV_TIMEOUT, 300.0, 0.001),
            retries=int(_number(ENV_RETRIES, 4, 0)),
            parse_retries=int(_number(ENV_PARSE_RETRIES, 2, 0)),
            cache_path=None if cache.lower() == "off" else Path(cache or default_cache_path()),
            max_tokens=int(_number(ENV_MAX_TOKENS, DEFAULT_MAX_TOKENS, 1)),
            constrained=_flag(ENV_CONSTRAINED),
        )
        if settings.constrained and settings.spec.backend not in ("gguf", "vllm"):
            raise JudgeError(
                f"{ENV_CONSTRAINED}=1 (replies restricted to the verdict formats) is implemented "
                f"for gguf and vllm judges, not {settings.spec}"
            )
        return settings
