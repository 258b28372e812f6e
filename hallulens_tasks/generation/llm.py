"""LLM calls of the prompt-set generators, through the project's one LLM client.

Every reply is cached (SQLite, committed as it arrives) under the generator spec, template and
its version, rendered prompt and sampling parameters, so a re-run with the same cache asks
nothing and an interrupted run resumes with only the missing calls. All prompts of a stage go
to the backend as one batch (vLLM batches them, an OpenAI-compatible server gets them
concurrently). Sampled calls carry a seed, which llama.cpp, vLLM and OpenAI-compatible servers
apply per request, so even without the cache the same engine tends to give the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hallulens_tasks.llm.cache import cache_path_setting
from hallulens_tasks.llm.client import CallStats, LLMClient, Prompt
from hallulens_tasks.llm.settings import DEFAULT_BASE_URL, LLMSettings, api_key, server_url
from hallulens_tasks.llm.spec import LLMSpec

ENV_CACHE = "HALLULENS_GENERATE_CACHE"


def generator_cache(value: str | None) -> Path | None:
    """`--cache PATH|off`, else `$HALLULENS_GENERATE_CACHE`, else `generate-cache.sqlite` in
    the cache directory."""
    return cache_path_setting(value, ENV_CACHE, "generate")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one kind of call; part of every cache key."""

    temperature: float
    max_tokens: int
    top_p: float | None = None
    seed: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_generator(text: str) -> LLMSpec:
    return LLMSpec.parse(text, "--generator")


class Generator:
    """One generator model: renders a template per item and asks for all of them at once."""

    def __init__(
        self,
        spec: str | LLMSpec,
        *,
        cache_path: Path | None,
        base_url: str | None = None,
        concurrency: int = 16,
        model_args: Mapping[str, str] | None = None,
    ):
        spec = spec if isinstance(spec, LLMSpec) else parse_generator(spec)
        settings = LLMSettings(
            spec,
            base_url=(
                server_url(base_url, "--base-url") if spec.backend == "openai" else DEFAULT_BASE_URL
            ),
            api_key=api_key(),
            model_args=dict(model_args or {}),
            concurrency=concurrency,
            cache_path=cache_path,
            role="generator",
        )
        self._client = LLMClient(settings, label="Generating")

    @property
    def name(self) -> str:
        return self._client.name

    @property
    def stats(self) -> CallStats:
        return self._client.stats

    def ask(self, template: str, values: Sequence[Mapping], sampling: Sampling) -> list[str]:
        """One reply per item of `values`, each rendered into `template`."""
        return self.ask_many([(template, v) for v in values], sampling)

    def ask_many(self, items: Sequence[tuple[str, Mapping]], sampling: Sampling) -> list[str]:
        """One reply per (template, values) item, all in one batch."""
        return self._client.ask([Prompt(t, v) for t, v in items], sampling.as_dict())

    def close(self) -> None:
        self._client.close()
