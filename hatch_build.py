"""Hatchling build hook: ship the lm-eval import hook's .pth file in editable installs too.

`force-include` in pyproject.toml covers regular wheels; editable wheels take their extra files
from `force_include_editable`.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if version == "editable":
            build_data["force_include_editable"]["lm_eval_hallulens.pth"] = "lm_eval_hallulens.pth"
