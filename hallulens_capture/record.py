"""One generation's record: safetensors bytes, written in one piece and read zero-copy.

Layout (plain safetensors, readable by `safetensors.numpy.load`): 8-byte little-endian header
length, a JSON header (tensor dtypes, shapes, byte offsets, and `__metadata__` holding the string
fields), then the raw tensors. The activations come first, so they start 8-byte aligned and a
slice of some layers x some tokens touches only those bytes of the memory map.

Tensors: `all_layers_activations` [n_layers, n_tokens, hidden] (F16 / BF16 / F32), `layer_ids`,
`token_positions`, `prompt_token_ids`, `generated_token_ids` (I32). Metadata: `prompt`,
`response`, `model`, `timestamp`, `backend`, `task`, `doc_id`, `capture_tokens`, `dtype`,
`gen_kwargs` (JSON), `format`, `checksum` (`xxh3:<16 hex>`, XXH3-64 of the data section, i.e.
every tensor's bytes; records written before it are checked with the `crc32:<8 hex>` they carry,
and the first ones have none). `activations` (the last captured layer) is a view, not stored.
Optional tensors (F32 or I32) may follow; records without them stay valid, and
`Record.tensor(name)` reads them. The token statistics are such tensors, one row per generated
token (`TOKEN_STATS`, metadata `capture_topk`); records written before them have none.

Parsing checks the header's structure (types, dims that agree, offsets within the value) so that
no crafted value can crash or mislead a reader, at a cost independent of the activations' size;
the checksum (a pass over every byte) and the exact tiling are left to `hallulens activations
verify`.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np
import xxhash

from hallulens_capture.errors import RecordFormatError
from hallulens_capture.keys import shown_key

RECORD_FORMAT = "hallulens-record/1"
ACTIVATIONS = "all_layers_activations"
INDEX_TENSORS = ("layer_ids", "token_positions", "prompt_token_ids", "generated_token_ids")
# token statistics, aligned with generated_token_ids, of the raw model logits (before temperature,
# penalties or other processing); absent from records written with capture_topk=0 or before them
GENERATED_LOGPROBS = "generated_logprobs"  # [G] F32: log-probability of each generated token
GENERATED_ENTROPY = "generated_entropy"  # [G] F32: entropy (nats) of its next-token distribution
TOPK_IDS = "topk_ids"  # [G, k] I32: the k most likely next tokens, most likely first
TOPK_LOGPROBS = "topk_logprobs"  # [G, k] F32: their log-probabilities
TOKEN_STATS = (GENERATED_LOGPROBS, GENERATED_ENTROPY, TOPK_IDS, TOPK_LOGPROBS)
# safetensors dtype label -> numpy dtype of the stored bytes (BF16 is kept as its raw bits)
STORAGE_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "I32": np.int32}
_ITEMSIZE = {label: np.dtype(dtype).itemsize for label, dtype in STORAGE_DTYPES.items()}
CAPTURE_DTYPE_LABELS = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_OPTIONAL_LABELS = {"<f4": "F32", "<i4": "I32"}
CHECKSUM = "checksum"


def data_checksum(parts: Iterable[object], kind: str = "xxh3") -> str:
    """Checksum of the data section given as its consecutive parts (buffers): "xxh3:<16 hex>"
    (what the writer writes: XXH3 runs at memory speed, several times CRC-32's, see
    benchmarks/bench_store.py) or "crc32:<8 hex>" (what records written before carry)."""
    if kind == "xxh3":
        digest = xxhash.xxh3_64()
        for part in parts:
            digest.update(part)  # type: ignore[arg-type]
        return f"xxh3:{digest.hexdigest()}"
    if kind == "crc32":
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)  # type: ignore[arg-type]
        return f"crc32:{crc:08x}"
    raise ValueError(f"unknown checksum kind {kind!r}")


def storage_dtype(capture_dtype: str) -> np.dtype:
    """The stored dtype of activations captured as `capture_dtype` (bfloat16: its uint16 bits)."""
    return np.dtype(STORAGE_DTYPES[CAPTURE_DTYPE_LABELS[capture_dtype]])


def storage_from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations -> the stored array of capture dtype `dtype` (bfloat16 as uint16 bits,
    rounded to nearest even) for engines that hand over float32 (llama.cpp)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def token_stat_tensors(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The record's token statistics from the rows every engine hands over: [G, 2 + 2k] float32,
    per generated token its logprob, the entropy, the k top logprobs and the k top ids (as
    floats, exact for ids below 2**24; `hallulens_models.token_stats` writes them)."""
    k = (rows.shape[1] - 2) // 2
    return {
        GENERATED_LOGPROBS: np.ascontiguousarray(rows[:, 0]),
        GENERATED_ENTROPY: np.ascontiguousarray(rows[:, 1]),
        TOPK_LOGPROBS: np.ascontiguousarray(rows[:, 2 : 2 + k]),
        TOPK_IDS: rows[:, 2 + k :].astype(np.int32),
    }


