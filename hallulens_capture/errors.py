"""Exceptions with messages a user can act on; the CLIs print them as one line."""


class HalluLensError(Exception):
    """Base of every error this project raises on purpose."""


class CaptureConfigError(HalluLensError, ValueError):
    """A capture option (model_args or environment) is malformed or out of range."""


class ModelFilesError(HalluLensError, FileNotFoundError):
    """Model files the user asked for are missing or unusable."""


class StoreError(HalluLensError):
    """The activation store cannot be opened, read or written."""


class ShardBusyError(StoreError):
    """Another writer holds the shard: another process, or (`ours`) another open store of this
    process."""

    def __init__(self, message: str, ours: bool):
        super().__init__(message)
        self.ours = ours


class RecordFormatError(StoreError):
    """A stored value is not a valid record; `problem` is the message without the key (what
    `verify` prints after the key)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"record {key}: {problem}")
        self.problem = problem


class CaptureError(HalluLensError, RuntimeError):
    """The engine did not give what capture needs; nothing is stored rather than garbage."""


class Interrupted(HalluLensError):
    """The user stopped a long step (Ctrl-C); what was done so far is kept."""


class RecordConflictError(RecordFormatError):
    """A key held by two environments of one store (two writers made the same record): which one
    is right is unknown, so neither is read. A RecordFormatError so that every command that
    reports bad records reports a conflict the same way (`verify` lists them all)."""
