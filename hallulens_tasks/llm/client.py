"""One batched, cached judge pass over many items.

Items are rendered from jinja templates, looked up in the cache, and only what is missing goes
to the judge backend, in one batch. Replies that do not parse are asked again (a bounded number
of times, only where the backend can answer differently) and otherwise stay unparseable: the
caller counts them, nothing turns them into a verdict. The cached, batched calls themselves
(`CachedLLM`) also serve the question generators of `hallulens generate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from hallulens_tasks.judge.cache import JudgeCache, cache_key
from hallulens_tasks.judge.engines import backend_for
from hallulens_tasks.judge.settings import JudgeSettings
from hallulens_tasks.prompting import render, template_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeItem:
    template: str  # e.g. "judge_abstention.jinja"
    values: dict[str, Any]
    parse: Callable[[str], Any]  # raw reply -> verdict, or None when unparseable
    choices: tuple[str, ...]  # the replies the prompt asks for (used by constrained judging)


@dataclass
class Judgement:
    raw: str
    verdict: Any  # None: unparseable after every attempt
    attempts: int


@dataclass
class PassStats:
    items: int = 0
    cache_hits: int = 0
    requests: int = 0
    unparseable: int = 0
    templates: dict[str, str] = field(default_factory=dict)


class CachedLLM:
    """Replies to rendered prompts: from the cache where present, the rest in one backend batch.

    Shared by the judge and by `hallulens generate`: both need every LLM call cached on disk
    (an interrupted pass resumes with only what is missing) and batched. The backend is made
    (an engine loaded) only when something is not in the cache. Counts go to `stats`.
    """

    def __init__(self, settings: JudgeSettings, stats: PassStats, label: str = "Judging"):
        self.settings = settings
        self.stats = stats
        self.label = label
        self._cache = JudgeCache(settings.cache_path) if settings.cache_path else None

    @property
    def name(self) -> str:
        return str(self.settings.spec)

    def ask(
        self,
        prompts: Sequence[str],
        keys: Sequence[str],
        templates: Sequence[str],
        sampling: dict,
        choices: Sequence[tuple[str, ...] | None] | None = None,
    ) -> list[str]:
        """One reply per prompt; prompts with the same key are asked once."""
        choices = choices if choices is not None else [None] * len(prompts)
        unique = dict(zip(keys, zip(prompts, templates, choices, strict=True), strict=True))
        replies = self._cache.get_many(unique) if self._cache is not None else {}
        self.stats.cache_hits += sum(1 for k in keys if k in replies)
        # sorted by text: prompts sharing a template prefix go one after another, so engines
        # that keep the previous prompt's KV cache (llama.cpp) reuse it
        missing = sorted((k for k in unique if k not in replies), key=lambda k: unique[k][0])
        if missing:
            self.stats.requests += len(missing)
            log.info("%s %s: asking %d prompts", self.settings.role, self.name, len(missing))
            progress = tqdm(total=len(missing), desc=f"{self.label} ({self.name})")

            def done(i: int, text: str) -> None:
                key = missing[i]
                replies[key] = text
                if self._cache is not None:
                    self._cache.put(key, self.name, unique[key][1], text)
                progress.update()

            try:
                backend_for(self.settings).complete(
                    [unique[k][0] for k in missing],
                    [unique[k][2] for k in missing],
                    done,
                    sampling,
                )
            finally:
                progress.close()
        return [replies[k] for k in keys]

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None


class Judge:
    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.stats = PassStats()
        self._llm = CachedLLM(settings, self.stats)

    @property
    def name(self) -> str:
        return str(self.settings.spec)

    def run(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        prompts = [render(item.template, **item.values) for item in items]
        versions = {t: template_version(t) for t in {item.template for item in items}}
        self.stats.items += len(items)
        self.stats.templates.update(versions)
        results: list[Judgement | None] = [None] * len(items)
        todo = list(range(len(items)))
        # Greedy local engines give the same text again; only a server is worth re-asking.
        varies = self.settings.spec.backend == "openai"
        max_attempts = 1 + (self.settings.parse_retries if varies else 0)
        sampling = self.settings.sampling
        for attempt in range(max_attempts):
            if not todo:
                break
            keys = [
                cache_key(
                    self.name,
                    items[i].template,
                    versions[items[i].template],
                    prompts[i],
                    sampling,
                    attempt,
                )
                for i in todo
            ]
            replies = self._llm.ask(
                [prompts[i] for i in todo],
                keys,
                [items[i].template for i in todo],
                sampling,
                [items[i].choices if self.settings.constrained else None for i in todo],
            )
            retry = []
            for i, raw in zip(todo, replies, strict=True):
                verdict = items[i].parse(raw)
                results[i] = Judgement(raw, verdict, attempt + 1)
                if verdict is None:
                    retry.append(i)
            todo = retry
        self.stats.unparseable += len(todo)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._llm.close()
