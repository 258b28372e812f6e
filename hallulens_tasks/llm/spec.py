"""Which LLM: the `<backend>:<model>` spec strings of judges and generators."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from hallulens_capture.errors import HalluLensError

# backend name -> the class that answers its prompts, imported only when that backend is used
# (a new backend is one line here and one class with `complete()` and two flags: `in_process`,
# loaded once and kept for the process; `constrained`, can restrict replies to given choices)
BACKENDS = {
    "openai": "hallulens_tasks.llm.server:OpenAIBackend",
    "gguf": "hallulens_tasks.llm.engines:GGUFBackend",
    "vllm": "hallulens_tasks.llm.engines:VLLMBackend",
    "hf": "hallulens_tasks.llm.engines:HFBackend",
}


class LLMError(HalluLensError):
    """An LLM (judge or generator) is misconfigured or unreachable; replies so far stay cached."""


@dataclass(frozen=True)
class LLMSpec:
    backend: str
    model: str

    @classmethod
    def parse(cls, text: str, origin: str) -> LLMSpec:
        """`<backend>:<model>`; a bare path ending in .gguf means `gguf:<path>` (the seed's
        kind). `origin` (an env var or a flag) names the source in errors."""
        backend, sep, model = text.strip().partition(":")
        if backend not in BACKENDS and text.strip().lower().endswith(".gguf"):
            return cls("gguf", text.strip())
        if not sep or backend not in BACKENDS or not model.strip():
            raise LLMError(
                f"{origin}={text!r}: expected <backend>:<model> with backend one of "
                f"{', '.join(BACKENDS)} (e.g. openai:meta-llama/Llama-3.1-70B-Instruct, "
                "hf:smollm2, gguf:/models/judge.gguf)"
            )
        return cls(backend, model.strip())

    def __str__(self) -> str:
        return f"{self.backend}:{self.model}"


def backend_class(backend: str) -> type:
    module, _, name = BACKENDS[backend].partition(":")
    return getattr(importlib.import_module(module), name)
