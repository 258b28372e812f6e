"""The LMDB activation store: one record per generation, many readers, one writer per environment.

A store is a directory holding up to two kinds of LMDB environment (`data.mdb`, `lock.mdb`):
the root environment in the directory itself (what a single process writes) and shards,
`shards/NAME/`, one per writing process of a run spread over processes, nodes or jobs (`rank3`,
`job2`, `job2-rank1`). A shard is only ever written by the one process that holds its
`writer.lock`; `complete.json` in it says its writer finished. Readers see every environment of
the store as one mapping; a key in two of them is a conflict, reported, never shadowed.

Each environment has named sub-databases: `records` (key -> record bytes, see record.py), `info`
(`format` marker) and, once a run is judged, `labels` (record key -> JSON verdict; records
themselves are never rewritten). Writes are one transaction per record, so a killed writer leaves
every committed record whole. The map grows on `MapFullError` and the write is retried; readers
in other processes pick the new size up.
`sync=False`: a committed record survives the writer process being killed (the kernel has it);
only a machine crash before the next `sync()` (after each harness request batch, and on close)
may lose the last ones. `start_writeback()` has the kernel begin writing committed pages out in
between, so that the disk works while the engine does.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import itertools
import json
import logging
import mmap
import os
import re
import shutil
import socket
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import lmdb
import numpy as np

from hallulens_capture import locks
from hallulens_capture.errors import RecordConflictError, ShardBusyError, StoreError
from hallulens_capture.keys import shown_key
from hallulens_capture.lmdbfile import LayoutError, check_data_file, read_meta, value_spans
from hallulens_capture.record import (
    STORAGE_DTYPES,
    Layout,
    Record,
    activation_layout,
    bf16_to_f32,
    layer_rows,
)
from hallulens_capture.spec import DEFAULT_MAP_SIZE_GB

log = logging.getLogger(__name__)

STORE_FORMAT = b"hallulens-activations/1"
_RECORDS = b"records"
_INFO = b"info"
_LABELS = b"labels"
_MAX_DBS = 8
_MAX_READERS = 1024
_GIB = 1 << 30

# py-lmdb refuses to open one environment twice in a process: share it between store objects.
_ENVS: dict[str, list] = {}  # realpath -> [env, writable, users]
_ENVS_LOCK = threading.Lock()


def _new_paths(path: str) -> list[Path]:
    """The store's files and directories that do not exist yet, deepest first: what a failed
    writable open removes again."""
    root = Path(path)
    files = [root / name for name in ("data.mdb", "lock.mdb") if not (root / name).exists()]
    dirs = []
    while not root.exists() and root != root.parent:
        dirs.append(root)
        root = root.parent
    return files + dirs


def _remove_new(paths: list[Path]) -> None:
    """Undo a failed open: remove the files and directories it made, but only an empty directory
    and a data file with no committed transaction (another process may have raced us)."""
    for path in paths:
        with contextlib.suppress(OSError, StoreError):
            if path.name == "data.mdb":
                meta = read_meta(str(path))
                if meta is not None and meta.txnid != 0:
                    return
            path.rmdir() if path.is_dir() else path.unlink()


def _open_env(path: str, writable: bool, map_size_gb: float, create: bool) -> lmdb.Environment:
    """Open the LMDB environment after checking its data file; on failure leave nothing new."""
    data = os.path.join(path, "data.mdb")
    if os.path.isfile(data):
        check_data_file(data)
    elif not (writable and create):
        raise StoreError(f"no activation store at {path} (no data.mdb)")
    common = {"subdir": True, "max_dbs": _MAX_DBS, "max_readers": _MAX_READERS, "readahead": True}
    if not writable:
        try:
            return lmdb.open(path, readonly=True, create=False, **common)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open activation store {path}: {exc}") from None
    new = _new_paths(path)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        map_size = max(int(map_size_gb * _GIB), 1 << 20)
        return lmdb.open(path, map_size=map_size, sync=False, metasync=False, **common)
    except (lmdb.MemoryError, OverflowError):
        _remove_new(new)
        raise StoreError(
            f"cannot map {map_size_gb:g} GB for activation store {path} "
            f"(map_size_gb={map_size_gb:g}): not enough address space or memory; give a smaller "
            "map_size_gb (the store grows its map when full)"
        ) from None
    except lmdb.Error as exc:
        _remove_new(new)
        raise StoreError(f"cannot open activation store {path}: {exc}") from None
    except OSError as exc:
        _remove_new(new)
        raise StoreError(f"cannot create activation store {path}: {exc.strerror}") from None


def _acquire_env(path: str, writable: bool, map_size_gb: float, create: bool) -> lmdb.Environment:
    real = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(real)
        if entry is not None:
            if writable and not entry[1]:
                raise StoreError(
                    f"{path}: already open read-only in this process; close those readers first"
                )
            entry[2] += 1
            return entry[0]
        env = _open_env(path, writable, map_size_gb, create)
        _ENVS[real] = [env, writable, 1]
        return env


def _release_env(path: str) -> None:
    real = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(real)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] == 0:
            del _ENVS[real]
            if entry[1]:
                entry[0].sync(True)
            entry[0].close()


SHARDS = "shards"  # the sub-directory holding a store's shards
COMPLETE = "complete.json"  # in a shard: its writer finished (what it wrote, when)
WRITER_LOCK = "writer.lock"  # in a shard: held (flock) by the one process writing it
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def shard_dir(path: str, name: str) -> str:
    return os.path.join(path, SHARDS, name)


def _load_sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_SYNC_FILE_RANGE = _load_sync_file_range()
# committed bytes after which a writer has the kernel start writing its file out: the disk then
# works while the writer (and the engine) go on, and the next sync waits for the last ones only
# (every 64 MiB made a one-batch write wait for the device's queue on a VM's disk; 256 did not)
WRITEBACK_BYTES = 256 << 20
_SYNC_FILE_RANGE_WRITE = 2  # start writing dirty pages out; do not wait


def _natural(name: str) -> list:
    """Sort key putting rank2 before rank10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def shard_names(path: str) -> list[str]:
    """Names of the store's shards (those holding a data file), in natural order."""
    try:
        entries = os.listdir(os.path.join(path, SHARDS))
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = [n for n in entries if os.path.isfile(os.path.join(path, SHARDS, n, "data.mdb"))]
    return sorted(names, key=_natural)


