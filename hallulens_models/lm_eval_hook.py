"""Make the stock `lm_eval` CLI see our models and tasks, at no cost to unrelated processes.

lm-eval up to 0.4.13 has no plugin discovery, so `lm_eval_hallulens.pth` imports this module at
interpreter start. It only puts a finder on `sys.meta_path` that answers `None` for every module
except two lm-eval modules; when one of those finishes executing, it does the registration:

- `lm_eval.api.registry`: register the `hallulens-*` aliases as lazy "module:Class" placeholders
  (nothing heavy is imported until a hallulens model is requested). `lm_eval.models` is imported
  first so that the registry is never left holding only our names (lm-eval imports its built-in
  models only when the registry is empty).
- `lm_eval.tasks`: make `TaskManager` index our task directory before any `--include_path`, so
  a user's own paths still take precedence.

Releases that read the `lm_eval.models` entry points (declared in pyproject.toml) get the models
that way, and the hook leaves the registry alone.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: this module runs at every interpreter start
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import ModuleType

MODELS = {"hallulens-hf": "hallulens_models.hf:HalluLensHFLM"}


def task_dir() -> str:
    """Directory of our task YAMLs (the `hallulens_tasks` package), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("hallulens_tasks")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("hallulens_tasks is not installed")
    return next(iter(spec.submodule_search_locations))


def _register_models(registry: ModuleType) -> None:
    if hasattr(registry, "load_plugins"):  # this lm-eval reads our entry points itself
        return
    import lm_eval.models  # noqa: F401  (built-ins first: see module docstring)

    for alias, target in MODELS.items():
        if alias not in registry.model_registry:
            registry.model_registry.register(alias, target=target)


def _add_task_dir(tasks: ModuleType) -> None:
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


_AFTER_IMPORT: dict[str, Callable[[ModuleType], None]] = {
    "lm_eval.api.registry": _register_models,
    "lm_eval.tasks": _add_task_dir,
}


class _ThenLoader:
    """Delegates to the real loader, then runs a callback on the executed module."""

    def __init__(self, loader, then: Callable[[ModuleType], None]):
        self._loader = loader
        self._then = then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _Finder:
    """A meta path finder that only ever answers for the modules in `_AFTER_IMPORT`."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target=None):
        then = _AFTER_IMPORT.get(fullname)
        if then is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenLoader(spec.loader, then)
                return spec
        return None


def install() -> None:
    """Put the finder on sys.meta_path, or act at once for modules imported already."""
    for name, then in _AFTER_IMPORT.items():
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__spec__", None) is not None:
            then(module)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
