"""Names the HalluLens task YAMLs use as `!function utils.<name>` (resolved next to the YAML
on every lm-eval release; the code lives in the installed package)."""

from hallulens_tasks.judging.harness_filter import JudgeFilter, process_results
from hallulens_tasks.judging.scoring import median
from hallulens_tasks.prompt_sets import dataset

__all__ = ["JudgeFilter", "dataset", "median", "process_results"]
