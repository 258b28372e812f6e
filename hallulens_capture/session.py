"""The one record writer all backends share: keys, resume, validation, writing.

A backend hands over engine-neutral `CapturedSample`s; the session decides the key, checks the
sample against the capture spec, builds the record and writes it. Before generating, `plan()`
looks every request up in the store: a request whose record exists is not generated again
(its stored response is returned), which is how an interrupted run resumes.

Checks run at once, in the caller's thread; encoding and the LMDB write run on writer threads
(one per 4 cores, 1..4, `writer_count()`; each writes an LMDB environment of its own) behind queues
bounded together in bytes (`queue_bytes()`, whatever the size of a record), so an engine goes on
generating while records are written. Each record is one LMDB transaction: committed whole or not
at all. `flush()` waits for the queues and raises what a writer met (a full disk, say).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hallulens_capture import hugepages
from hallulens_capture.errors import (
    CaptureConfigError,
    CaptureError,
    RecordFormatError,
    ShardBusyError,
    StoreError,
)
from hallulens_capture.keys import occurrence_keys, record_key
from hallulens_capture.positions import token_positions
from hallulens_capture.record import (
    CAPTURE_DTYPE_LABELS,
    RECORD_FORMAT,
    TokenParts,
    encode_record,
    token_stat_tensors,
    utc_timestamp,
)
from hallulens_capture.report import layers_text, record_kind
from hallulens_capture.spec import CaptureSpec
from hallulens_capture.store import ActivationStore

log = logging.getLogger(__name__)

ENV_QUEUE_MB = "HALLULENS_CAPTURE_QUEUE_MB"
ENV_WRITERS = "HALLULENS_CAPTURE_WRITERS"
MAX_WRITERS = 16
MAX_SESSION_SHARDS = 64  # busy writer shards passed over before giving up


def _local_processes() -> int:
    """Processes of this run on this node (`LOCAL_WORLD_SIZE`, as torchrun and accelerate set
    it), which share its memory and cores."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(local) if local.isdigit() and int(local) > 0 else 1


