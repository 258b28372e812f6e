"""Engine-neutral capture: spec, record format, the LMDB store and its readers."""

from hallulens_capture.errors import (
    HalluLensError,
    RecordConflictError,
    RecordFormatError,
    StoreError,
)
from hallulens_capture.keys import prompt_hash, record_key
from hallulens_capture.record import Record
from hallulens_capture.store import ActivationStore, open_store

__all__ = [
    "ActivationStore",
    "HalluLensError",
    "Record",
    "RecordConflictError",
    "RecordFormatError",
    "StoreError",
    "open_store",
    "prompt_hash",
    "record_key",
]
