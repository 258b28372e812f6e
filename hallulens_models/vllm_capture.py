"""The front-end half of vLLM capture, shared by `hallulens-vllm` and the `vllm serve` plugin.

The engine side (`vllm_worker`) keeps rows and token statistics by request tag; this side
decides the engine settings capture needs, tags requests, works out from each finished output
which rows its record holds (the response ends where HF's would: first EOS or stop-string
token), and turns what the worker hands over into `CapturedSample`s for the shared record writer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np

from hallulens_capture.errors import CaptureConfigError, CaptureError
from hallulens_capture.positions import response_length, token_positions
from hallulens_capture.record import storage_dtype
from hallulens_capture.session import CapturedSample
from hallulens_capture.spec import CaptureSpec
from hallulens_models.vllm_handover import read, release
from hallulens_models.vllm_worker import CONFIG_KEY, TAG

log = logging.getLogger(__name__)

TESTED_VLLM = ("0.32.0",)
WORKER = "hallulens_models.vllm_worker.CaptureWorker"
COLLECT = "hallulens_collect"  # the worker method collective_rpc calls
HANDOVER_BYTES = 8 << 20  # rows the worker writes out per collect call (`handover_groups`)

_REFUSED = {
    "pipeline_parallel_size": (
        lambda v: int(v) > 1,
        "use tensor_parallel_size within a node and data_parallel_size for more replicas (see "
        "the README: vLLM 0.32 passes captured layers between stages, but that path is untested)",
    ),
    "speculative_config": (bool, "verified draft tokens do not map to rows one to one"),
    "enable_prefix_caching": (
        bool,
        "cached prefix tokens are never recomputed, so their activations would be missing",
    ),
}


def engine_settings(settings: dict, layer_ids: Sequence[int], spec: CaptureSpec) -> dict:
    """Engine arguments for capture: refuse what it cannot follow, add our worker and its
    settings, turn prefix caching off. `settings` holds the user's engine arguments.

    Also selects vLLM's V1 model runner (Model Runner V2, the GPU default for dense models,
    keeps its batch elsewhere) and warns on an untested vLLM version: the worker then checks
    every internal it uses and stops with a message rather than capture garbage.
    """
    installed = version("vllm")
    if installed.split("+")[0] not in TESTED_VLLM:
        log.warning(
            "vLLM %s is not one of the versions hallulens-vllm was tested with (%s)",
            installed,
            ", ".join(TESTED_VLLM),
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    for name, (bad, why) in _REFUSED.items():
        value = settings.get(name)
        if value is not None and bad(value):
            raise CaptureConfigError(
                f"{name}={value} cannot be used with activation capture: {why}"
            )
    worker = settings.get("worker_cls") or "auto"
    if worker not in ("auto", WORKER):
        raise CaptureConfigError(f"worker_cls={worker}: capture needs {WORKER}")
    extra = dict(settings.get("additional_config") or {})
    extra[CONFIG_KEY] = {
        "layer_ids": [int(i) for i in layer_ids],
        "tokens": spec.tokens,
        "dtype": spec.dtype,
        "topk": spec.topk,
    }
    return {"worker_cls": WORKER, "enable_prefix_caching": False, "additional_config": extra}


def tag(params, value: str) -> None:
    """Mark a request for capture (the worker captures only tagged requests)."""
    params.extra_args = {**(params.extra_args or {}), TAG: value}


@dataclass(frozen=True)
class RowPlan:
    """What one finished request's record holds."""

    tag: str
    prompt_token_ids: list[int]
    generated_token_ids: list[int]
    positions: np.ndarray


def plan(
    tag_: str,
    prompt_token_ids: Sequence[int],
    completion,
    params,
    scope: str,
    eos_id: int | None,
    decode: Callable,
) -> RowPlan:
    """Tokens and positions of one finished request's record; `completion` is a vLLM
    `CompletionOutput` (token_ids, finish_reason, stop_reason) holding the whole answer."""
    generated = list(completion.token_ids)
    ends = set() if eos_id is None else {eos_id}
    if completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
        ends.update(generated[-1:])  # vLLM stopped on this token (EOS or a stop token id)
    keep = response_length(
        generated,
        ends,
        params.stop or [],
        lambda ids: decode(ids, skip_special_tokens=params.skip_special_tokens),
    )
    prompt = list(prompt_token_ids)
    return RowPlan(tag_, prompt, generated[:keep], token_positions(scope, len(prompt), keep))


def wanted(plans: Sequence[RowPlan], topk: int) -> list[list]:
    """The collect request: [tag, first position, count, generated tokens] per plan (the
    statistics of that many generated tokens; zeros drop the request's rows)."""
    return [
        [
            p.tag,
            int(p.positions[0]) if len(p.positions) else 0,
            len(p.positions),
            len(p.generated_token_ids) if topk else 0,
        ]
        for p in plans
    ]


def handover_groups(plans: Sequence[RowPlan], row_bytes: int) -> list[list[int]]:
    """The plans (by index, in order) of each hand-over call: consecutive plans holding about
    `HANDOVER_BYTES` of rows (one plan at least). One call per request would pay the engine's
    RPC round trip each time; one call for all would leave the writer idle until the worker has
    written every request out."""
    groups: list[list[int]] = []
    size = HANDOVER_BYTES
    for i, p in enumerate(plans):
        if size >= HANDOVER_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(p.positions) * row_bytes
    return groups


def samples(
    plans: Sequence[RowPlan],
    results: Sequence[list[dict]],
    dtype: str,
    topk: int,
    shape: tuple[int, int],
) -> list[CapturedSample]:
    """Turn the hand-over files of every rank's `collect` result into samples. The files are
    mapped, not read (their bytes are copied once, into the record), and go back to their
    worker when the record is written (`vllm_handover.read`)."""
    found = {item["tag"]: item for rank in results for item in rank}
    items = {
        p.tag: found.get(p.tag) or {"missing": "all"}
        for p in plans
        if len(p.positions) or (topk and len(p.generated_token_ids))
    }
    if any("path" not in item for item in items.values()):
        for item in found.values():  # none mapped yet: all go back to their worker
            if "path" in item:
                release(item["path"], 0)
        errors = [item["error"] for item in items.values() if "error" in item]
        if errors:  # the worker could not write them (a full /dev/shm)
            raise CaptureError(errors[0])
        missing = [item["missing"] for item in items.values() if "missing" in item]
        if "token statistics" in missing:
            raise CaptureError("vLLM gave no token statistics for some tokens of a request")
        raise CaptureError(
            f"vLLM ran no forward pass for positions {missing[0]} of a request; its activations "
            "are incomplete"
        )
    storage = storage_dtype(dtype)
    layers, hidden = shape
    out = []
    for p in plans:
        rows = np.empty((layers, 0, hidden), dtype=storage)
        stats = np.empty((0, 2 + 2 * topk), dtype=np.float32) if topk else None
        if p.tag in items:
            kept, stats = read(items[p.tag], storage, topk)
            rows = rows if kept is None else kept
        out.append(
            CapturedSample(p.prompt_token_ids, p.generated_token_ids, p.positions, rows, stats)
        )
    return out


def recomputed(results: Sequence[list[dict]]) -> int:
    return sum(item.get("recomputed", 0) for rank in results for item in rank)
