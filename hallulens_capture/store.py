"""The LMDB activation store: one record per generation, many readers, one writer at a time.

An LMDB environment directory (`data.mdb`, `lock.mdb`) with named sub-databases:
`records` (key -> record bytes, see record.py), `info` (`format` marker) and, once a run is
judged, `labels` (record key -> JSON verdict; records themselves are never rewritten).
Writes are one transaction per record, so a killed writer leaves every committed record whole.
The map grows on `MapFullError` and the write is retried; readers in other processes pick the
new size up.
`sync=False`: a committed record survives the writer process being killed (the kernel has it);
only a machine crash before the next `sync()` (after each harness request batch, and on close)
may lose the last ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import lmdb

from hallulens_capture.errors import StoreError
from hallulens_capture.lmdbfile import check_data_file, read_meta
from hallulens_capture.record import Record
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


class ActivationStore(Mapping[str, Record]):
    """Mapping of key -> Record over a read snapshot; `put()` when opened writable.

    A writable store is created when missing unless `create=False` (labelling writes into an
    existing store only); a read-only one never is.

    Reads see the store as it was when the snapshot began (first read after open, `refresh()`
    or a `put()`); arrays from records are views into the memory map, valid until the next
    `refresh()`, `put()` or `close()` of this object.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        writable: bool = False,
        map_size_gb: float = DEFAULT_MAP_SIZE_GB,
        create: bool = True,
    ):
        self.path = os.fspath(path)
        self.writable = writable
        self._env = _acquire_env(self.path, writable, map_size_gb, create)
        self._max_key = self._env.max_key_size()
        self._txn: lmdb.Transaction | None = None
        try:
            self._records, self._info = self._open_dbs(create)
        except BaseException:
            _release_env(self.path)
            raise

    def _open_dbs(self, create: bool):
        env = self._env
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
    def _snapshot(self) -> lmdb.Transaction:
        if self._txn is None:
            try:
                self._txn = self._env.begin(buffers=True)
            except lmdb.MapResizedError:  # another process grew the map
                self._env.set_mapsize(0)
                self._txn = self._env.begin(buffers=True)
        return self._txn

    def refresh(self) -> None:
        """Drop the read snapshot; the next read sees every record committed since."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None

    def _value(self, key: str) -> memoryview | None:
        """The stored bytes under `key`; None for a key LMDB cannot hold (empty, too long)."""
        raw = key.encode("utf-8", "surrogateescape")
        if not 0 < len(raw) <= self._max_key:
            return None
        return self._snapshot().get(raw, db=self._records)

    def __getitem__(self, key: str) -> Record:
        value = self._value(key)
        if value is None:
            raise KeyError(key)
        return Record(key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._value(key) is not None

    def __len__(self) -> int:
        return self._snapshot().stat(self._records)["entries"]

    def __iter__(self) -> Iterator[str]:
        """Keys as str; bytes that are not UTF-8 are kept as surrogates (as os.fsdecode does),
        so every key can be looked up, and `store[key]` reports such a key as a bad record."""
        with self._snapshot().cursor(db=self._records) as cursor:
            for key in cursor.iternext(keys=True, values=False):
                yield bytes(key).decode("utf-8", "surrogateescape")

    def labels(self) -> dict[str, dict]:
        """Record key -> label entry (JSON) written by `put_labels`; empty before judging."""
        try:
            db = self._env.open_db(_LABELS, create=False)
        except lmdb.NotFoundError:
            return {}
        with self._env.begin(db=db) as txn:
            return {
                bytes(k).decode("utf-8"): json.loads(bytes(v))
                for k, v in txn.cursor().iternext(keys=True, values=True)
            }

    def usage(self) -> dict[str, int]:
        """Bytes in use (pages up to the last one written) and the data file's size on disk.

        The map size is not reported: a reader's map is its own, not the writer's.
        """
        info = self._env.info()
        used = self._env.stat()["psize"] * (info["last_pgno"] + 1)
        on_disk = os.stat(os.path.join(self.path, "data.mdb")).st_blocks * 512
        return {"used_bytes": used, "file_bytes_on_disk": on_disk}

    def map_size(self) -> int:
        """Current map size of this process's environment (the writer grows it when full)."""
        return self._env.info()["map_size"]

    # --- writing -------------------------------------------------------------------------
    def put(self, key: str, value: bytes | bytearray | memoryview) -> None:
        """Write one new record in its own transaction, growing the map as often as needed.

        An existing key is never overwritten: that would mean two writers produced the same
        sample, and one of them would be lost silently.
        """
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        self.refresh()  # growing the map needs no open transaction in this process
        encoded = key.encode("utf-8")
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    added = txn.put(encoded, value, db=self._records, overwrite=False)
                break
            except lmdb.MapFullError:
                self._grow(len(value))
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
            except lmdb.Error as exc:
                free = shutil.disk_usage(self.path).free
                raise StoreError(
                    f"{self.path}: could not write record {key} ({len(value) / 1e6:.1f} MB): "
                    f"{exc} ({free / 1e6:.0f} MB free on its disk); "
                    "records written before are intact"
                ) from None
        if not added:
            raise StoreError(f"{self.path}: record {key} exists already; it is kept as it was")

    def put_labels(self, labels: Mapping[str, Mapping]) -> None:
        """Write (or replace) the labels of records in one transaction: all or none."""
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        missing = [key for key in labels if key not in self]
        if missing:
            raise StoreError(f"{self.path}: no record {missing[0]} to label")
        self.refresh()
        encoded = [
            (key.encode("utf-8"), json.dumps(value, sort_keys=True).encode("utf-8"))
            for key, value in labels.items()
        ]
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    db = self._env.open_db(_LABELS, txn=txn, create=True)
                    for key, value in encoded:
                        txn.put(key, value, db=db)
                break
            except lmdb.MapFullError:
                self._grow(sum(len(v) for _, v in encoded))
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)
            except lmdb.Error as exc:
                raise StoreError(f"{self.path}: could not write labels: {exc}") from None
        self.sync()

    def sync(self) -> None:
        """Flush committed records to disk (writes use sync=False; see the module docstring)."""
        self._env.sync(True)

    def _grow(self, needed: int) -> None:
        current = self.map_size()
        new = max(current * 2, current + 2 * needed + (1 << 20))
        log.info(
            "activation store %s: map full, growing %d -> %d MiB",
            self.path,
            current >> 20,
            new >> 20,
        )
        try:
            self._env.set_mapsize(new)
        except lmdb.Error as exc:
            raise StoreError(
                f"{self.path}: cannot grow the map to {new >> 20} MiB: {exc}"
            ) from None

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        if self._env is None:
            return
        self.refresh()
        self._env = None  # type: ignore[assignment]
        _release_env(self.path)

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def open_store(path: str | os.PathLike) -> ActivationStore:
    """Open an activation store for reading (several processes may read while one writes)."""
    return ActivationStore(path)