def _root_exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def _read_text(path: str) -> str:
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
        return f.read(200).strip()
    return ""


def _lock_shard(directory: str, name: str, store: str) -> int:
    """Hold the shard's writer lock for this process (released when the fd closes)."""
    fd = os.open(os.path.join(directory, WRITER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        holder = _read_text(os.path.join(directory, WRITER_LOCK)) or "another process"
        raise ShardBusyError(
            f"{store}: shard {name} is being written by {holder}; every writing process needs "
            "a shard of its own (two jobs with the same capture_shard?)",
            ours=holder == _writer_text(),
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, _writer_text().encode())
    return fd


def _writer_text() -> str:
    """Who holds a shard's writer lock, as its lock file says."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


class _Environment:
    """One LMDB environment of a store (the root one or a shard) and its read snapshot."""

    def __init__(
        self, store: str, name: str, writable: bool, map_size_gb: float, create: bool
    ) -> None:
        self.name = name  # "" for the root environment
        self.path = shard_dir(store, name) if name else store
        self.writable = writable
        self.env = _acquire_env(self.path, writable, map_size_gb, create)
        self.max_key = self.env.max_key_size()
        self.txn: lmdb.Transaction | None = None
        self.located: tuple[memoryview, dict[bytes, tuple[int, int]]] | bool | None = None
        self._writeback_fd: int | None = None
        self.unwritten_bytes = 0  # committed since the kernel was last asked to write them out
        try:
            self.records, self.info = self._open_dbs(create)
        except BaseException:
            _release_env(self.path)
            raise

    @property
    def label(self) -> str:
        return f"shard {self.name}" if self.name else "the root environment"

    def _open_dbs(self, create: bool):
        env = self.env
        try:
            if self.writable:
                with env.begin(write=True) as txn:
                    records = env.open_db(_RECORDS, txn=txn, create=create)
                    info = env.open_db(_INFO, txn=txn, create=create)
                    found = txn.get(b"format", db=info)
                    if found is None:
                        txn.put(b"format", STORE_FORMAT, db=info)
            else:  # handles opened inside a read transaction would close with it
                records = env.open_db(_RECORDS, create=False)
                info = env.open_db(_INFO, create=False)
                with env.begin() as txn:
                    found = txn.get(b"format", db=info)
        except lmdb.NotFoundError:
            raise StoreError(
                f"{self.path} is an LMDB environment but not an activation store"
            ) from None
        except lmdb.Error as exc:
            raise StoreError(f"cannot open activation store {self.path}: {exc}") from None
        if found is not None and bytes(found) != STORE_FORMAT:
            raise StoreError(
                f"{self.path}: store format {bytes(found).decode(errors='replace')!r} is not "
                f"{STORE_FORMAT.decode()}"
            )
        return records, info

    # --- reading -------------------------------------------------------------------------
    def snapshot(self) -> lmdb.Transaction:
        if self.txn is None:
            try:
                self.txn = self.env.begin(buffers=True)
            except lmdb.MapResizedError:  # another process grew the map
                self.env.set_mapsize(0)
                self.txn = self.env.begin(buffers=True)
        return self.txn

    def refresh(self) -> None:
        self.located = None  # its map goes when the last array from it does
        if self.txn is not None:
            self.txn.abort()
            self.txn = None

    def _locate(self) -> tuple[memoryview, dict[bytes, tuple[int, int]]] | None:
        """Where each record of the snapshot lies in data.mdb, and the file mapped read-only:
        py-lmdb's own reads touch every page of a value, so a slice of a large record would
        read all of it. Found once per snapshot; None (read through LMDB) when the walk does
        not apply (a writer's own environment changes under it)."""
        if self.located is None:
            txn = self.snapshot()
            self.located = False
            if not self.writable:
                try:
                    with open(os.path.join(self.path, "data.mdb"), "rb") as f:
                        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                    self.located = (data, value_spans(data, txn.id(), _RECORDS))
                except (LayoutError, OSError, ValueError, struct.error) as exc:
                    log.debug("%s: reading through LMDB (%s)", self.path, exc)
        return self.located or None

    def get(self, raw: bytes) -> memoryview | None:
        located = self._locate()
        if located is None:
            return self.snapshot().get(raw, db=self.records)
        span = located[1].get(raw)
        return None if span is None else self.view(span)

    def span(self, raw: bytes) -> tuple[int, int] | None:
        """Where record `raw` lies in the located data file; None when not located."""
        located = self._locate()
        return None if located is None else located[1].get(raw)

    def view(self, span: tuple[int, int]) -> memoryview:
        """The bytes at `span` of the located data file."""
        return self.located[0][span[0] : span[0] + span[1]]  # type: ignore[index]

    def entries(self) -> int:
        return self.snapshot().stat(self.records)["entries"]

    def record_keys(self) -> Iterator[bytes]:
        with self.snapshot().cursor(db=self.records) as cursor:
            for key in cursor.iternext(keys=True, values=False):
                yield bytes(key)

    def labels(self) -> dict[str, dict]:
        try:
            db = self.env.open_db(_LABELS, create=False)
        except lmdb.NotFoundError:
            return {}
        with self.env.begin(db=db) as txn:
            return {
                bytes(k).decode("utf-8"): json.loads(bytes(v))
                for k, v in txn.cursor().iternext(keys=True, values=True)
            }

    def usage(self) -> dict[str, int]:
        info = self.env.info()
        used = self.env.stat()["psize"] * (info["last_pgno"] + 1)
        on_disk = os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512
        return {"used_bytes": used, "file_bytes_on_disk": on_disk}

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    # --- writing -------------------------------------------------------------------------
    def put(self, key: str, value: bytes | bytearray | memoryview) -> bool:
        """Write one record in its own transaction; False when the key exists already."""
        self.refresh()  # growing the map needs no open transaction in this process
        encoded = key.encode("utf-8")
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    added = txn.put(encoded, value, db=self.records, overwrite=False)
                self.unwritten_bytes += len(value)
                if self.unwritten_bytes >= WRITEBACK_BYTES:
                    self.start_writeback()
                return added
            except lmdb.MapFullError:
                self.grow(len(value))
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.Error as exc:
                free = shutil.disk_usage(self.path).free
                raise StoreError(
                    f"{self.path}: could not write record {key} ({len(value) / 1e6:.1f} MB): "
                    f"{exc} ({free / 1e6:.0f} MB free on its disk); "
                    "records written before are intact"
                ) from None

    def put_labels(self, encoded: list[tuple[bytes, bytes]]) -> None:
        self.refresh()
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    db = self.env.open_db(_LABELS, txn=txn, create=True)
                    for key, value in encoded:
                        txn.put(key, value, db=db)
                break
            except lmdb.MapFullError:
                self.grow(sum(len(v) for _, v in encoded))
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.Error as exc:
                raise StoreError(f"{self.path}: could not write labels: {exc}") from None
        self.sync()

    def sync(self) -> None:
        self.env.sync(True)

    def start_writeback(self) -> bool:
        """Have the kernel start writing the committed pages to disk, without waiting for them
        (records are committed with sync=False, and the kernel otherwise keeps them in memory for
        up to 30 s or until a tenth of memory is dirty: on a GPU host all of a long call's
        records, which the sync at its end then writes while the engine waits)."""
        self.unwritten_bytes = 0
        if _SYNC_FILE_RANGE is None:
            return False
        try:  # a hint: never fails the record just committed (too many open files, say)
            if self._writeback_fd is None:
                self._writeback_fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDONLY)
        except OSError as exc:
            log.debug("%s: no write-out hint (%s)", self.path, exc)
            return False
        return _SYNC_FILE_RANGE(self._writeback_fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0

    def grow(self, needed: int) -> None:
        current = self.map_size()
        new = max(current * 2, current + 2 * needed + (1 << 20))
        log.info(
            "activation store %s: map full, growing %d -> %d MiB",
            self.path,
            current >> 20,
            new >> 20,
        )
        try:
            self.env.set_mapsize(new)
        except lmdb.Error as exc:
            raise StoreError(
                f"{self.path}: cannot grow the map to {new >> 20} MiB: {exc}"
            ) from None

    def close(self) -> None:
        if self._writeback_fd is not None:
            os.close(self._writeback_fd)
            self._writeback_fd = None
        self.refresh()
        _release_env(self.path)


class ActivationStore(Mapping[str, Record]):
    """Mapping of key -> Record over every environment of a store; `put()` when writable.

    A writable store writes one environment: the root one, or with `shard=NAME` the shard
    `shards/NAME` (created if missing; refused while another process writes it). It reads the
    others, so a key captured by any writer is seen (and never written twice); with
    `read_others=False` it reads only its own (an extra writer thread of a capture session,
    which gets only keys the session looked up across the store). A writable store
    is created when missing unless `create=False` (labelling writes into an existing store only);
    a read-only one never is.

    Reads see the store as it was when the snapshot began (first read after open, `refresh()`
    or a `put()`); arrays from records are views into the memory map, valid until the next
    `refresh()`, `put()` or `close()` of this object. `refresh()` also finds new shards.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        writable: bool = False,
        map_size_gb: float = DEFAULT_MAP_SIZE_GB,
        create: bool = True,
        shard: str | None = None,
        read_others: bool = True,
    ):
        self.path = os.fspath(path)
        self.writable = writable
        self.shard = shard
        self._own: _Environment | None = None
        self._others: list[_Environment] = []
        self._lock: int | None = None
        self._layouts: dict[str, tuple[memoryview, int, Layout]] = {}  # see _place
        self._places: dict | bool | None = None  # see _where
        if shard is not None and not _SHARD_NAME.match(shard):
            raise StoreError(f"shard name {shard!r}: use letters, digits, '.', '_' and '-'")
        if writable:
            if not create and not (_root_exists(self.path) or shard_names(self.path)):
                raise StoreError(f"no activation store at {self.path} (no data.mdb)")
            # a store of shards alone gets a root environment when labels are written to it
            make = create or (shard is None and not _root_exists(self.path))
            self._own = _Environment(self.path, shard or "", True, map_size_gb, make)
            if shard is not None:
                try:
                    self._lock = _lock_shard(self._own.path, shard, self.path)
                except BaseException:
                    self.close()
                    raise
        self._read_others = read_others
        try:
            self._open_others()
        except BaseException:
            self.close()
            raise
        if not self._parts:
            raise StoreError(f"no activation store at {self.path} (no data.mdb)")

    @property
    def _parts(self) -> list[_Environment]:
        return ([self._own] if self._own is not None else []) + self._others

    def _open_others(self, skip_unready: bool = False) -> None:
        """Open (read-only) the environments not open yet, other than the one written (none
        for a writer opened with `read_others=False`); `skip_unready` leaves a shard that does
        not open yet for a later refresh (another process may be creating it this moment)."""
        if not self._read_others:
            return
        opened = {part.name for part in self._parts}
        names = ([""] if _root_exists(self.path) else []) + shard_names(self.path)
        for name in names:
            if name not in opened:
                try:
                    self._others.append(_Environment(self.path, name, False, 0, False))
                except StoreError:
                    if not (skip_unready and name):
                        raise

    # --- reading -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Drop the read snapshots; the next read sees every record committed since, and every
        shard created since."""
        self._layouts.clear()
        self._places = None
        for part in self._parts:
            part.refresh()
        self._open_others(skip_unready=self.writable)  # a writer's siblings may be starting

    def _where(self) -> dict[bytes, list[tuple[_Environment, tuple[int, int]]]] | None:
        """key -> the environments holding it and where, for a read-only store of several
        environments all located: one lookup per key instead of one per environment."""
        if self._places is None:
            self._places = False
            parts = self._parts
            located = [part._locate() for part in parts] if len(parts) > 1 else [None]
            if not self.writable and None not in located:
                places: dict[bytes, list[tuple[_Environment, tuple[int, int]]]] = {}
                for part, (_, spans) in zip(parts, located, strict=True):  # type: ignore[misc]
                    for key, span in spans.items():
                        places.setdefault(key, []).append((part, span))
                self._places = places
        return self._places or None

    def _hits(self, key: str, first: bool = False) -> list[tuple[_Environment, memoryview]]:
        """The environments holding `key` and its bytes there (the first only, if `first`);
        none for a key LMDB cannot hold (empty, too long)."""
        raw = key.encode("utf-8", "surrogateescape")
        where = self._where()
        if where is not None:
            places = where.get(raw, ())
            return [(part, part.view(span)) for part, span in places[: 1 if first else None]]
        hits = []
        for part in self._parts:
            if 0 < len(raw) <= part.max_key and (value := part.get(raw)) is not None:
                hits.append((part, value))
                if first:
                    break
        return hits

    def _hit(self, key: str) -> tuple[_Environment, memoryview]:
        """The environment holding record `key` and its bytes: KeyError when absent,
        RecordConflictError when two environments hold it."""
        hits = self._hits(key)
        if not hits:
            raise KeyError(key)
        if len(hits) > 1:
            raise RecordConflictError(shown_key(key), _conflict([part for part, _ in hits]))
        return hits[0]

    def __getitem__(self, key: str) -> Record:
        return Record(key, self._hit(key)[1])

    def read_many(
        self,
        keys: Sequence[str],
        layers: int | Sequence[int] | None = None,
        tokens: slice | Sequence[int] | None = None,
    ) -> np.ndarray:
        """Some layers x some tokens of many records as one array [records, layers, tokens,
        hidden]: one read snapshot, each header read only where the writer put the tensor
        entries (`activation_layout`) and kept for the snapshot, the offsets of every selected
        piece computed for all records at once, and each piece copied once, into the result.

        `layers` are layer ids (all when None), `tokens` index each record's token axis (a
        slice or indices, negative ones from the end); every record must give the same shape
        (StoreError names the first that does not). BF16 data comes back as float32.
        """
        if not keys:
            return np.empty((0, 0, 0, 0), dtype=np.float16)
        places = [self._place(key) for key in keys]
        first = places[0][2]
        rows_of: dict[bytes, list[int]] = {}  # layer_ids bytes -> rows (alike in a run)
        for key, (_, _, layout) in zip(keys, places, strict=True):
            if layout.label != first.label or layout.shape[2] != first.shape[2]:
                raise self._unlike(key, f"{layout.label}, hidden {layout.shape[2]}", first)
            if layout.layer_ids not in rows_of:
                stored = np.frombuffer(layout.layer_ids, dtype="<i4").tolist()
                rows_of[layout.layer_ids] = layer_rows(
                    key, stored, stored if layers is None else layers
                )
        if len({len(rows) for rows in rows_of.values()}) > 1:
            raise self._unlike(keys[-1], "another number of the selected layers", first)
        hidden, size = first.shape[2], STORAGE_DTYPES[first.label]().itemsize
        base = np.fromiter((start for _, start, _ in places), np.int64, len(places))
        counts = np.fromiter((layout.shape[1] for *_, layout in places), np.int64, len(places))
        if len(rows_of) == 1:  # the usual case: every record holds the same layers
            rows = np.array(next(iter(rows_of.values())), dtype=np.int64)[None, :]
        else:
            rows = np.array([rows_of[layout.layer_ids] for *_, layout in places], dtype=np.int64)
        picked = _token_starts(tokens, counts)
        if isinstance(picked, int):
            raise self._unlike(keys[picked], "another number of tokens in the selection", first)
        starts, width = picked
        row_bytes = counts[:, None] * hidden * size
        offsets = base[:, None, None] + rows[:, :, None] * row_bytes[:, :, None]
        offsets = offsets + (starts * hidden * size)[:, None, :]
        span = width * hidden * size  # bytes per gathered piece
        n_tokens = width if starts.shape[1] == 1 else starts.shape[1]
        offsets = np.broadcast_to(offsets, (len(keys), rows.shape[1], starts.shape[1]))
        out = np.empty((len(keys), rows.shape[1], n_tokens, hidden), STORAGE_DTYPES[first.label])
        if not span:
            return out
        pieces = out.view(np.uint8).reshape(len(keys), -1, span)
        offsets = offsets.reshape(len(keys), -1)
        group_of: dict[int, int] = {}  # buffer -> its group (one per mapped file)
        buffers: list[memoryview] = []
        for buffer, *_ in places:
            if group_of.setdefault(id(buffer), len(buffers)) == len(buffers):
                buffers.append(buffer)
        groups = np.fromiter((group_of[id(b)] for b, *_ in places), np.int64, len(places))
        sizes = np.array([len(b) for b in buffers], np.int64)[groups]
        if offsets.size and (offsets.min() < 0 or (offsets.max(axis=1) + span > sizes).any()):
            raise StoreError(f"{self.path}: a record's layout points outside its data")
        flat, at = pieces.reshape(-1, span), offsets.reshape(-1)
        # pieces by buffer (a file, or for a writer each record's own bytes), in one sort
        piece_groups = np.repeat(groups, offsets.shape[1])
        order = np.argsort(piece_groups, kind="stable")
        for chosen in np.split(order, np.flatnonzero(np.diff(piece_groups[order])) + 1):
            if len(chosen):
                data = np.frombuffer(buffers[piece_groups[chosen[0]]], np.uint8)
                _gather(flat, chosen, at[chosen], data)
        return bf16_to_f32(out) if first.label == "BF16" else out

    def _unlike(self, key: str, what: str, first: Layout) -> StoreError:
        layers = np.frombuffer(first.layer_ids, "<i4").tolist()
        return StoreError(
            f"{self.path}: record {shown_key(key)}: {what}, unlike the first record "
            f"({first.label}, layers {layers}, hidden {first.shape[2]}): select what every "
            "record has, or read records one at a time"
        )

    def _place(self, key: str) -> tuple[memoryview, int, Layout]:
        """Where a record's activations lie: the buffer holding them (its environment's mapped
        data file, or for a writer the record's bytes), their offset in it, and their layout;
        kept for the snapshot by a read-only store, so that another selection of the same
        records parses nothing again."""
        found = self._layouts.get(key)
        if found is None:
            part, value = self._hit(key)
            layout = activation_layout(key, value)
            span = part.span(key.encode("utf-8", "surrogateescape"))
            if span is None:
                found = (value, layout.start, layout)
            else:
                found = (part.located[0], span[0] + layout.start, layout)  # type: ignore[index]
            if not self.writable:
                self._layouts[key] = found
        return found

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._hits(key, first=True))

    def _merged(self) -> Iterator[tuple[bytes, list[_Environment]]]:
        """Every key once, in sorted order, with the environments holding it."""
        parts = self._parts
        if len(parts) == 1:
            for key in parts[0].record_keys():
                yield key, parts
            return
        streams = [_tagged(part.record_keys(), i) for i, part in enumerate(parts)]
        for key, group in itertools.groupby(heapq.merge(*streams), key=lambda item: item[0]):
            yield key, [parts[i] for _, i in group]

    def __len__(self) -> int:
        parts = self._parts
        if len(parts) == 1:
            return parts[0].entries()
        return sum(1 for _ in self._merged())

    def __iter__(self) -> Iterator[str]:
        """Keys as str, each once; bytes that are not UTF-8 are kept as surrogates (as
        os.fsdecode does), so every key can be looked up, and `store[key]` reports such a key
        as a bad record."""
        for key, _ in self._merged():
            yield key.decode("utf-8", "surrogateescape")

    def environments(self) -> list[str]:
        """The LMDB environments this store reads: "the root environment", "shard NAME"."""
        return [part.label for part in self._parts]

    def conflicts(self) -> dict[str, list[str]]:
        """Keys held by more than one environment -> where (`verify` reports each)."""
        return {
            shown_key(key.decode("utf-8", "surrogateescape")): [part.label for part in parts]
            for key, parts in self._merged()
            if len(parts) > 1
        }

    def shards(self) -> list[dict[str, object]]:
        """Per shard: name, records, whether its writer finished (`complete`: what its
        completion marker says, or None) and whether a process writes it now."""
        out = []
        for part in self._parts:
            if part.name:
                marker = os.path.join(part.path, COMPLETE)
                complete = None
                with contextlib.suppress(OSError, ValueError), open(marker) as f:
                    complete = json.load(f)
                out.append(
                    {
                        "name": part.name,
                        "records": part.entries(),
                        "complete": complete,
                        "writing": part is self._own
                        or locks.held(os.path.join(part.path, WRITER_LOCK)),
                    }
                )
        return sorted(out, key=lambda shard: _natural(shard["name"]))

    def labels(self) -> dict[str, dict]:
        """Record key -> label entry (JSON) written by `put_labels`; empty before judging."""
        labels: dict[str, dict] = {}
        for part in self._parts:
            labels.update(part.labels())
        return labels

    def usage(self) -> dict[str, int]:
        """Bytes in use (pages up to the last one written) and the data files' size on disk,
        over every environment.

        The map size is not reported: a reader's map is its own, not the writer's.
        """
        total = {"used_bytes": 0, "file_bytes_on_disk": 0}
        for part in self._parts:
            for name, value in part.usage().items():
                total[name] += value
        return total

    def map_size(self) -> int:
        """Current map size of the environment this process writes (it grows when full)."""
        return self._parts[0].map_size()

    # --- writing -------------------------------------------------------------------------
    def _writer(self) -> _Environment:
        if self._own is None:
            raise StoreError(f"{self.path}: opened read-only")
        return self._own

    def put(self, key: str, value: bytes | bytearray | memoryview) -> None:
        """Write one new record in its own transaction, growing the map as often as needed.

        An existing key is never overwritten, nor written again into another environment: that
        would mean two writers produced the same sample, and one of them would be lost.
        """
        own = self._writer()
        hits = self._hits(key, first=True) if self._others else []
        where = f" in {hits[0][0].label}" if hits and hits[0][0] is not own else ""
        if hits or not own.put(key, value):
            raise StoreError(
                f"{self.path}: record {key} exists already{where}; it is kept as it was"
            )

    def put_labels(self, labels: Mapping[str, Mapping]) -> None:
        """Write (or replace) the labels of records in one transaction: all or none."""
        own = self._writer()
        missing = [key for key in labels if key not in self]
        if missing:
            raise StoreError(f"{self.path}: no record {missing[0]} to label")
        own.put_labels(
            [
                (key.encode("utf-8"), json.dumps(value, sort_keys=True).encode("utf-8"))
                for key, value in labels.items()
            ]
        )

    def mark_complete(self, facts: Mapping[str, object]) -> None:
        """Write the shard's completion marker (after a sync: what it says is on disk)."""
        own = self._writer()
        if not own.name:
            return
        own.sync()
        marker = os.path.join(own.path, COMPLETE)
        with open(marker + ".tmp", "w") as f:
            json.dump({"records": own.entries(), **facts}, f)
        os.replace(marker + ".tmp", marker)

    def mark_incomplete(self) -> None:
        """Remove the shard's completion marker: its writer is at work again."""
        own = self._writer()
        if own.name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(own.path, COMPLETE))

    def sync(self) -> None:
        """Flush committed records to disk (writes use sync=False; see the module docstring)."""
        self._writer().sync()

    def start_writeback(self) -> bool:
        """Start writing committed records to disk without waiting (a later `sync` waits less);
        False where the kernel cannot be asked (not Linux)."""
        return self._writer().start_writeback()

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        self._layouts.clear()
        self._places = None
        parts, self._own, self._others = self._parts, None, []
        for part in parts:
            part.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _gather(flat: np.ndarray, rows: np.ndarray, offsets: np.ndarray, data: np.ndarray) -> None:
    """`flat[rows[i]] = data[offsets[i] : offsets[i] + span]` for every i, in a few copies: in
    offset order, pieces an equal step apart (records of one size written one after another
    lie so in LMDB's file, a leaf page now and then between them) are one strided view, copied
    in one call."""
    span = flat.shape[1]
    order = np.argsort(offsets, kind="stable")
    at, rows = offsets[order], rows[order]
    steps = np.diff(at)
    ends = [*(np.flatnonzero(steps[1:] != steps[:-1]) + 1).tolist(), len(at)]
    begin = 0
    for end in ends:
        if end - begin == 1:
            flat[rows[begin]] = data[at[begin] : at[begin] + span]
        else:
            run = np.lib.stride_tricks.as_strided(
                data[at[begin] :], (end - begin, span), (int(steps[begin]), 1), writeable=False
            )
            flat[rows[begin:end]] = run
        begin = end


def _token_starts(
    tokens: slice | Sequence[int] | None, counts: np.ndarray
) -> tuple[np.ndarray, int] | int:
    """First token of each piece to copy per record ([records, pieces]) and the tokens in a
    piece: one piece of `width` tokens for a slice of step 1, one token per index otherwise.
    An int instead: the first record whose selection has another number of tokens."""
    if tokens is None:
        tokens = slice(None)
    if isinstance(tokens, slice) and tokens.step in (None, 1):
        first = _clip(tokens.start, counts, 0)
        widths = np.maximum(_clip(tokens.stop, counts, counts) - first, 0)
        odd = np.flatnonzero(widths != widths[0])
        return int(odd[0]) if len(odd) else (first[:, None], int(widths[0]))
    if isinstance(tokens, slice):
        picked = [np.arange(*tokens.indices(int(n))) for n in counts]
        odd = [i for i, p in enumerate(picked) if len(p) != len(picked[0])]
        return odd[0] if odd else (np.array(picked, dtype=np.int64).reshape(len(counts), -1), 1)
    wanted = np.asarray(tokens, dtype=np.int64)[None, :]
    picked = np.where(wanted < 0, wanted + counts[:, None], wanted)
    bad = np.flatnonzero(((picked < 0) | (picked >= counts[:, None])).any(axis=1))
    return int(bad[0]) if len(bad) else (picked, 1)


def _clip(bound: int | None, counts: np.ndarray, default) -> np.ndarray:
    """A slice bound on each record's token axis, as `slice.indices` gives it (step 1)."""
    if bound is None:
        return np.broadcast_to(np.asarray(default, dtype=np.int64), counts.shape)
    return np.where(bound < 0, np.maximum(bound + counts, 0), np.minimum(bound, counts))


def _tagged(keys: Iterator[bytes], index: int) -> Iterator[tuple[bytes, int]]:
    for key in keys:
        yield key, index


def _conflict(parts: list[_Environment]) -> str:
    return (
        f"written twice, into {' and '.join(part.label for part in parts)} (two writers made the "
        "same record; neither is read: keep the shard that should hold it)"
    )


def open_store(path: str | os.PathLike) -> ActivationStore:
    """Open an activation store for reading (several processes may read while one writes),
    with all its shards as one mapping."""
    return ActivationStore(path)
