"""What to capture: the `activations=`, `capture_*` and `map_size_gb` model_args, checked early.

`capture_topk=K` (default 20) stores, per generated token, its logprob, the K most likely tokens
with their logprobs and the entropy of the next-token distribution; 0 stores none of them.

`capture_shard=I/N` (or `HALLULENS_CAPTURE_SHARD`) makes a run one of N independent jobs (a SLURM
array, say): it captures only the requests whose key falls to share I (a hash of the key, so
every job agrees without talking to the others) into the store's shard `jobI`.

Everything here is validated before any model weights load, so a typo costs a second, not a
model load. Layer ids follow one numbering on every engine: 0 = embedding output (the input of
the first decoder layer), i = 1..L = the residual stream after decoder layer i, before the final
norm. Negative ids count from the end: -1 is L.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from hallulens_capture.errors import CaptureConfigError
from hallulens_capture.options import checked_number

ENV_STORE_PATH = "ACTIVATION_LMDB_PATH"
ENV_SHARD = "HALLULENS_CAPTURE_SHARD"
TOKEN_SCOPES = ("generated", "prompt", "all", "response")
DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_MAP_SIZE_GB = 16.0
DEFAULT_TOPK = 20
MIN_MAP_SIZE_GB = 1 / 1024  # 1 MiB; the store grows its map when full
MAX_MAP_SIZE_GB = 1 << 17  # 128 TiB, a 64-bit process's whole address space (x86-64, arm64)

_ITEM = re.compile(r"^(-?\d+)(?:\s*(?:-|:|\.\.)\s*(-?\d+))?$")


def parse_layers(
    value: object, option: str = "capture_layers"
) -> tuple[tuple[int, int], ...] | None:
    """Parse a layer selection into inclusive (start, end) ranges; None means all layers.

    Accepts what lm-eval's model_args parsers hand over: `all`, an int (or an integral float:
    lm-eval turns `-1` into `-1.0`), a list, or a string of items separated by `,`, `;` or
    spaces (optionally in brackets), each an id or an inclusive range `a-b` (also `a:b`,
    `a..b`; ids may be negative). `option` names the setting in error messages.
    """
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if isinstance(value, bool):
        raise CaptureConfigError(f"{option}={value!r}: expected 'all', ids or ranges")
    if isinstance(value, float):
        if not value.is_integer():
            raise CaptureConfigError(f"{option}={value!r}: layer ids are integers")
        value = int(value)
    if isinstance(value, int):
        return ((value, value),)
    if isinstance(value, (list, tuple)):
        parts = [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in value]
    elif isinstance(value, str):
        parts = [p for p in re.split(r"[,;\s]+", value.strip().strip("[]")) if p]
    else:
        raise CaptureConfigError(f"{option}={value!r}: expected 'all', ids or ranges")
    if not parts:
        raise CaptureConfigError(f"{option} is empty: give 'all', ids (0,8,16) or ranges (10-20)")
    items = []
    for part in parts:
        match = _ITEM.match(part.strip())
        if match is None:
            raise CaptureConfigError(
                f"{option}: {part!r} is not a layer id or range "
                "(examples: all | 0,8,16 | 10-20 | -4--1)"
            )
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        items.append((start, end))
    return tuple(items)


def resolve_layers(
    items: tuple[tuple[int, int], ...] | None,
    last: int,
    option: str = "capture_layers",
    holder: str | None = None,
) -> tuple[int, ...]:
    """Sorted unique ids in 0..last for parsed `items` (negative ids count back from `last`);
    `holder` describes what has layers 0..last in error messages."""
    count = last + 1
    if items is None:
        return tuple(range(count))
    holder = holder or f"a model with {last} decoder layers"
    ids: set[int] = set()
    for start, end in items:
        lo, hi = (v + count if v < 0 else v for v in (start, end))
        for v, raw in ((lo, start), (hi, end)):
            if not 0 <= v < count:
                raise CaptureConfigError(
                    f"{option}: layer {raw} is out of range for {holder} "
                    f"(ids 0..{last}, or -{count}..-1)"
                )
        if lo > hi:
            raise CaptureConfigError(f"{option}: range {start}-{end} is empty")
        ids.update(range(lo, hi + 1))
    return tuple(sorted(ids))


def _job_shard(value: object) -> tuple[int, int] | None:
    """`capture_shard=I/N` -> (I, N), 0 <= I < N."""
    if value is None or value == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise CaptureConfigError(
            f"capture_shard={value!r}: expected I/N with 0 <= I < N (this job's share of N, "
            "e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT for an array 0..N-1)"
        )
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class CaptureSpec:
    """Validated capture options; `layer_ids(L)` resolves layers once the model depth is known."""

    path: str
    layers: tuple[tuple[int, int], ...] | None
    tokens: str
    dtype: str
    map_size_gb: float
    shard: tuple[int, int] | None = None  # (I, N) of a job array; None: one job does it all
    topk: int = DEFAULT_TOPK  # alternatives kept per generated token; 0: no token statistics

    @classmethod
    def from_model_args(
        cls,
        activations: object = None,
        capture_layers: object = None,
        capture_tokens: object = None,
        capture_dtype: object = None,
        map_size_gb: object = None,
        capture_shard: object = None,
        capture_topk: object = None,
        environ: Mapping[str, str] = os.environ,
    ) -> CaptureSpec | None:
        """Build the spec from model_args; None when capture is off (no path given anywhere)."""
        path = activations if activations not in (None, "") else environ.get(ENV_STORE_PATH) or None
        if path is None:
            given = {
                "capture_layers": capture_layers,
                "capture_tokens": capture_tokens,
                "capture_dtype": capture_dtype,
                "map_size_gb": map_size_gb,
                "capture_shard": capture_shard,
                "capture_topk": capture_topk,
            }
            named = [k for k, v in given.items() if v is not None]
            if named:
                raise CaptureConfigError(
                    f"{', '.join(named)} given but capture is off: add activations=PATH "
                    f"(or set {ENV_STORE_PATH})"
                )
            return None
        if not isinstance(path, str):
            raise CaptureConfigError(f"activations={path!r}: expected a directory path")
        tokens = "generated" if capture_tokens is None else str(capture_tokens).strip().lower()
        if tokens not in TOKEN_SCOPES:
            raise CaptureConfigError(
                f"capture_tokens={capture_tokens!r}: expected one of {', '.join(TOKEN_SCOPES)}"
            )
        dtype = "float16" if capture_dtype is None else str(capture_dtype).strip().lower()
        if dtype not in DTYPES:
            raise CaptureConfigError(
                f"capture_dtype={capture_dtype!r}: expected one of {', '.join(DTYPES)}"
            )
        size = DEFAULT_MAP_SIZE_GB
        if map_size_gb is not None:
            size = float(
                checked_number(
                    "map_size_gb", map_size_gb, minimum=MIN_MAP_SIZE_GB, maximum=MAX_MAP_SIZE_GB
                )
            )
        topk = DEFAULT_TOPK
        if capture_topk is not None:
            topk = int(checked_number("capture_topk", capture_topk, minimum=0, integer=True))
        return cls(
            path=path,
            layers=parse_layers("all" if capture_layers is None else capture_layers),
            tokens=tokens,
            dtype=dtype,
            map_size_gb=size,
            shard=_job_shard(environ.get(ENV_SHARD) if capture_shard is None else capture_shard),
            topk=topk,
        )

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """Resolve to sorted unique ids in 0..num_layers (num_layers = decoder layers, L)."""
        return resolve_layers(self.layers, num_layers)

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse more top-k alternatives than the model has tokens (checked, like the layers,
        once the model's config is read and before its weights load)."""
        if self.topk > vocab_size:
            raise CaptureConfigError(
                f"capture_topk={self.topk} is more than the model's vocabulary "
                f"({vocab_size} tokens)"
            )
