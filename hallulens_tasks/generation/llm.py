"""LLM calls of the prompt-set generators, through the judge's backends and on-disk cache.

Every reply is cached (SQLite, committed as it arrives) under the generator spec, template and
its version, rendered prompt and sampling parameters, so a re-run with the same cache asks
nothing and an interrupted run resumes with only the missing calls. All prompts of a stage go
to the backend as one batch (vLLM batches them, an OpenAI-compatible server gets them
concurrently). Sampled calls carry a seed, which llama.cpp, vLLM and OpenAI-compatible servers
apply per request, so even without the cache the same engine tends to give the same text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hallulens_tasks.generation.errors import GenerationError
from hallulens_tasks.judge.cache import cache_key
from hallulens_tasks.judge.core import CachedLLM, PassStats
from hallulens_tasks.judge.settings import (
    BACKENDS,
    DEFAULT_BASE_URL,
    JudgeError,
    JudgeSettings,
    JudgeSpec,
)
from hallulens_tasks.prompting import render, template_version

ENV_BASE_URL = "OPENAI_BASE_URL"


ENV_CACHE = "HALLULENS_GENERATE_CACHE"


def default_cache_path() -> Path:
    """`$HALLULENS_GENERATE_CACHE`, else `generate-cache.sqlite` in the cache directory."""
    from hallulens_models.embedded import cache_dir

    return Path(os.environ.get(ENV_CACHE) or cache_dir() / "generate-cache.sqlite")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one kind of call; part of every cache key."""

    temperature: float
    max_tokens: int
    top_p: float | None = None
    seed: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_generator(text: str) -> JudgeSpec:
    """`<backend>:<model>`; a bare path ending in .gguf means `gguf:<path>` (the seed's kind)."""
    backend = text.partition(":")[0]
    if backend not in BACKENDS and text.strip().lower().endswith(".gguf"):
        return JudgeSpec("gguf", text.strip())
    try:
        return JudgeSpec.parse(text, origin="--generator")
    except JudgeError as exc:
        raise GenerationError(str(exc)) from None


class Generator:
    """One generator model: renders a template per item and asks for all of them at once."""

    def __init__(
        self,
        spec: str | JudgeSpec,
        *,
        cache_path: Path | None,
        base_url: str | None = None,
        concurrency: int = 16,
        model_args: Mapping[str, str] | None = None,
    ):
        spec = spec if isinstance(spec, JudgeSpec) else parse_generator(spec)
        url = base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
        settings = JudgeSettings(
            spec,
            base_url=url.rstrip("/"),
            api_key=os.environ.get("OPENAI_API_KEY") or None,
            model_args=dict(model_args or {}),
            concurrency=concurrency,
            cache_path=cache_path,
            role="generator",
        )
        self.stats = PassStats()
        self._llm = CachedLLM(settings, self.stats, label="Generating")

    @property
    def name(self) -> str:
        return self._llm.name

    def ask(self, template: str, values: Sequence[Mapping], sampling: Sampling) -> list[str]:
        """One reply per item of `values`, each rendered into `template`."""
        return self.ask_many([(template, v) for v in values], sampling)

    def ask_many(self, items: Sequence[tuple[str, Mapping]], sampling: Sampling) -> list[str]:
        """One reply per (template, values) item, all in one batch."""
        if not items:
            return []
        templates = [template for template, _ in items]
        prompts = [render(template, **values) for template, values in items]
        versions = {t: template_version(t) for t in templates}
        self.stats.items += len(prompts)
        self.stats.templates.update(versions)
        params = sampling.as_dict()
        keys = [
            cache_key(self.name, t, versions[t], p, params, 0)
            for t, p in zip(templates, prompts, strict=True)
        ]
        return self._llm.ask(prompts, keys, templates, params)

    def close(self) -> None:
        self._llm.close()
