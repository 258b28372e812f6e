"""From the activation store to a detector: selections, arrays, exports, probes and audits.

Importing this package is cheap: scikit-learn, matplotlib, datasets and torch load only inside
the functions that use them (`ExportDataset`, the torch dataset, is imported on first use).
"""

from hallulens_analysis.audit import audit
from hallulens_analysis.errors import ExportError, ProbeError, SelectionError
from hallulens_analysis.hf_export import export_hf
from hallulens_analysis.legacy_export import export_legacy
from hallulens_analysis.npy_export import NpyExport, export_npy
from hallulens_analysis.plan import Item, Plan, build_plan
from hallulens_analysis.probe import ProbeSettings, features, run_probe
from hallulens_analysis.reading import Arrays, Batch, collect, stream
from hallulens_analysis.selection import Reduction, Selection, Target
from hallulens_capture.store import open_store

__all__ = [
    "Arrays",
    "Batch",
    "ExportDataset",
    "ExportError",
    "Item",
    "NpyExport",
    "Plan",
    "ProbeError",
    "ProbeSettings",
    "Reduction",
    "Selection",
    "SelectionError",
    "Target",
    "audit",
    "build_plan",
    "collect",
    "export_hf",
    "export_legacy",
    "export_npy",
    "features",
    "open_store",
    "run_probe",
    "stream",
]


def __getattr__(name: str):
    if name == "ExportDataset":  # needs torch
        from hallulens_analysis.torch_dataset import ExportDataset

        return ExportDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
