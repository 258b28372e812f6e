"""Hand-over files: how a vLLM worker passes a finished request's rows to the front end.

Each tagged request gets a file in shared memory holding its rows token-major, [capacity,
layers, hidden] in the storage dtype (a request's rows of one step are one run of bytes, written
with one `pwrite`; positions never computed take no memory: the file is sparse), its token
statistics appended after them when it is collected. The front end maps the file; nothing is
copied on the way.

Files are reused. Writing into fresh shared-memory pages costs a page allocation per 4 KiB,
and freeing them again when the record is written (here ~30 ms per 60 MB of rows on the
worker's helper thread and ~9 ms on the front end). So the worker keeps its files in a directory
of its own, and the front end, once a file's last mapped view is gone (the record encoded),
cuts it back to the rows its request wrote and renames it `free-*` instead of deleting it; the
worker's next request takes a free file whose pages are already there. Token-major rows make
that work for requests of any length: each uses a prefix of its file. The worker keeps at most
as many free files as it has had requests in flight at once, so the free files hold about the
rows of as many requests as ran at once (those of the last ones to finish).

A worker's directory holds a lock file it keeps locked while alive (the directory gets its name
only once locked); a worker starting up, and a server's front end when it exits, remove the
directories whose lock nobody holds (left by a killed worker) or whose lock is gone (a removal
that raced a release) — a lock, not a pid, because containers sharing /dev/shm do not share pid
numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable

import numpy as np

from hallulens_capture import locks
from hallulens_capture.errors import CaptureError

PREFIX = "hallulens-vllm-"  # a worker's directory: PREFIX + pid + "-" + a random part
FREE = "free-"  # a released file, ready for reuse
LOCK = ".lock"


def shared_memory() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def remove_stale(root: str) -> list[str]:
    """Remove the worker directories under `root` whose lock nobody holds (a killed worker's)
    or whose lock is gone (a removal that raced a release); return them."""
    removed = []
    for entry in os.scandir(root):
        if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        if locks.held(os.path.join(entry.path, LOCK)) is False:  # None: another user's
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def directories_of(pids: Iterable[int]) -> list[str]:
    """The hand-over directories of these processes (a server's engine processes)."""
    names = tuple(f"{PREFIX}{pid}-" for pid in pids)
    return [e.path for e in os.scandir(shared_memory()) if e.name.startswith(names)]


def remove_when_gone(directories: Iterable[str], wait: float = 3.0) -> None:
    """Remove these workers' directories once their workers are gone, and any other stale one.
    For a front end at exit: `vllm serve`, stopping, force-kills its worker, maybe while the
    worker removes its own directory; the kernel drops the worker's lock once it has finished
    the process, so a lock still held is waited for, `wait` seconds at most in all."""
    deadline = time.monotonic() + wait
    for directory in list(directories):
        while locks.held(os.path.join(directory, LOCK)) and time.monotonic() < deadline:
            time.sleep(0.02)
    remove_stale(shared_memory())


def _remove(directory: str, lock: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    os.close(lock)


def release(path: str, keep: int) -> None:
    """Give a hand-over file back to its worker's pool, cut to its first `keep` bytes (the rows
    its request wrote: what the next request reuses; nothing if the worker is gone)."""
    free = os.path.join(os.path.dirname(path), f"{FREE}{uuid.uuid4().hex}.bin")
    with contextlib.suppress(FileNotFoundError):
        os.truncate(path, keep)
        os.rename(path, free)


class HandoverPool:
    """One worker's hand-over files: its directory, its lock, the released files it reuses."""

    def __init__(self, root: str | None = None) -> None:
        root = root or shared_memory()
        remove_stale(root)
        # readable by this user only (activations), a name of its own even in the same process,
        # and locked before it gets the name other workers' `remove_stale` looks at
        making = tempfile.mkdtemp(prefix=f".{PREFIX}{os.getpid()}-", dir=root)
        lock = os.open(os.path.join(making, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        fcntl.flock(lock, fcntl.LOCK_EX)
        self.directory = os.path.join(root, os.path.basename(making)[1:])
        os.rename(making, self.directory)
        self.most = 0  # most files in use at once: the pool keeps no more free ones
        # at close, exit or when the pool goes: the directory goes, with any file not collected
        self._finalizer = weakref.finalize(self, _remove, self.directory, lock)

    def _free(self) -> list[str]:
        return [e.path for e in os.scandir(self.directory) if e.name.startswith(FREE)]

    def open(self, shape: list[int], storage: np.dtype, first: int) -> Handover:
        """A file for a request, a released one where there is one. Names are never reused (a
        client may repeat a request id while the front end still holds the earlier file)."""
        path = os.path.join(self.directory, f"{uuid.uuid4().hex}.bin")
        for free in self._free():
            try:
                os.rename(free, path)
                break
            except FileNotFoundError:
                continue
        return Handover(path, shape, storage, first)

    def close(self) -> None:
        """Remove the directory now (a worker process may end without running atexit: vLLM's
        engine processes end through multiprocessing's `os._exit`)."""
        self._finalizer()

    def trim(self, in_use: int) -> None:
        """Delete the free files beyond the most ever in use at once (with `in_use` now)."""
        self.most = max(self.most, in_use)
        for path in self._free()[self.most :]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Handover:
    """One tagged request's hand-over file, as the worker writes it (module docstring).

    Written with `pwrite`, not through a map: through a map every 4 KiB of a fresh file is a
    page fault (writing took ~1.8 x as long here), and a full /dev/shm a SIGBUS that kills the
    worker instead of an error."""

    def __init__(self, path: str, shape: list[int], storage: np.dtype, first: int) -> None:
        self.path = path
        self.first = first  # the position of row 0
        self.shape = shape
        self.row_bytes = int(np.prod(shape[1:])) * storage.itemsize
        self.filled = np.zeros(shape[0], dtype=np.int32)  # times each row was written
        # why the request's rows cannot be handed over (a full /dev/shm): its call fails at
        # collect time, the engine goes on with the other requests
        self.failed: str | None = None
        self._fd: int | None = None
        try:  # no size set: rows and statistics go where they belong, the rest stays a hole
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        except OSError as exc:
            self.failed = _cannot_write(path, exc)

    @property
    def stats_offset(self) -> int:
        return self.shape[0] * self.row_bytes

    def write(self, at: int, data: np.ndarray) -> None:
        """`data` (C-contiguous) at row `at`, or past the rows (`at` = capacity: statistics)."""
        if self.failed:
            raise CaptureError(self.failed)
        view, offset = memoryview(data.reshape(-1).view(np.uint8)), at * self.row_bytes
        try:
            while view:
                done = os.pwrite(self._fd, view, offset)  # type: ignore[arg-type]
                view, offset = view[done:], offset + done
        except OSError as exc:
            raise CaptureError(_cannot_write(self.path, exc)) from None

    def close(self) -> None:
        """Close the file (its data stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close the file and give it back to the pool."""
        self.close()
        written = np.flatnonzero(self.filled)
        release(self.path, (int(written[-1]) + 1 if len(written) else 0) * self.row_bytes)


def _cannot_write(path: str, exc: OSError) -> str:
    return (
        f"cannot write captured rows to {path}: {exc.strerror} (is "
        f"{os.path.dirname(os.path.dirname(path))} full? it holds the rows of each running "
        "request)"
    )


def read(item: dict, storage: np.dtype, topk: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The front end's view of a collected file (`LayerRows.collect`'s item): its rows as
    [layers, rows, hidden] (None when it keeps none) and its token statistics [n, 2 + 2k] (None
    with topk 0), both views of one read-only map. The file goes back to its worker's pool when
    the last view of it is gone."""
    _, layers, hidden = item["shape"]
    at, count = item["rows"]
    offset, n = item["stats"]
    width = 2 + 2 * topk
    whole = np.memmap(item["path"], np.uint8, "r")
    row_bytes = layers * hidden * storage.itemsize
    weakref.finalize(whole, release, item["path"], (at + count) * row_bytes)
    rows = stats = None
    if count:  # the file holds no more than the rows written (and the statistics after them)
        data = whole[at * row_bytes : (at + count) * row_bytes].view(storage)
        rows = data.reshape(count, layers, hidden).transpose(1, 0, 2)
    if topk:
        stats = whole[offset : offset + n * width * 4].view(np.float32).reshape(n, width)
    return rows, stats
