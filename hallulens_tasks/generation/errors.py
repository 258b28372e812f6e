"""Errors of `hallulens generate`; each message is one line the CLI prints as is."""

from __future__ import annotations

from hallulens_capture.errors import HalluLensError


class GenerationError(HalluLensError):
    """A prompt set cannot be built."""


class SourceError(GenerationError, ValueError):
    """A source data file is missing, unreadable or malformed."""


class DownloadError(SourceError):
    """A source could not be downloaded; the message says where to put it by hand."""


class ChecksumError(DownloadError):
    """A downloaded or cached file does not have the sha256 it must have."""


class NotEnoughNamesError(GenerationError):
    """Fewer new names exist (or were found in the attempts allowed) than were asked for."""
