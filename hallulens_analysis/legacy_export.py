"""The `legacy` export: the seed's pickled LMDB layout (value schema v2), for old scripts.

This is the only place in the project that writes pickle. DIR is an LMDB environment whose
default database maps each record key to `pickle({"data": data, "metadata": {"compression":
"none"}})`, where `data` holds `prompt`, `response`, `input_length` (prompt tokens), `model`,
`trim_position` (None) and `all_layers_activations`: a list indexed by layer id, one CPU torch
tensor [1, tokens, hidden] per selected layer (in the store's dtype), None for the others. The
side environment `DIR_metadata` maps the same key to the entry without activations, plus
`logging_config` ({target_layers, sequence_mode}), `timestamp` (seconds since the epoch),
`has_activations`, `compression_metadata`, and `task`, `doc_id`, `label`.

Tokens follow the seed's `sequence_mode`: capture_tokens `all` -> `all` (positions 0..P+G-2,
so `act[:, input_length:]` is the response), `prompt` -> `prompt`, `generated` -> `response`
(P..P+G-2); `response` records drop their first state (P-1) and become `response` too. The
value also carries the v0 fields `prompt`, `response` and `activations` (the last selected
layer; pickle stores that tensor once) so that the seed's `test_check_lmdb.py` prints them.
Keys are the store's: the bare sha256 of a prompt is its first sample.

Both environments are written under `DIR.partial/` and moved into place when complete, the
metadata first: DIR exists only once the export is whole. A killed export starts over.
"""

from __future__ import annotations

import os
import pickle
import shutil
from datetime import datetime
from pathlib import Path

import lmdb

from hallulens_analysis.errors import ExportError
from hallulens_analysis.npy_export import partial_dir
from hallulens_analysis.plan import Item, Plan
from hallulens_capture.record import Record
from hallulens_capture.store import ActivationStore

SEQUENCE_MODES = {"all": "all", "prompt": "prompt", "generated": "response", "response": "response"}
_TXN_BYTES = 256 << 20  # records per write transaction, by size


def metadata_path(out: Path) -> Path:
    """The seed's side environment: `<path>_metadata` next to `<path>`."""
    return out.with_name(out.name + "_metadata")


def _entry(record: Record, item: Item, plan: Plan) -> tuple[dict, dict]:
    """The main value and the metadata value of one record."""
    import torch

    rows = slice(1, None) if record.capture_tokens == "response" else slice(None)
    layers: list = [None] * (max(plan.layer_ids) + 1)
    for layer in plan.layer_ids:
        values = record.slice(layers=[layer], tokens=rows)
        tensor = torch.from_numpy(values)
        layers[layer] = tensor.to(torch.bfloat16) if record.storage_dtype == "BF16" else tensor
    data = {
        "prompt": item.prompt,
        "response": item.response,
        "input_length": item.n_prompt,
        "model": item.model,
        "trim_position": None,
        "all_layers_activations": layers,
    }
    every = list(plan.layer_ids) == list(range(len(layers)))
    metadata = {
        **{k: v for k, v in data.items() if k != "all_layers_activations"},
        "logging_config": {
            "target_layers": "all" if every else list(plan.layer_ids),
            "sequence_mode": SEQUENCE_MODES[record.capture_tokens],
        },
        "timestamp": datetime.fromisoformat(record.timestamp).timestamp(),
        "has_activations": True,
        "compression_metadata": {"compression": "none"},
        "task": item.task,
        "doc_id": item.doc_id,
        "label": item.label or None,
    }
    value = {
        "data": data,
        "metadata": {"compression": "none"},
        "prompt": item.prompt,
        "response": item.response,
        "activations": layers[plan.layer_ids[-1]],
    }
    return value, metadata


def _map_size(store: ActivationStore, plan: Plan) -> int:
    """Room for every record's selected layers, generously (LMDB's map is sparse on disk)."""
    total = 0
    for item in plan.items:
        record = store[item.key]
        total += record.nbytes * len(plan.layer_ids) // record.shape[0] + (64 << 10)
    return 2 * total + (64 << 20)


def export_legacy(
    store: ActivationStore, plan: Plan, out: str | os.PathLike, *, progress: bool = False
) -> Path:
    """Write the plan in the seed's layout at `out` (and `out`_metadata); returns `out`."""
    from tqdm.auto import tqdm

    out = Path(out)
    side = metadata_path(out)
    if out.exists():
        raise ExportError(f"{out} exists: remove it or choose another --out")
    if side.exists():  # a previous export was killed between its two renames
        shutil.rmtree(side)
    staging = partial_dir(out)
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftovers
    staging.mkdir(parents=True)
    size = _map_size(store, plan)
    envs = {
        name: lmdb.open(str(staging / name), map_size=size, subdir=True, sync=False)
        for name in ("main", "metadata")
    }
    try:
        pending: list[tuple[bytes, bytes, bytes]] = []
        for item in tqdm(plan.items, unit="rec", disable=not progress):
            value, metadata = _entry(store[item.key], item, plan)
            pending.append(
                (
                    item.key.encode(),
                    pickle.dumps(value, protocol=4),
                    pickle.dumps(metadata, protocol=4),
                )
            )
            if sum(len(p[1]) for p in pending) >= _TXN_BYTES:
                _commit(envs, pending)
        _commit(envs, pending)
        for env in envs.values():
            env.sync(True)
    finally:
        for env in envs.values():
            env.close()
    os.rename(staging / "metadata", side)
    os.rename(staging / "main", out)
    shutil.rmtree(staging)
    return out


def _commit(envs: dict, pending: list[tuple[bytes, bytes, bytes]]) -> None:
    with envs["main"].begin(write=True) as main, envs["metadata"].begin(write=True) as side:
        for key, value, metadata in pending:
            main.put(key, value)
            side.put(key, metadata)
    pending.clear()
