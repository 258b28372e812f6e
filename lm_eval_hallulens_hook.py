"""Start-up hook of lm-eval-hallulens, imported by `lm_eval_hallulens.pth` in every interpreter.

lm-eval up to 0.4.13 has no plugin discovery. This module only puts a finder on
`sys.meta_path` that answers None for every module except `lm_eval.api.registry`,
`lm_eval.tasks` and `lm_eval.api.group`; when one of those has executed,
`hallulens_models.registration` registers our models or task directory, or makes group rows
pool HalluLens rates over items. Nothing else is imported here: this runs at every interpreter
start.
"""

import sys

_AFTER_IMPORT = {
    "lm_eval.api.registry": "register_models",
    "lm_eval.tasks": "add_task_dir",
    "lm_eval.api.group": "pool_group_rows",
}


def _then(module):
    from hallulens_models import registration

    getattr(registration, _AFTER_IMPORT[module.__name__])(module)


class _ThenLoader:
    """Delegates to the real loader, then hands the executed module to `_then`."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _then(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Meta path finder that only ever answers for the two lm-eval modules above."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenLoader(spec.loader)
                return spec
        return None


def install():
    """Put the finder on sys.meta_path, or act at once on modules imported already."""
    for name in _AFTER_IMPORT:
        if name in sys.modules:
            _then(sys.modules[name])
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
