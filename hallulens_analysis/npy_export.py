"""The `npy` export: fixed-shape arrays that `np.load(path, mmap_mode="r")` opens, with sidecars.

Files in DIR (N rows, one per selected record, in store order):
- `<reduction>.npy`: [N, layers, hidden], or [N, layers, W, hidden] for `window:W` (file name
  `window-W.npy`), float16 unless asked otherwise; `<reduction>.mask.npy`: [N, W] bool for
  windows, True where a state is (padding rows are zeros);
- `y.npy` int8 (1 / 0 against the target, -1 outside it or unlabelled), `groups.npy` int64 (one
  id per question), `lengths.npy` int32 (generated tokens G), `prompt_lengths.npy` int32;
- `index.jsonl`: per row: row, key, group, task, doc_id, label, y, model, prompt, response,
  n_prompt, n_generated, answer (token span), scores (logprob baselines, when records have them);
- `manifest.json`: format, selection, layer ids, arrays with shapes, counts, records left out.

Crash safety: the export is written under `DIR.partial/`. Rows are written in order; every
`commit_bytes` (1 GiB) and at the end the arrays are fsynced, then `progress.json` (rows done)
is replaced atomically. A rerun of
the same plan resumes after the last committed row (anything after it is written again); a rerun
with another plan starts over. Only a finished export is renamed to DIR, so no file under DIR
ever holds a row that looks written but is not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from hallulens_analysis.errors import ExportError
from hallulens_analysis.plan import Plan
from hallulens_analysis.reading import BUDGET_BYTES, stream
from hallulens_capture.store import ActivationStore

log = logging.getLogger(__name__)

FORMAT = "hallulens-npy/1"
# a commit (fsync, then progress.json) waits for the disk: committing after every 256 MB batch
# instead of once made an 865 MB export about 13 % slower (medians of 6 runs)
COMMIT_BYTES = 1 << 30
DTYPES = {"float16": np.float16, "float32": np.float32}


def export_dtype(name: str) -> type:
    if name not in DTYPES:
        raise ExportError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def partial_dir(out: Path) -> Path:
    """Where an unfinished export of `out` lives until it is complete."""
    return out.with_name(out.name + ".partial")


def _arrays(plan: Plan, dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """File name -> (dtype, shape) of every array written row by row."""
    n = len(plan.items)
    files = {}
    for r in plan.selection.reductions:
        files[f"{r.slug}.npy"] = (dtype, (n, *plan.shape(r)))
        if r.window:
            files[f"{r.slug}.mask.npy"] = ("bool", (n, r.window))
    return files


def _config(plan: Plan, dtype: str) -> dict:
    """What an export holds; equal configs mean a partial export may be resumed."""
    return {
        "format": FORMAT,
        "store": os.path.abspath(plan.store_path),
        "plan": plan.digest(),
        "selection": plan.selection.as_dict(),
        "layer_ids": list(plan.layer_ids),
        "hidden": plan.hidden,
        "dtype": dtype,
        "arrays": {
            name: {"dtype": kind, "shape": list(shape)}
            for name, (kind, shape) in _arrays(plan, dtype).items()
        },
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_json(path: Path, value: dict) -> None:
    """Write JSON so that `path` holds either the old or the new content, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _RowFiles:
    """The arrays of a partial export, open for writing rows at their offsets."""

    def __init__(self, staging: Path, files: dict[str, tuple[str, tuple[int, ...]]], fresh: bool):
        self._fds: dict[str, tuple[int, int, int]] = {}  # name -> fd, data offset, row bytes
        for name, (kind, shape) in files.items():
            path = staging / name
            if fresh:  # header plus a sparse body of zeros
                np.lib.format.open_memmap(path, mode="w+", dtype=kind, shape=shape).flush()
            array = np.load(path, mmap_mode="r")
            if array.shape != shape or array.dtype != np.dtype(kind):
                raise ExportError(f"{path}: shape {array.shape}, expected {shape}")
            row = array.dtype.itemsize * int(np.prod(shape[1:]))
            self._fds[name] = (os.open(path, os.O_RDWR), array.offset, row)

    def write(self, name: str, first: int, values: np.ndarray) -> None:
        fd, offset, row = self._fds[name]
        data = memoryview(np.ascontiguousarray(values)).cast("B")
        at = offset + first * row
        while data:
            done = os.pwrite(fd, data, at)
            data, at = data[done:], at + done

    def sync(self) -> None:
        for fd, _, _ in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd, _, _ in self._fds.values():
            os.close(fd)