class TokenParts:
    """A record's activations as pieces along the token axis ([n_layers, n_i, hidden] each, one
    dtype), joined only where the record is encoded: a backend that keeps each forward step's
    rows hands a request's steps over as they are, instead of assembling them in fresh memory
    first (which, per record, faults in as many new pages as it has bytes)."""

    ndim = 3

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("TokenParts needs at least one part")
        first = parts[0]
        for part in parts:
            alike = part.ndim == 3 and part.dtype == first.dtype
            if not alike or (part.shape[0], part.shape[2]) != (first.shape[0], first.shape[2]):
                raise ValueError(
                    f"a part of shape {list(part.shape)} ({part.dtype}) does not extend one of "
                    f"{list(first.shape)} ({first.dtype}) along the token axis"
                )
        self.parts = list(parts)
        self.dtype = first.dtype
        self.shape = (first.shape[0], sum(p.shape[1] for p in parts), first.shape[2])
        self.size = self.shape[0] * self.shape[1] * self.shape[2]
        self.nbytes = self.size * self.dtype.itemsize

    def copy_into(self, out: np.ndarray) -> None:
        np.concatenate(self.parts, axis=1, out=out)


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def encode_record(
    activations: np.ndarray | TokenParts,
    dtype_label: str,
    index: Mapping[str, Sequence[int] | np.ndarray],
    metadata: Mapping[str, str],
    scratch: bytearray | None = None,
    *,
    optional: Mapping[str, np.ndarray] | None = None,
    checksum: bool = True,
) -> memoryview:
    """Serialise one record into a single buffer (one copy of the activations).

    `activations` holds the stored bytes already in their final dtype (uint16 bits for BF16),
    as one array (a strided view is fine) or as `TokenParts`; `optional` adds named float32 or
    int32 tensors after the index tensors.
    With `scratch`, the record is built in it when it is large enough (a writer reuses one
    buffer instead of faulting in fresh memory per record); the result is then only valid until
    the next call with the same scratch. `checksum=False` leaves the checksum out, only so that
    benchmarks/bench_store.py can measure what it costs.
    """
    if dtype_label not in ("F16", "BF16", "F32"):
        raise ValueError(f"unsupported activation dtype {dtype_label}")
    # the activations may be a strided view (a hand-over file's rows) or the steps of a request
    # (TokenParts): copied once, into place
    arrays: list[tuple[str, str, np.ndarray | TokenParts]] = [
        (ACTIVATIONS, dtype_label, activations)
    ]
    for name in INDEX_TENSORS:
        arrays.append((name, "I32", np.ascontiguousarray(index[name], dtype=np.int32)))
    for name, values in (optional or {}).items():
        array = np.ascontiguousarray(values)
        label = _OPTIONAL_LABELS.get(array.dtype.str)
        if name in (ACTIVATIONS, *INDEX_TENSORS):
            raise ValueError(f"optional tensor {name}: that name is a required tensor's")
        if label is None:
            raise ValueError(f"optional tensor {name}: {array.dtype} is not float32 or int32")
        arrays.append((name, label, array))
    strings = {k: str(v) for k, v in metadata.items()}
    if checksum:  # a stand-in of the checksum's length, replaced once the data is in place
        strings[CHECKSUM] = data_checksum([])
    header: dict[str, object] = {"__metadata__": strings}
    offset = 0
    for name, label, array in arrays:
        if array.dtype != STORAGE_DTYPES[label]:
            raise ValueError(f"{name}: {array.dtype} does not hold {label}")
        header[name] = {
            "dtype": label,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = _header_bytes(header)
    size = 8 + len(raw) + offset
    buf = scratch if scratch is not None and len(scratch) >= size else bytearray(size)
    struct.pack_into("<Q", buf, 0, len(raw))
    start = 8 + len(raw)
    for _, _, array in arrays:
        view = np.frombuffer(buf, dtype=array.dtype, count=array.size, offset=start)
        if isinstance(array, TokenParts):
            array.copy_into(view.reshape(array.shape))
        else:
            np.copyto(view.reshape(array.shape), array)
        start += array.nbytes
    if checksum:
        strings[CHECKSUM] = data_checksum([memoryview(buf)[8 + len(raw) : size]])
        raw = _header_bytes(header)  # same length: the checksum's is fixed
    buf[8 : 8 + len(raw)] = raw
    return memoryview(buf)[:size]


def _header_bytes(header: dict[str, object]) -> bytes:
    """The JSON header, padded with spaces so that the data starts 8-byte aligned."""
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-(len(raw) + 8) % 8)


