"""Download source files into a cache: resumable, checksum-checked, atomic, stdlib only.

Upstream fetched every source with bare `curl`/`requests` and no checks, so a cut connection
left a truncated file that later runs took as complete. Here a download goes to `<name>.part`,
resumes with an HTTP Range request (and `If-Range`, so a file that changed on the server is
fetched afresh rather than spliced), is checked against its sha256 when one is known, and only
then is renamed into place. A file lock keeps two parallel runs from writing the same `.part`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from hallulens_tasks.generation.errors import ChecksumError, DownloadError

ENV_SOURCE_CACHE = "HALLULENS_SOURCE_CACHE"
USER_AGENT = "lm-eval-hallulens (hallulens generate)"
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def source_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """`override`, else `$HALLULENS_SOURCE_CACHE`, else `<hallulens cache>/sources`.

    The hallulens cache is `$HALLULENS_CACHE_DIR`, `$XDG_CACHE_HOME/lm-eval-hallulens` or
    `~/.cache/lm-eval-hallulens`, the same root the embedded model uses.
    """
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_SOURCE_CACHE):
        return Path(os.environ[ENV_SOURCE_CACHE]).expanduser()
    from hallulens_models.embedded import cache_dir

    return cache_dir() / "sources"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


class _Progress:
    """One progress line on stderr (or `stream`), redrawn at most every `interval` seconds."""

    def __init__(self, label: str, stream: TextIO | None, interval: float = 0.5):
        self.label = label
        self.stream = stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        # a log file gets a line every 10 s instead of a redraw twice a second
        self.interval = interval if self.tty else max(interval, 10.0)
        self.total: int | None = None
        self.last = 0.0

    def _line(self, done: int) -> str:
        if self.total:
            percent = 100 * done // self.total
            return f"{self.label}: {done:,} / {self.total:,} bytes ({percent}%)"
        return f"{self.label}: {done:,} / ? bytes"

    def _write(self, done: int, final: bool = False) -> None:
        if self.stream is None:
            return
        end = "\n" if final or not self.tty else ""
        start = "\r" if self.tty else ""
        self.stream.write(f"{start}{self._line(done)}{end}")
        self.stream.flush()

    def start(self, done: int, total: int | None) -> None:
        self.total = total
        self.last = time.monotonic()
        self._write(done)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(done)

    def finish(self, done: int) -> None:
        self._write(done, final=True)


def _stream(progress: bool | TextIO) -> TextIO | None:
    if progress is True:
        return sys.stderr
    return progress or None


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    lock_path = dest.with_name(dest.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Target:
    """What is being downloaded, and what the error messages tell the user about it."""

    def __init__(self, url: str, dest: Path, source: str | None):
        self.url = url
        self.dest = dest
        self.part = dest.with_name(dest.name + ".part")
        self.meta = dest.with_name(dest.name + ".part.json")
        self.source = source

    def failed(self, reason: str, partial: int = 0) -> DownloadError:
        what = self.source or self.dest.name
        message = (
            f"cannot download {what} from {self.url} ({reason}). Download it yourself and "
            f"save it as {self.dest}"
        )
        if self.source:
            message += f", or pass --source {self.source}=PATH"
        if partial:
            message += f"; {partial:,} bytes are kept in {self.part} and the next run resumes"
        return DownloadError(message)


def _validator(headers) -> str | None:
    """A strong validator for If-Range (weak ETags are not allowed there)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _read_meta(target: _Target) -> str | None:
    """The If-Range validator saved with a `.part`; None also when it was for another URL."""
    try:
        meta = json.loads(target.meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("url") != target.url:
        return None
    return meta.get("validator")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None where absent or `*`."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


def _restart(target: _Target) -> None:
    target.part.unlink(missing_ok=True)
    target.meta.unlink(missing_ok=True)


def _fetch(target: _Target, progress: _Progress, timeout: float, chunk_size: int) -> None:
    """Bring `target.part` up to the whole file, resuming what is there when the server can."""
    offset = target.part.stat().st_size if target.part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _read_meta(target)
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(target.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing after `offset`: complete, or a stale part
            _, total = _content_range(exc.headers.get("Content-Range"))
            exc.close()
            if total == offset:
                return
            _restart(target)
            return _fetch(target, progress, timeout, chunk_size)
        raise target.failed(_reason(exc), offset) from None
    except (OSError, http.client.HTTPException) as exc:
        raise target.failed(_reason(exc), offset) from None

    with response:
        first, total = _content_range(response.headers.get("Content-Range"))
        if response.status == 206 and (not offset or first != offset):
            # a range we did not ask for: drop the part and fetch the whole file
            response.close()
            _restart(target)
            if not offset:
                raise target.failed("the server sent part of the file when asked for all of it")
            return _fetch(target, progress, timeout, chunk_size)
        if response.status == 206:
            mode = "ab"
        else:  # a fresh download, or a server that ignored Range / If-Range said "changed"
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            target.meta.write_text(
                json.dumps({"url": target.url, "validator": _validator(response.headers)}),
                encoding="utf-8",
            )
        done = offset
        progress.start(done, total)
        try:
            with open(target.part, mode) as out:
                while True:
                    try:
                        block = response.read(chunk_size)
                    except (OSError, http.client.HTTPException) as exc:
                        out.flush()
                        raise target.failed(_reason(exc), done) from None
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    progress.update(done)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # the disk, not the network (those became DownloadError above)
            raise DownloadError(f"cannot write {target.part}: {exc}") from None
    progress.finish(done)
    if total is not None and done != total:
        raise target.failed(f"connection closed after {done:,} of {total:,} bytes", done)


def _verify(path: Path, expected: str, target: _Target) -> None:
    got = sha256_file(path)
    if got != expected:
        bad = target.dest.with_name(target.dest.name + ".bad")
        os.replace(path, bad)
        target.meta.unlink(missing_ok=True)
        raise ChecksumError(
            f"{target.dest}: sha256 mismatch: expected {expected}, got {got}; the file was "
            f"moved to {bad}. Run again to download it afresh from {target.url}"
        )


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    source: str | None = None,
    progress: bool | TextIO = True,
    timeout: float = 60.0,
    chunk_size: int = _CHUNK,
) -> Path:
    """Make `dest` hold the file at `url`; a file already there is reused (checked if `sha256`).

    `source` is the source name that errors offer as `--source NAME=PATH`. `progress` is True
    (stderr), False, or a stream.
    """
    dest = Path(dest)
    target = _Target(url, dest, source)
    expected = sha256.lower() if sha256 else None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the source cache {dest.parent}: {exc}") from None
    with _locked(dest):
        if dest.is_file():
            if expected:
                _verify(dest, expected, target)
            return dest
        _fetch(target, _Progress(source or dest.name, _stream(progress)), timeout, chunk_size)
        if expected:
            _verify(target.part, expected, target)
        os.replace(target.part, dest)
        target.meta.unlink(missing_ok=True)
    return dest