def _begin(staging: Path, config: dict) -> int:
    """Rows already committed in `staging` for this config (0 for a fresh start)."""
    if staging.exists():
        try:
            same = json.loads((staging / "config.json").read_text()) == config
            done = json.loads((staging / "progress.json").read_text())["rows"]
        except (OSError, ValueError, KeyError):
            same, done = False, 0
        if same:
            log.warning("resuming the unfinished export %s after row %d", staging, done)
            return int(done)
        log.warning("%s holds an unfinished export of other settings: starting over", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _replace_json(staging / "config.json", config)
    return -1


def _index_rows(plan: Plan, groups: np.ndarray):
    for row, (item, group) in enumerate(zip(plan.items, groups, strict=True)):
        yield {
            "row": row,
            "key": item.key,
            "group": int(group),
            "task": item.task,
            "doc_id": item.doc_id,
            "label": item.label,
            "y": item.y,
            "model": item.model,
            "prompt": item.prompt,
            "response": item.response,
            "n_prompt": item.n_prompt,
            "n_generated": item.n_generated,
            "answer": list(item.answer) if item.answer else None,
            "scores": item.scores,
        }


def _finish(staging: Path, plan: Plan, config: dict) -> None:
    groups = plan.groups()
    sidecars = {
        "y.npy": np.array([i.y for i in plan.items], dtype=np.int8),
        "groups.npy": groups,
        "lengths.npy": np.array([i.n_generated for i in plan.items], dtype=np.int32),
        "prompt_lengths.npy": np.array([i.n_prompt for i in plan.items], dtype=np.int32),
    }
    for name, values in sidecars.items():
        with open(staging / name, "wb") as f:
            np.save(f, values)
            os.fsync(f.fileno())
    with open(staging / "index.jsonl", "w", encoding="utf-8") as f:
        for row in _index_rows(plan, groups):
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    manifest = {
        **config,
        "rows": len(plan.items),
        "labels": plan.label_counts(),
        "excluded": plan.excluded,
        "baselines": sorted(set.intersection(*(set(i.scores) for i in plan.items))),
    }
    _replace_json(staging / "manifest.json", manifest)
    for name in ("config.json", "progress.json"):
        (staging / name).unlink(missing_ok=True)


def export_npy(
    store: ActivationStore,
    plan: Plan,
    out: str | os.PathLike,
    *,
    dtype: str = "float16",
    progress: bool = False,
    budget_bytes: int = BUDGET_BYTES,
    commit_bytes: int = COMMIT_BYTES,
) -> Path:
    """Write (or resume, or confirm) the npy export of `plan` at `out`; returns its path.
    Rows are committed every `commit_bytes` written (a kill loses at most that much work)."""
    out = Path(out)
    kind = export_dtype(dtype)
    config = _config(plan, dtype)
    if out.exists():
        manifest = _read_manifest(out)
        if {k: manifest.get(k) for k in config} != config:
            raise ExportError(f"{out} holds another export: remove it or choose another --out")
        log.warning("%s is complete already for this selection: nothing to do", out)
        return out
    staging = partial_dir(out)
    done = _begin(staging, config)
    files = _RowFiles(staging, _arrays(plan, dtype), fresh=done < 0)
    pending = 0  # bytes written since the last commit
    batches = stream(
        store, plan, dtype=kind, start=max(done, 0), budget_bytes=budget_bytes, progress=progress
    )
    try:
        for batch in batches:
            for r in plan.selection.reductions:
                files.write(f"{r.slug}.npy", batch.start, batch.features[r.slug])
                pending += batch.features[r.slug].nbytes
                if r.window:
                    files.write(f"{r.slug}.mask.npy", batch.start, batch.masks[r.slug])
            if pending >= commit_bytes or batch.rows.stop == len(plan.items):
                files.sync()  # the rows are on disk before the progress says so
                _replace_json(staging / "progress.json", {"rows": batch.rows.stop})
                pending = 0
    finally:
        files.close()
    _finish(staging, plan, config)
    os.rename(staging, out)
    _fsync_dir(out.parent)
    return out


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: no manifest.json, not a finished npy export") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}/manifest.json: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r} is not {FORMAT}")
    return manifest


class NpyExport:
    """A finished npy export: its manifest, index rows and arrays (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists() and partial_dir(self.path).exists():
            raise ExportError(
                f"{self.path} is unfinished ({partial_dir(self.path).name}): run the export "
                "again to finish it"
            )
        self.manifest = _read_manifest(self.path)
        with open(self.path / "index.jsonl", encoding="utf-8") as f:
            self.index = [json.loads(line) for line in f]
        if len(self.index) != self.manifest["rows"]:
            raise ExportError(
                f"{self.path}: index.jsonl has {len(self.index)} rows, the manifest "
                f"{self.manifest['rows']}"
            )
        self.layer_ids: list[int] = self.manifest["layer_ids"]
        self.reductions: list[str] = self.manifest["selection"]["reductions"]

    def array(self, name: str) -> np.ndarray:
        """`name`'s array, memory-mapped read-only (`mean`, `window-64`, `window-64.mask`, `y`)."""
        path = self.path / f"{name.replace(':', '-')}.npy"
        if not path.exists():
            raise ExportError(f"{self.path} has no array {name!r} (it holds {self.reductions})")
        return np.load(path, mmap_mode="r")

    def read_layers(
        self,
        reduction: str,
        slots: list[int],
        rows: np.ndarray,
        budget_bytes: int = BUDGET_BYTES,
    ) -> np.ndarray:
        """float32 [len(rows), len(slots), ...] of some layer slots of some sorted rows, read in
        file order in chunks of about `budget_bytes`; only those layers' bytes are read."""
        array = self.array(reduction)
        per_row = 4 * len(slots) * int(np.prod(array.shape[2:]))
        chunk = max(1, budget_bytes // per_row)
        out = np.empty((len(rows), len(slots), *array.shape[2:]), dtype=np.float32)
        run = slice(slots[0], slots[0] + len(slots))
        columns = run if slots == list(range(run.start, run.stop)) else slots  # a view: no gather
        for lo in range(0, len(array), chunk):
            a, b = np.searchsorted(rows, [lo, lo + chunk])
            if a < b:
                block = array[lo : lo + chunk, columns]
                out[a:b] = block if b - a == len(block) else block[rows[a:b] - lo]
        return out
