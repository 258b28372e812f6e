"""A torch `Dataset` over an npy export: one sample per row, read from the memory map on demand
(each DataLoader worker opens the arrays itself, so nothing big is copied between processes)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from hallulens_analysis.errors import SelectionError
from hallulens_analysis.npy_export import NpyExport
from hallulens_analysis.selection import Selection


class ExportDataset(Dataset):
    """Samples of one reduction of an npy export, as dicts of tensors:
    `x` [layers, (W,) hidden] in the export's dtype, `y`, `mask` [W] for windows, `length`
    (generated tokens), `group` (question id) and `row` (of the export).

    `layers` selects among the exported layers (capture syntax). With `target`, `y` follows that
    target and rows outside it are left out; without, `y` is the export's (-1 outside its target).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        reduction: str = "mean",
        layers: object = "all",
        target: str | None = None,
    ):
        export = NpyExport(path)
        selection = Selection.parse(layers, [reduction], target=target or "hallucination")
        reduction_ = selection.reductions[0]
        if reduction_.name not in export.reductions:
            raise SelectionError(
                f"reduction {reduction_.name} is not in {export.path} "
                f"(it holds {', '.join(export.reductions)})"
            )
        self.path = export.path
        self._name = reduction_.slug
        self._window = bool(reduction_.window)
        self.layer_ids = list(selection.layer_ids(export.layer_ids))
        self._slots = [export.layer_ids.index(layer) for layer in self.layer_ids]
        y = np.load(export.path / "y.npy")
        if target is not None:
            y = np.array([selection.target.y(r["label"]) for r in export.index], dtype=np.int8)
        self.rows = np.flatnonzero(y >= 0) if target is not None else np.arange(len(y))
        self.y = y[self.rows]
        self.groups = np.load(export.path / "groups.npy")[self.rows]
        self.lengths = np.load(export.path / "lengths.npy")[self.rows]
        self._x: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        if self._x is None:  # opened in the process that reads (DataLoader workers)
            self._x = np.load(self.path / f"{self._name}.npy", mmap_mode="r")
            if self._window:
                self._mask = np.load(self.path / f"{self._name}.mask.npy", mmap_mode="r")
        row = int(self.rows[i])
        item: dict[str, torch.Tensor | int] = {
            "x": torch.from_numpy(np.ascontiguousarray(self._x[row, self._slots])),
            "y": int(self.y[i]),
            "length": int(self.lengths[i]),
            "group": int(self.groups[i]),
            "row": row,
        }
        if self._mask is not None:
            item["mask"] = torch.from_numpy(np.array(self._mask[row]))
        return item
