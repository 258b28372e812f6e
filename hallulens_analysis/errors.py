"""Errors of the analysis tools; each is one line a user can act on (the CLI prints it)."""

from hallulens_capture.errors import HalluLensError


class SelectionError(HalluLensError, ValueError):
    """A selection (layers, reductions, records, target) that the data cannot satisfy."""


class ExportError(HalluLensError):
    """An export cannot be written, resumed or read."""


class ProbeError(HalluLensError):
    """The probe cannot be fitted on the selected data (too few questions, one class, ...)."""
