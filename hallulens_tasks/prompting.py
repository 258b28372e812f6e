"""Render the jinja2 prompt templates of `prompts/` (shipped as hallulens_tasks/prompts)."""

from __future__ import annotations

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


def render(name: str, **values: object) -> str:
    """Render template `name` (e.g. "demo_question.jinja"); a missing value is an error."""
    return _environment().get_template(name).render(**values)
