"""Render the jinja2 prompt templates of `prompts/` (shipped as hallulens_tasks/prompts)."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(files("hallulens_tasks") / "prompts")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
        autoescape=False,
    )


def render(template: str, /, **values: object) -> str:
    """Render `template` (e.g. "demo_question.jinja"); a missing value is an error."""
    return _environment().get_template(template).render(**values)


@cache
def template_version(name: str) -> str:
    """sha256 of the template's source: judge cache keys change when a template is edited."""
    source = (files("hallulens_tasks") / "prompts" / name).read_bytes()
    return hashlib.sha256(source).hexdigest()[:16]
