"""Which judge runs, and how: `HALLULENS_JUDGE=<backend>:<model>` and the other judge env vars.

Defaults are HalluLens' own judges, reached over an OpenAI-compatible server (`vllm serve`),
as upstream did. Every knob is an environment variable because the harness gives filters no
other channel from the command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hallulens_capture.options import checked_number
from hallulens_tasks.llm.cache import cache_path_setting
from hallulens_tasks.llm.settings import (
    DEFAULT_BASE_URL,
    ENV_OPENAI_BASE_URL,
    LLMSettings,
    api_key,
    parse_model_args,
    server_url,
)
from hallulens_tasks.llm.spec import BACKENDS, LLMError, LLMSpec, backend_class

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
ENV_REASK = "HALLULENS_JUDGE_REASK_UNPARSEABLE"

# HalluLens' judges: temperature 0, up to 512 new tokens, one user turn.
DEFAULT_MAX_TOKENS = 512


def _env_number(name: str, default: float, minimum: float, integer: bool = True) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    return checked_number(name, raw, minimum=minimum, integer=integer, error=LLMError)


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise LLMError(f"{name}={raw!r}: use 1 or 0")


def _judge_server_url() -> str:
    chosen = os.environ.get(ENV_BASE_URL)
    origin = ENV_BASE_URL if chosen else ENV_OPENAI_BASE_URL
    return server_url(chosen, f"judge base URL (${origin})")


@dataclass(frozen=True)
class JudgeSettings(LLMSettings):
    """An LLM used as a judge: greedy, bounded replies, re-asked when unreadable."""

    parse_retries: int = 2
    max_tokens: int = DEFAULT_MAX_TOKENS
    constrained: bool = False
    reask_unparseable: bool = False  # cached unreadable replies are asked again

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
        spec = LLMSpec.parse(raw, ENV_JUDGE) if raw else LLMSpec("openai", default_model)
        settings = cls(
            spec=spec,
            base_url=(_judge_server_url() if spec.backend == "openai" else DEFAULT_BASE_URL),
            api_key=api_key(),
            model_args=parse_model_args(os.environ.get(ENV_MODEL_ARGS), ENV_MODEL_ARGS),
            concurrency=int(_env_number(ENV_CONCURRENCY, 16, 1)),
            timeout_s=_env_number(ENV_TIMEOUT, 300.0, 0.001, integer=False),
            retries=int(_env_number(ENV_RETRIES, 4, 0)),
            parse_retries=int(_env_number(ENV_PARSE_RETRIES, 2, 0)),
            cache_path=cache_path_setting(None, ENV_CACHE, "judge"),
            max_tokens=int(_env_number(ENV_MAX_TOKENS, DEFAULT_MAX_TOKENS, 1)),
            constrained=_env_flag(ENV_CONSTRAINED),
            reask_unparseable=_env_flag(ENV_REASK),
        )
        if settings.constrained and not backend_class(settings.spec.backend).constrained:
            able = [name for name in BACKENDS if backend_class(name).constrained]
            raise LLMError(
                f"{ENV_CONSTRAINED}=1 (replies restricted to the verdict formats) is implemented "
                f"for {' and '.join(able)} judges, not {settings.spec}"
            )
        return settings
