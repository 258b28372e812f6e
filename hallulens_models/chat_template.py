"""Chat templates stored in model files (`tokenizer.chat_template`), rendered as transformers does.

transformers renders them with jinja2 in an immutable sandbox, `trim_blocks` and `lstrip_blocks`,
`raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text; the same here, so a
GGUF's template gives the same prompt as the HF tokenizer of the same model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hallulens_capture.errors import CaptureConfigError


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, str], token_text: Callable[[int], str]
    ) -> ChatTemplate | None:
        source = metadata.get("tokenizer.chat_template")
        if not source:
            return None

        def special(name: str) -> str:
            token = metadata.get(f"tokenizer.ggml.{name}_token_id")
            return token_text(int(token)) if token is not None else ""

        return cls(source, special("bos"), special("eos"))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            template = _environment().from_string(self.source)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise CaptureConfigError(f"the model's chat template failed: {exc}") from None
