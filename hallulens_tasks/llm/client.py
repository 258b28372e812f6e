"""The batched, cached LLM client: templates in, replies out, every reply cached on disk.

Prompts are rendered from jinja templates, looked up in the reply cache, and only what is
missing goes to the backend, in one batch; each reply is cached as it arrives, so an
interrupted pass resumes with only the missing calls. The backend (an engine loaded, a server
reached) is made only when something is not in the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from hallulens_tasks.llm.cache import ReplyCache, cache_key
from hallulens_tasks.llm.engines import backend_for
from hallulens_tasks.llm.settings import LLMSettings
from hallulens_tasks.prompting import render, template_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One call: a template of `prompts/` and the values it is rendered with."""

    template: str  # e.g. "judge_abstention.jinja"
    values: Mapping[str, Any]


@dataclass
class CallStats:
    items: int = 0
    cache_hits: int = 0
    requests: int = 0
    refreshed: int = 0  # cached replies judged stale and asked again
    templates: dict[str, str] = field(default_factory=dict)  # name -> version (content hash)


class LLMClient:
    """Replies to prompts: from the cache where present, the rest in one backend batch."""

    def __init__(self, settings: LLMSettings, label: str = "Asking"):
        self.settings = settings
        self.stats = CallStats()
        self.label = label
        self._cache = ReplyCache(settings.cache_path) if settings.cache_path else None

    @property
    def name(self) -> str:
        return str(self.settings.spec)

    def ask(
        self,
        prompts: Sequence[Prompt],
        sampling: dict,
        *,
        attempt: int = 0,
        choices: Sequence[tuple[str, ...] | None] | None = None,
        stale: Callable[[int, str], bool] | None = None,
    ) -> list[str]:
        """One reply per prompt; equal prompts are asked once. `sampling` and `attempt` are
        part of the cache key; `choices` restrict replies where the backend can (constrained
        judging); a cached reply for which `stale(index, text)` holds is asked again and
        replaced."""
        if not prompts:
            return []
        texts = [render(p.template, **p.values) for p in prompts]
        versions = {p.template: template_version(p.template) for p in prompts}
        self.stats.items += len(prompts)
        self.stats.templates.update(versions)
        keys = [
            cache_key(
                self.settings.identity, p.template, versions[p.template], text, sampling, attempt
            )
            for p, text in zip(prompts, texts, strict=True)
        ]
        choices = choices if choices is not None else [None] * len(prompts)
        unique = {
            key: (text, p.template, choice)
            for key, text, p, choice in zip(keys, texts, prompts, choices, strict=True)
        }
        replies = self._cache.get_many(unique) if self._cache is not None else {}
        if stale is not None:
            dropped = {k for i, k in enumerate(keys) if k in replies and stale(i, replies[k])}
            self.stats.refreshed += len(dropped)
            replies = {k: text for k, text in replies.items() if k not in dropped}
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
                    self._cache.put(key, self.settings.identity, unique[key][1], text)
                progress.update()

            try:
                backend_for(self.settings).complete(
                    [unique[k][0] for k in missing], [unique[k][2] for k in missing], done, sampling
                )
            finally:
                progress.close()
        return [replies[k] for k in keys]

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