def layer_rows(key: str, stored: list[int], layers: int | Iterable[int]) -> list[int]:
    """Rows of a record holding layer ids `stored` that hold `layers` (KeyError naming those
    it lacks)."""
    wanted = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(i) for i in layers]
    missing = [i for i in wanted if i not in stored]
    if missing:
        raise KeyError(f"record {key} has no layer(s) {missing}; it holds {stored}")
    return [stored.index(i) for i in wanted]


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _is_text(value: object) -> bool:
    """A str that UTF-8 can hold: no lone surrogates (JSON escapes or undecodable key bytes)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nbytes(label: str, shape: Sequence[int], limit: int) -> int:
    """Bytes of a tensor, or limit + 1 as soon as it exceeds `limit` (a crafted shape of huge
    dims costs no huge-integer arithmetic)."""
    if 0 in shape:
        return 0
    size = _ITEMSIZE[label]
    for dim in shape:
        size *= dim
        if size > limit:
            return limit + 1
    return size


def _brief(value: object) -> str:
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Record:
    """A parsed record over a buffer (usually LMDB's memory map: nothing is copied).

    Arrays returned by attributes are views into that buffer and stay valid while the store's
    read snapshot is open; `slice()` returns a copy of just the requested part. BF16 activations
    are returned as float32 (numpy has no bfloat16), converting only what is read.
    """

    def __init__(self, key: str, buffer: bytes | bytearray | memoryview):
        self.key = key
        self._buf = memoryview(buffer)
        size = len(self._buf)
        if not _is_text(key):
            raise self._error("key is not UTF-8")
        if size < 8:
            raise self._error(f"{size} bytes, too short for a header")
        (hlen,) = struct.unpack_from("<Q", self._buf, 0)
        if hlen > size - 8:
            raise self._error(f"header length {hlen} exceeds value size {size}")
        try:
            header = json.loads(bytes(self._buf[8 : 8 + hlen]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._error(f"header is not JSON ({exc})") from None
        except RecursionError:
            raise self._error("header JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict):
            raise self._error("no __metadata__ in header")
        bad = [ascii(name) for name, value in meta.items() if not _is_text(value)]
        if bad:
            raise self._error(f"metadata {', '.join(bad[:5])} not UTF-8 strings")
        self.metadata: dict[str, str] = meta
        self._start = 8 + hlen
        data_size = size - self._start
        self._tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            name: self._check_entry(name, entry, data_size) for name, entry in header.items()
        }
        self._check_layout()

    def _error(self, problem: str) -> RecordFormatError:
        return RecordFormatError(shown_key(self.key), problem)

    def _check_entry(self, name: str, entry: object, data_size: int):
        """(dtype label, shape, begin, end) of one tensor, its bytes within the data section."""
        try:
            label, shape = entry["dtype"], entry["shape"]  # type: ignore[index]
            begin, end = entry["data_offsets"]  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise self._error(f"header entry {_brief(name)} is not a tensor") from None
        if type(label) is not str or label not in STORAGE_DTYPES:
            raise self._error(f"{_brief(name)} has unsupported dtype {_brief(label)}")
        if type(shape) is not list or not all(
            type(n) is int and n >= 0 for n in (*shape, begin, end)
        ):
            raise self._error(
                f"{_brief(name)}: shape {_brief(shape)} and data_offsets [{_brief(begin)}, "
                f"{_brief(end)}] are not integers >= 0"
            )
        if not begin <= end <= data_size or end - begin != _nbytes(label, shape, data_size):
            raise self._error(
                f"{_brief(name)} offsets {begin}..{end} do not fit shape {_brief(shape)}"
            )
        return label, tuple(shape), begin, end

    def _check_layout(self) -> None:
        """The tensors a reader relies on, present and with dims that agree."""
        missing = [n for n in (ACTIVATIONS, *INDEX_TENSORS) if n not in self._tensors]
        if missing:
            raise self._error(f"missing tensors {', '.join(missing)}")
        label, shape, _, _ = self._tensors[ACTIVATIONS]
        if label == "I32" or len(shape) != 3 or 0 in (shape[0], shape[2]):
            raise self._error(
                f"{ACTIVATIONS} is {label} {_brief(list(shape))}, not [layers >= 1, tokens, "
                "hidden >= 1]"
            )
        for name in INDEX_TENSORS:
            if self._tensors[name][0] != "I32" or len(self._tensors[name][1]) != 1:
                raise self._error(f"{name} is not a 1-D I32 tensor")
        for axis, name in ((0, "layer_ids"), (1, "token_positions")):
            if shape[axis] != self._tensors[name][1][0]:
                raise self._error(
                    f"{ACTIVATIONS} {list(shape)} has {shape[axis]} rows on axis {axis} but "
                    f"{name} has {self._tensors[name][1][0]} entries"
                )

    def tiles_data(self) -> bool:
        """Whether the tensors cover the data section exactly, as safetensors requires (no gap,
        overlap or tail). Nothing a reader does depends on it: `verify` checks it, not `[key]`."""
        spans = sorted((begin, end) for _, _, begin, end in self._tensors.values())
        ends = [0] + [end for _, end in spans]
        data_size = len(self._buf) - self._start
        return [begin for begin, _ in spans] == ends[:-1] and ends[-1] == data_size

    def _raw(self, name: str) -> np.ndarray:
        label, shape, begin, end = self._tensors[name]
        count = (end - begin) // _ITEMSIZE[label]
        array = np.frombuffer(self._buf, STORAGE_DTYPES[label], count, self._start + begin)
        return array.reshape(shape)

    # --- tensors -------------------------------------------------------------------------
    @property
    def storage_dtype(self) -> str:
        """safetensors label of the activations: F16, BF16 or F32."""
        return self._tensors[ACTIVATIONS][0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """[n_layers, n_tokens, hidden] of `all_layers_activations`."""
        return self._tensors[ACTIVATIONS][1]  # type: ignore[return-value]

    def _values(self, part: np.ndarray) -> np.ndarray:
        return bf16_to_f32(part) if self.storage_dtype == "BF16" else part

    @property
    def all_layers_activations(self) -> np.ndarray:
        return self._values(self._raw(ACTIVATIONS))

    @property
    def activations(self) -> np.ndarray:
        """The last captured layer, [n_tokens, hidden]."""
        return self._values(self._raw(ACTIVATIONS)[-1])

    @property
    def layer_ids(self) -> np.ndarray:
        return self._raw("layer_ids")

    @property
    def token_positions(self) -> np.ndarray:
        return self._raw("token_positions")

    @property
    def prompt_token_ids(self) -> np.ndarray:
        return self._raw("prompt_token_ids")

    @property
    def generated_token_ids(self) -> np.ndarray:
        return self._raw("generated_token_ids")

    def tensor(self, name: str) -> np.ndarray | None:
        """An optional tensor (a view), or None when this record has none of that name."""
        return self._raw(name) if name in self._tensors else None

    # token statistics (None in records written without them)
    generated_logprobs = property(lambda self: self.tensor(GENERATED_LOGPROBS))
    generated_entropy = property(lambda self: self.tensor(GENERATED_ENTROPY))
    topk_ids = property(lambda self: self.tensor(TOPK_IDS))
    topk_logprobs = property(lambda self: self.tensor(TOPK_LOGPROBS))

    def slice(
        self, layers: int | Iterable[int] | None = None, tokens: slice | Sequence[int] | None = None
    ) -> np.ndarray:
        """Copy of some layers x some tokens: [len(layers), n_selected_tokens, hidden].

        `layers` are layer ids as numbered by the model (values of `layer_ids`); `tokens` index
        the record's token axis (a slice or a list of indices; see `token_positions`).
        """
        raw = self._raw(ACTIVATIONS)
        cols = slice(None) if tokens is None else tokens
        if layers is None:
            part = raw[:, cols]
        else:
            rows = layer_rows(self.key, self._raw("layer_ids").tolist(), layers)
            if len(rows) == 1:  # basic slicing: only that layer's rows are read
                part = raw[rows[0] : rows[0] + 1, cols]
            else:
                part = np.stack([raw[r, cols] for r in rows]) if rows else raw[:0, cols]
        return self._values(part) if self.storage_dtype == "BF16" else np.array(part)

    # --- metadata ------------------------------------------------------------------------
    def _meta(self, name: str) -> str:
        return self.metadata.get(name, "")

    prompt = property(lambda self: self._meta("prompt"))
    response = property(lambda self: self._meta("response"))
    model = property(lambda self: self._meta("model"))
    timestamp = property(lambda self: self._meta("timestamp"))
    backend = property(lambda self: self._meta("backend"))
    task = property(lambda self: self._meta("task"))
    capture_tokens = property(lambda self: self._meta("capture_tokens"))
    dtype = property(lambda self: self._meta("dtype"))

    @property
    def capture_topk(self) -> int:
        """Top-k alternatives kept per generated token; 0 for records without token statistics
        (also those written before them, which carry no such field)."""
        value = self._meta("capture_topk")
        return int(value) if value.isdigit() else 0

    @property
    def doc_id(self) -> int | None:
        value = self._meta("doc_id")
        return int(value) if value.lstrip("-").isdigit() else None

    @property
    def gen_kwargs(self) -> dict:
        try:
            value = json.loads(self._meta("gen_kwargs") or "{}")
        except (json.JSONDecodeError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise self._error(f"gen_kwargs {_brief(self._meta('gen_kwargs'))} is not a JSON object")
        return value

    @property
    def checksum(self) -> str | None:
        """The checksum written with the record; None for records from before checksums."""
        return self.metadata.get(CHECKSUM)

    def data_checksum(self) -> str:
        """Checksum of the stored data section as it is now (reads every byte of it), of the
        kind the record carries (ValueError for a kind this version does not know)."""
        kind = self.checksum.partition(":")[0] if self.checksum else "xxh3"
        return data_checksum([self._buf[self._start :]], kind)

    @property
    def buffer(self) -> memoryview:
        """The record's bytes as stored (a view into the store's memory map)."""
        return self._buf

    @property
    def nbytes(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return (
            f"Record({self.key[:16]}…, model={self.model!r}, task={self.task!r}, "
            f"doc_id={self.doc_id}, shape={list(self.shape)}, dtype={self.dtype})"
        )


# The writer's header ends with the tensor entries, the activations first (json.dumps of the
# header dict, compact, then spaces). Matched up to the end of the header, they are the
# top-level entries (the last of duplicate keys, as JSON parsers take them): no string can
# hold this text, since quotes inside a JSON string are escaped.
_ACTIVATIONS_ENTRY = (
    rb'\{"dtype":"(F16|BF16|F32)","shape":\[([0-9]+),([0-9]+),([0-9]+)\],'
    rb'"data_offsets":\[([0-9]+),([0-9]+)\]\}'
)
_LAYER_IDS_ENTRY = rb'\{"dtype":"I32","shape":\[([0-9]+)\],"data_offsets":\[([0-9]+),([0-9]+)\]\}'
_ANY_TENSOR = rb'\{"dtype":"[A-Z0-9]+","shape":\[[0-9,]*\],"data_offsets":\[[0-9]+,[0-9]+\]\}'
_WRITER_TAIL = re.compile(
    rb',"all_layers_activations":'
    + _ACTIVATIONS_ENTRY
    + rb',"layer_ids":'
    + _LAYER_IDS_ENTRY
    + rb'(?:,"[A-Za-z0-9_]+":'
    + _ANY_TENSOR
    + rb")*\} *"
)
_TAIL_START = b',"all_layers_activations":{"dtype":"'
_TAIL_WINDOW = 1024  # bytes at the end of a header that hold the tensor entries


class Layout(NamedTuple):
    """Where a record's activations lie: what a slice read needs of its header."""

    label: str  # F16, BF16 or F32
    shape: tuple[int, int, int]
    start: int  # offset of the activations in the record's bytes
    layer_ids: bytes  # the layer_ids tensor's bytes (I32)


