"""Records built by hand with struct and json, independently of hallulens_capture.record: the
valid layout the format documents, and the crafted variants an adversary could store."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import zlib

import numpy as np
import xxhash


def key_of(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def arrays(layers: int = 2, tokens: int = 3, hidden: int = 4, fill: float = 0.5) -> dict:
    """The tensors of a `capture_tokens=prompt` record, in their stored order."""
    return {
        "all_layers_activations": np.full((layers, tokens, hidden), fill, dtype=np.float16),
        "layer_ids": np.arange(layers, dtype=np.int32),
        "token_positions": np.arange(tokens, dtype=np.int32),
        "prompt_token_ids": np.arange(tokens, dtype=np.int32) + 100,
        "generated_token_ids": np.array([7], dtype=np.int32),
    }


def header(tensors: dict, prompt: str = "crafted prompt", checksum: str | None = None) -> dict:
    """A valid header for `tensors` (name -> array, in order); `checksum` ("xxh3" or, as older
    records carry, "crc32") adds that hash of the concatenated tensor bytes as documented."""
    labels = {np.float16: "F16", np.float32: "F32", np.int32: "I32", np.uint16: "BF16"}
    meta = {
        "prompt": prompt,
        "response": "r",
        "model": "m",
        "timestamp": "2026-01-01T00:00:00.000+00:00",
        "backend": "test",
        "task": "",
        "doc_id": "",
        "capture_tokens": "prompt",
        "dtype": "float16",
        "gen_kwargs": "{}",
        "format": "hallulens-record/1",
    }
    data = b"".join(array.tobytes() for array in tensors.values())
    if checksum == "crc32":
        meta["checksum"] = f"crc32:{zlib.crc32(data):08x}"
    elif checksum == "xxh3":
        meta["checksum"] = f"xxh3:{xxhash.xxh3_64_hexdigest(data)}"
    out: dict = {"__metadata__": meta}
    offset = 0
    for name, array in tensors.items():
        out[name] = {
            "dtype": labels[array.dtype.type],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    return out


def value(head: dict | bytes, data: bytes) -> bytes:
    """Length prefix, header (padded to 8 bytes), data section."""
    raw = head if isinstance(head, bytes) else json.dumps(head).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def valid(prompt: str = "crafted prompt", checksum: str | None = None, **shape) -> bytes:
    tensors = arrays(**shape)
    return value(header(tensors, prompt, checksum), b"".join(a.tobytes() for a in tensors.values()))


def edited(edit, prompt: str = "crafted prompt") -> bytes:
    """A record whose header `edit(header)` changed in place (data section left as it was)."""
    tensors = arrays()
    head = copy.deepcopy(header(tensors, prompt))
    edit(head)
    return value(head, b"".join(a.tobytes() for a in tensors.values()))


def deep_header(depth: int = 200_000) -> bytes:
    """A record whose header JSON nests `depth` lists deep."""
    raw = b'{"__metadata__": {}, "x": ' + b"[" * depth + b"]" * depth + b"}"
    return value(raw, b"")


def set_path(path: tuple, new) -> object:
    """An `edit` that sets header[path[0]][path[1]]... to `new`."""

    def edit(head: dict) -> None:
        target = head
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = new

    return edit


def reshaped(shape: list[int], nbytes: int | None = None):
    """An `edit` giving the activations `shape`, their offsets spanning `nbytes` (default: the
    bytes the shape would need, so only the shape itself is wrong)."""

    def edit(head: dict) -> None:
        entry = head["all_layers_activations"]
        begin = entry["data_offsets"][0]
        size = nbytes if nbytes is not None else 2 * int(np.prod(shape, dtype=object))
        entry["shape"] = shape
        entry["data_offsets"] = [begin, begin + size]

    return edit


# name -> (crafted value, what the refusal says): every one a reader once crashed on or misread
CRAFTED = {
    "deep-header": (deep_header(), "nested too deeply"),
    "dtype-list": (edited(set_path(("layer_ids", "dtype"), ["I32"])), "unsupported dtype"),
    "shape-infinity": (
        value(
            json.dumps(header(arrays()))
            .replace('"shape": [2, 3, 4]', '"shape": [2, Infinity, 4]')
            .encode(),
            b"".join(a.tobytes() for a in arrays().values()),
        ),
        "are not integers >= 0",
    ),
    "int-prompt": (edited(set_path(("__metadata__", "prompt"), 5)), "'prompt' not UTF-8 strings"),
    "int-doc-id": (edited(set_path(("__metadata__", "doc_id"), 3)), "'doc_id' not UTF-8 strings"),
    "lone-surrogate": (
        edited(set_path(("__metadata__", "model"), "\ud800")),
        "'model' not UTF-8 strings",
    ),
    "one-dim": (edited(reshaped([24])), "not [layers >= 1, tokens, hidden >= 1]"),
    "huge-zero": (edited(reshaped([0, 2**62, 576], 0)), "not [layers >= 1, tokens, hidden >= 1]"),
    "negative": (edited(reshaped([-2, -3, 4], 48)), "are not integers >= 0"),
    "tokens-mismatch": (edited(reshaped([2, 6, 2])), "has 6 rows on axis 1"),
}
