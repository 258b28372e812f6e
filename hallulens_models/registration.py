"""Registration of our models and tasks with lm-eval, called by `lm_eval_hallulens_hook`.

- `register_models`: after `lm_eval.api.registry` executes, register the `hallulens-*` aliases as
  lazy "module:Class" placeholders (nothing heavy is imported until a hallulens model is
  requested). `lm_eval.models` is imported first so that the registry never holds only our names
  (lm-eval imports its built-in models only when the registry is empty).
- `add_task_dir`: after `lm_eval.tasks` executes, make `TaskManager` index our task directory
  before any `--include_path`, so a user's own paths still take precedence.
- `pool_group_rows`: after `lm_eval.api.group` executes, make group rows of HalluLens rates the
  pooled ratio over items (see `hallulens_tasks.judging.group_rows`).

Releases that read the `lm_eval.models` entry points (pyproject.toml) register the models
themselves, and then the registry is left alone.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

MODELS = {
    "hallulens-hf": "hallulens_models.hf_lm:HalluLensHFLM",
    "hallulens-gguf": "hallulens_models.gguf_lm:HalluLensGGUFLM",
    "hallulens-vllm": "hallulens_models.vllm_lm:HalluLensVLLM",
}


def task_dir() -> str:
    """Directory of our task YAMLs (the `hallulens_tasks` package), found without importing it."""
    spec = importlib.util.find_spec("hallulens_tasks")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("hallulens_tasks is not installed")
    return next(iter(spec.submodule_search_locations))


def register_models(registry: ModuleType) -> None:
    if hasattr(registry, "load_plugins"):  # this lm-eval reads our entry points itself
        return
    import lm_eval.models  # noqa: F401  (built-ins first: see module docstring)

    for alias, target in MODELS.items():
        if alias not in registry.model_registry:
            registry.model_registry.register(alias, target=target)


def add_task_dir(tasks: ModuleType) -> None:
    manager = tasks.TaskManager
    if getattr(manager.__init__, "_hallulens", False):
        return
    original = manager.__init__

    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        paths = include_path
        if include_defaults:
            if include_path is None:
                user: list = []
            elif isinstance(include_path, (list, tuple)):
                user = list(include_path)
            else:
                user = [include_path]
            paths = [task_dir(), *user]
        original(self, verbosity, paths, include_defaults, metadata)
        self.include_path = include_path

    __init__._hallulens = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    manager.__init__ = __init__


def pool_group_rows(group: ModuleType) -> None:
    from hallulens_tasks.judging.group_rows import pool_groups

    if hasattr(group, "Group"):  # lm-eval releases before 0.4.11 aggregate groups elsewhere
        pool_groups(group.Group)