def activation_layout(key: str, buffer: memoryview) -> Layout:
    """The layout of a record's activations, without parsing its whole header when it ends as
    the writer writes it (offsets and shapes checked as `Record` checks them); any other header
    is parsed by `Record`, with its checks and errors."""
    fast = _writer_layout(buffer)
    if fast is not None:
        return fast
    record = Record(key, buffer)
    label, shape, begin, _ = record._tensors[ACTIVATIONS]
    _, _, ids_begin, ids_end = record._tensors["layer_ids"]
    ids = bytes(buffer[record._start + ids_begin : record._start + ids_end])
    return Layout(label, shape, record._start + begin, ids)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1024)
def _tail_fields(tail: bytes) -> tuple | None:
    """The fields of the writer's tensor entries: records of one shape share them (offsets are
    relative to the data), so a read of many records matches each kind once."""
    match = _WRITER_TAIL.fullmatch(tail)
    return None if match is None else (match.group(1).decode(), *map(int, match.groups()[1:]))


def _writer_layout(buffer: memoryview) -> Layout | None:
    size = len(buffer)
    if size < 8:
        return None
    (hlen,) = struct.unpack_from("<Q", buffer, 0)
    if hlen > size - 8:
        return None
    tail = bytes(buffer[8 + hlen - min(hlen, _TAIL_WINDOW) : 8 + hlen])  # not the prompt
    entries = tail.rfind(_TAIL_START)
    fields = _tail_fields(tail[entries:]) if entries >= 0 else None
    if fields is None:
        return None
    label, layers, tokens, hidden, begin, end, count, ids_begin, ids_end = fields
    data = size - 8 - hlen
    if (
        count != layers
        or 0 in (layers, hidden)
        or not begin <= end <= data
        or end - begin != _nbytes(label, (layers, tokens, hidden), data)
        or not ids_begin <= ids_end <= data
        or ids_end - ids_begin != 4 * layers
    ):
        return None
    start = 8 + hlen
    ids = bytes(buffer[start + ids_begin : start + ids_end])
    return Layout(label, (layers, tokens, hidden), start + begin, ids)
