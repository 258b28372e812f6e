"""The `hf` export: a `datasets` dataset on disk with fixed-shape array columns.

`datasets.load_from_disk(DIR)` opens it memory-mapped; `push_to_hub` publishes it as is. One row
per selected record: key, group (question id), task, doc_id, label, y, model, prompt, response,
n_prompt, n_generated, one array column per reduction (`mean`, `last_prompt`, `window_64` ...;
[layers, hidden] or [layers, W, hidden], float16 unless asked otherwise), `window_64_mask`
for windows, and the logprob baselines when every record has them. The selection, layer ids
and counts are in the dataset's description (JSON).

Rows are streamed into one Arrow file under `DIR.partial/`, which `save_to_disk` turns into the
dataset; only a finished dataset is renamed to DIR. A killed export starts over on the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hallulens_analysis.errors import ExportError
from hallulens_analysis.npy_export import export_dtype, partial_dir
from hallulens_analysis.plan import Plan
from hallulens_analysis.reading import BUDGET_BYTES, stream
from hallulens_capture.store import ActivationStore


def column(slug: str) -> str:
    """Column name of a reduction: `last-prompt` -> `last_prompt`, `window-64` -> `window_64`."""
    return slug.replace("-", "_")


def export_hf(
    store: ActivationStore,
    plan: Plan,
    out: str | os.PathLike,
    *,
    dtype: str = "float16",
    progress: bool = False,
    budget_bytes: int = BUDGET_BYTES,
) -> Path:
    """Write the plan as a dataset at `out` (which must not exist); returns its path."""
    from datasets import Array2D, Array3D, Dataset, DatasetInfo, Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    out = Path(out)
    kind = export_dtype(dtype)
    if out.exists():
        raise ExportError(f"{out} exists: remove it or choose another --out")
    staging = partial_dir(out)
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftovers
    staging.mkdir(parents=True)
    baselines = sorted(set.intersection(*(set(i.scores) for i in plan.items)))
    spec = {
        "key": Value("string"),
        "group": Value("int64"),
        "task": Value("string"),
        "doc_id": Value("int64"),
        "label": Value("string"),
        "y": Value("int8"),
        "model": Value("string"),
        "prompt": Value("string"),
        "response": Value("string"),
        "n_prompt": Value("int32"),
        "n_generated": Value("int32"),
        **{name: Value("float64") for name in baselines},
    }
    for r in plan.selection.reductions:
        array = Array3D if r.window else Array2D
        spec[column(r.slug)] = array(shape=plan.shape(r), dtype=dtype)
        if r.window:
            spec[f"{column(r.slug)}_mask"] = Sequence(Value("bool"), length=r.window)
    features = Features(spec)
    groups = plan.groups()
    arrow = staging / "rows.arrow"
    with ArrowWriter(features=features, path=str(arrow)) as writer:
        for batch in stream(store, plan, dtype=kind, budget_bytes=budget_bytes, progress=progress):
            items = plan.items[batch.rows]
            rows: dict[str, object] = {
                "key": [i.key for i in items],
                "group": groups[batch.rows],
                "task": [i.task for i in items],
                "doc_id": [i.doc_id for i in items],
                "label": [i.label for i in items],
                "y": [i.y for i in items],
                "model": [i.model for i in items],
                "prompt": [i.prompt for i in items],
                "response": [i.response for i in items],
                "n_prompt": [i.n_prompt for i in items],
                "n_generated": [i.n_generated for i in items],
                **{name: [i.scores[name] for i in items] for name in baselines},
            }
            for slug, values in batch.features.items():
                rows[column(slug)] = values
            for slug, values in batch.masks.items():
                rows[f"{column(slug)}_mask"] = values
            writer.write_batch(rows)
        writer.finalize()
    description = {
        "format": "hallulens-hf/1",
        "selection": plan.selection.as_dict(),
        "layer_ids": list(plan.layer_ids),
        "labels": plan.label_counts(),
        "excluded": plan.excluded,
    }
    info = DatasetInfo(description=json.dumps(description), features=features)
    dataset = Dataset.from_file(str(arrow), info=info)
    dataset.save_to_disk(str(staging / "dataset"))
    del dataset
    os.rename(staging / "dataset", out)
    shutil.rmtree(staging)
    return out