def writer_count(cpus: int | None = None) -> int:
    """`HALLULENS_CAPTURE_WRITERS`: threads writing records, each into an LMDB environment of its
    own, since one environment takes one write at a time: LMDB copies each record into pages it
    maps per transaction, so where cores are free (a GPU host) several environments write faster
    than one. Default: one per 4 of the cores this process may use (`cpus`, else its affinity)
    shared by the node's processes, 1..4 (an H200 host's 16 cores: 4, which halved the tail of
    an 8B model's all-layer batch; these 2-core machines: 1)."""
    text = os.environ.get(ENV_WRITERS)
    if text is None:
        if cpus is None:
            affinity = getattr(os, "sched_getaffinity", None)  # Linux; else every core
            cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
        return min(max(cpus // 4 // _local_processes(), 1), 4)
    if not text.isdigit() or not 1 <= int(text) <= MAX_WRITERS:
        raise CaptureConfigError(
            f"{ENV_WRITERS}={text!r}: expected a whole number from 1 to {MAX_WRITERS}"
        )
    return int(text)


def queue_bytes() -> int:
    """Bytes of captured records that may wait for the writer threads before a producer waits
    (one record of any size always gets in): what bounds capture's host memory beyond the
    engine's current batch. `HALLULENS_CAPTURE_QUEUE_MB`, else an eighth of the machine's memory
    shared by the node's processes, within 256 MiB..8 GiB: on a GPU host that holds a batch's
    records (4.4 GB for 64 answers of 256 tokens, all layers of an 8B model) while the engine
    runs the next batch."""
    text = os.environ.get(ENV_QUEUE_MB)
    if text is None:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return min(max(memory // 8 // _local_processes(), 256 << 20), 8 << 30)
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = 0
    if megabytes < 1:
        raise CaptureConfigError(f"{ENV_QUEUE_MB}={text!r}: expected a whole number of MiB >= 1")
    return megabytes << 20


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


@dataclass(frozen=True)
class SampleRequest:
    """One generation request as the harness gave it."""

    prompt: str
    gen_kwargs: dict = field(default_factory=dict)
    task: str | None = None
    doc_id: int | None = None


@dataclass
class CapturedSample:
    """What an engine captured for one generation, in engine-neutral form.

    `activations` is [n_layers, n_tokens, hidden] in the storage dtype (uint16 bits for
    bfloat16), rows in the order of `token_positions`: one array, or `TokenParts` (a request's
    forward steps, joined when the record is encoded). `token_stats` holds one row per generated
    token, [G, 2 + 2k] float32 (see `record.token_stat_tensors`), when capture_topk > 0.
    """

    prompt_token_ids: Sequence[int]
    generated_token_ids: Sequence[int]
    token_positions: np.ndarray
    activations: np.ndarray | TokenParts
    token_stats: np.ndarray | None = None


def shard_name(job: tuple[int, int] | None, rank: int, world_size: int) -> str | None:
    """The shard a writing process owns: `jobI` in a job array, `rankR` among several processes
    of one run (accelerate), both joined; None for the only writer of a run (the root one)."""
    parts = ([f"job{job[0]}"] if job else []) + ([f"rank{rank}"] if world_size > 1 else [])
    return "-".join(parts) or None


class CaptureSession:
    """Writes records for one model run into one store (into its own shard when `shard` names
    one), reading the whole store for resume; `writers` threads (None: `writer_count()`)."""

    def __init__(
        self,
        spec: CaptureSpec,
        layer_ids: Sequence[int],
        model: str,
        backend: str,
        shard: str | None = None,
        writers: int | None = None,
    ):
        self.spec = spec
        self.layer_ids = np.asarray(layer_ids, dtype=np.int32)
        self.model = model
        self.backend = backend
        self.dtype_label = CAPTURE_DTYPE_LABELS[spec.dtype]
        self.kind = {  # what record_kind() of this run's records will be
            "model": model,
            "backend": backend,
            "dtype": spec.dtype,
            "capture_tokens": spec.tokens,
            "layers": layers_text(self.layer_ids),
            "capture_topk": str(spec.topk),
        }
        count = writer_count() if writers is None else writers
        self._queue_bytes = queue_bytes()  # bad settings fail before anything is opened
        stores = _open_stores(spec, shard, count)
        self.store = stores[0]
        self._writers = [_Writer(store) for store in stores]
        self._queued_bytes = 0  # of records queued and not yet written, at most _queue_bytes
        self._advised = False  # whether the first large record's advice was given (`_advise`)
        self._advice_lock = threading.Lock()
        self._room = threading.Condition()
        self._failure: BaseException | None = None

    def info(self) -> dict[str, object]:
        """Capture settings for the harness results' `config` section."""
        info: dict[str, object] = {
            "activations": self.spec.path,
            "capture_layers": [int(i) for i in self.layer_ids],
            "capture_tokens": self.spec.tokens,
            "capture_dtype": self.spec.dtype,
            "capture_topk": self.spec.topk,
            "capture_writers": len(self._writers),
        }
        if self.store.shard is not None:
            info["activations_shard"] = self.store.shard
        return info

    def plan(
        self, requests: Sequence[SampleRequest], keys: Sequence[str] | None = None
    ) -> tuple[list[str], list[str | None]]:
        """Keys for `requests` (in order; numbered here unless given) and the stored response of
        each one already captured, in any environment of the store."""
        keys = list(keys) if keys is not None else occurrence_keys(r.prompt for r in requests)
        self.store.refresh()  # what every writer of this session committed so far
        try:
            return keys, [self._stored_response(k, r) for k, r in zip(keys, requests, strict=True)]
        finally:
            self.store.refresh()  # no read snapshot stays open while writers grow their maps

    def free_key(self, prompt: str) -> str:
        """The first key of `prompt` not yet in the store (a server records every request; a
        repeated prompt gets the next `-n` suffix)."""
        self.store.refresh()  # what every writer of this session committed so far
        n = 0
        while record_key(prompt, n) in self.store:
            n += 1
        self.store.refresh()  # no read snapshot stays open while writers grow their maps
        return record_key(prompt, n)

    def _stored_response(self, key: str, request: SampleRequest) -> str | None:
        if key not in self.store:
            return None
        record = self.store[key]
        differ = _differences(
            {**record_kind(record), "gen_kwargs": record.metadata.get("gen_kwargs", "")},
            {**self.kind, "gen_kwargs": canonical_json(request.gen_kwargs)},  # stored canonical
        )
        if differ:
            hint = ""
            if "capture_topk" not in record.metadata and self.spec.topk:
                hint = " (its records predate token statistics: capture_topk=0 resumes it)"
            raise StoreError(
                f"{self.spec.path} already holds record {key} for this prompt, made with "
                f"{'; '.join(differ)}: use a new activations= path for different settings{hint}"
            )
        return record.response

    def write(
        self, key: str, request: SampleRequest, response: str, sample: CapturedSample
    ) -> None:
        """Check one captured sample against the spec and queue it for the store under `key`."""
        self._raise_failure()
        acts = sample.activations
        expected = token_positions(
            self.spec.tokens, len(sample.prompt_token_ids), len(sample.generated_token_ids)
        )
        if not np.array_equal(sample.token_positions, expected):
            raise CaptureError(
                f"record {key}: engine gave token positions {_span(sample.token_positions)}, "
                f"expected {_span(expected)} for capture_tokens={self.spec.tokens}"
            )
        if acts.ndim != 3 or acts.shape[:2] != (len(self.layer_ids), len(expected)):
            raise CaptureError(
                f"record {key}: activations of shape {list(acts.shape)}, expected "
                f"[{len(self.layer_ids)}, {len(expected)}, hidden]"
            )
        optional = self._token_stats(key, sample)
        metadata = {
            "prompt": request.prompt,
            "response": response,
            "model": self.model,
            "timestamp": utc_timestamp(),
            "backend": self.backend,
            "task": request.task or "",
            "doc_id": "" if request.doc_id is None else str(request.doc_id),
            "capture_tokens": self.spec.tokens,
            "dtype": self.spec.dtype,
            "gen_kwargs": canonical_json(request.gen_kwargs),
            "capture_topk": str(self.spec.topk),
            "format": RECORD_FORMAT,
        }
        index = {
            "layer_ids": self.layer_ids,
            "token_positions": expected,
            "prompt_token_ids": sample.prompt_token_ids,
            "generated_token_ids": sample.generated_token_ids,
        }
        if any(writer.thread is None for writer in self._writers):
            self._warn_if_mixed()
            self.store.refresh()  # its reads' snapshot goes before any writer grows a map
            for i, writer in enumerate(self._writers):
                if writer.thread is None:  # (a retry after a failed start starts the rest)
                    thread = threading.Thread(
                        target=self._drain, args=(writer,), name=f"hallulens-store-{i}", daemon=True
                    )
                    thread.start()
                    writer.thread = thread
        size = acts.nbytes + sum(t.nbytes for t in optional.values())
        with self._room:
            while self._queued_bytes and self._queued_bytes + size > self._queue_bytes:
                self._room.wait()
            self._queued_bytes += size
        # a key always goes to the same writer: a second write of it meets the first there
        writer = self._writers[
            zlib.crc32(key.encode("utf-8", "surrogateescape")) % len(self._writers)
        ]
        writer.queue.put((key, acts, index, metadata, optional, size))

    def _token_stats(self, key: str, sample: CapturedSample) -> dict[str, np.ndarray]:
        """The record's token statistics tensors (none with capture_topk=0), checked: one row
        of 2 + 2k values per generated token."""
        if not self.spec.topk:
            return {}
        rows, n = sample.token_stats, len(sample.generated_token_ids)
        width = 2 + 2 * self.spec.topk
        if rows is None or rows.shape != (n, width):
            got = "none" if rows is None else list(rows.shape)
            raise CaptureError(
                f"record {key}: engine gave token statistics of shape {got}, "
                f"expected [{n}, {width}]"
            )
        return token_stat_tensors(rows)

    def _warn_if_mixed(self) -> None:
        """Log once when the store holds records of another kind than this run's (a store mixing
        models or settings is easy to analyse wrongly). Reads the headers of the records already
        there, before this run's first record is written."""
        for key in self.store:
            try:
                other = record_kind(self.store[key])
            except RecordFormatError:  # `verify` reports it; it says nothing about kinds
                continue
            differ = _differences(other, self.kind)
            if differ:
                log.warning(
                    "activation store %s holds records made with %s: this run adds a second "
                    "kind of record to it (`hallulens activations stats` counts each kind; use a "
                    "new activations= path to keep them apart)",
                    self.spec.path,
                    "; ".join(differ),
                )
                return

    def _advise(self, nbytes: int) -> None:
        """Say once, at the first record over 32 MiB, how to store such records faster."""
        with self._advice_lock:
            if self._advised:
                return
            self._advised = True
        line = hugepages.advice(nbytes)
        if line:
            log.warning("activation store %s: %s", self.spec.path, line)

    def _drain(self, writer: _Writer) -> None:
        while (item := writer.queue.get()) is not None:
            key, acts, index, metadata, optional, size = item
            try:
                if self._failure is None:  # after a failure, later records are dropped
                    value = encode_record(
                        acts, self.dtype_label, index, metadata, writer.scratch, optional=optional
                    )
                    if value.obj is not writer.scratch:  # grown: keep the larger buffer
                        writer.scratch = value.obj
                    if len(value) > hugepages.LARGE_RECORD and not self._advised:
                        self._advise(len(value))
                    writer.store.put(key, value)
                    writer.written += 1
            except BaseException as exc:  # re-raised by flush or the next write
                self._failure = self._failure or exc
            finally:
                del item, acts, optional  # the record's memory goes before room is made
                with self._room:
                    self._queued_bytes -= size
                    self._room.notify_all()
                writer.queue.task_done()
        writer.queue.task_done()

    @property
    def written(self) -> int:
        """Records written by this session's writers."""
        return sum(writer.written for writer in self._writers)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def flush(self) -> None:
        """Wait until every queued record is in the store and synced; raise the writers' first
        error."""
        for writer in self._writers:
            writer.queue.join()
        self._raise_failure()
        for writer in self._writers:
            writer.store.sync()

    def finish(self) -> None:
        """Flush, then mark the shards complete: their writers got to the end of the requests."""
        self.flush()
        for writer in self._writers:
            writer.store.mark_complete(
                {
                    "finished": utc_timestamp(),
                    "written_by_last_run": writer.written,
                    "writer": f"pid {os.getpid()} on {socket.gethostname()}",
                }
            )

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for writer in self._writers:
                if writer.thread is not None:
                    writer.queue.put(None)
                    writer.thread.join()
                    writer.thread = None
                writer.store.close()


def _open_stores(spec: CaptureSpec, shard: str | None, count: int) -> list[ActivationStore]:
    """The session's store, then one shard of its own (`<shard>-w<i>` or `w<i>`) per writer
    thread beyond the first. The shards open first and read nothing else, so that the session's
    store, opened last, reads them through the same environments; a shard an earlier session of
    this process holds (still open: a notebook's rerun) is passed over for the next free name."""
    stores: list[ActivationStore] = []
    busy: ShardBusyError | None = None
    try:
        for i in range(1, count + MAX_SESSION_SHARDS):
            if len(stores) == count - 1:
                break
            try:
                stores.append(
                    ActivationStore(
                        spec.path,
                        writable=True,
                        map_size_gb=spec.map_size_gb,
                        shard=f"{shard}-w{i}" if shard else f"w{i}",
                        read_others=False,
                    )
                )
            except ShardBusyError as exc:
                if not exc.ours:  # another process writes this store's writer shards
                    raise
                busy = exc
        if len(stores) < count - 1:
            raise busy  # type: ignore[misc]
        own = ActivationStore(spec.path, writable=True, map_size_gb=spec.map_size_gb, shard=shard)
        stores.insert(0, own)
        for store in stores:
            store.mark_incomplete()
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


class _Writer:
    """One writer thread's environment (the session's store, or a shard of its own), queue and
    encode buffer (reused: no fresh memory per record)."""

    def __init__(self, store: ActivationStore) -> None:
        self.store = store
        self.queue: queue.Queue = queue.Queue()
        self.scratch = bytearray()
        self.thread: threading.Thread | None = None
        self.written = 0


def _differences(found: dict[str, str], wanted: dict[str, str]) -> list[str]:
    return [f"{n}={found[n]!r} (now {wanted[n]!r})" for n in wanted if found[n] != wanted[n]]


def _span(positions: np.ndarray) -> str:
    if len(positions) == 0:
        return "none"
    return f"{int(positions[0])}..{int(positions[-1])} ({len(positions)})"
