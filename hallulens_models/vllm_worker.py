"""Capture inside vLLM's worker: chosen layers' residual stream for the requests that ask.

Route: the model's own auxiliary hidden-state outputs (`EagleModelMixin`, what EAGLE-3 and
vLLM's `extract_hidden_states` use). The layer set is fixed right after the weights load and
before `compile_or_warm_up_model`, so it is part of the traced graph: capture works with
torch.compile and CUDA graphs, no eager mode needed. Each aux entry is `hidden + residual`
(vLLM layers return the two un-summed), entry 0 the embedding output — the project's layer
numbering as is.

Per forward step, the wrapped `_model_forward` picks the rows of tagged requests
(`SamplingParams.extra_args[TAG]`) by `query_start_loc`, gathers them on the device in one
`index_select` per layer, converts them to the storage dtype and starts one copy to host
(asynchronous into pinned memory on CUDA). Rows are kept by absolute position (the request's
`num_computed_tokens` at that step), so chunked prefill arrives in order-independent pieces and a
preempted request's recomputation overwrites its earlier rows instead of duplicating them.
`hallulens_collect` (called through `collective_rpc` after a generate call) assembles each
request's rows and hands them over as raw files in a staging directory, so no bulk data crosses
the engine's RPC channel. Only the first tensor-parallel rank keeps rows (the residual stream is
replicated after each all-reduce).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hallulens_capture.errors import CaptureError
from hallulens_models.hf_tap import TORCH_DTYPES, to_storage

CONFIG_KEY = "hallulens_capture"  # in vLLM's additional_config: layer_ids, tokens, dtype
TAG = "hallulens_tag"  # in SamplingParams.extra_args: the request's capture id


class LayerRows:
    """Collects the aux hidden states of tagged requests, step by step, on one worker."""

    def __init__(self, runner, layer_ids: list[int], tokens: str, dtype: str) -> None:
        self._runner = runner
        self._layers = len(layer_ids)
        self._tokens = tokens
        self._dtype = TORCH_DTYPES[dtype]
        # per request, in arrival order: (first position, host tensor [layers, rows, hidden])
        self._rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self._events: list[torch.cuda.Event] = []
        self._pinned = runner.device.type == "cuda"

    def _span(self, state) -> tuple[int, float]:
        """Positions this request keeps: the prompt, the fed generated tokens, or both."""
        n_prompt = len(state.prompt_token_ids or ())
        if self._tokens == "prompt":
            return 0, n_prompt
        return (n_prompt if self._tokens == "generated" else 0), float("inf")

    def take(self, aux: list[torch.Tensor]) -> None:
        """Keep this step's rows of tagged requests (called right after the model's forward)."""
        if len(aux) != self._layers:
            raise CaptureError(f"the model returned {len(aux)} aux layers, expected {self._layers}")
        runner = self._runner
        batch = runner.input_batch
        n = batch.num_reqs
        if not n:
            return
        starts = runner.query_start_loc.np[: n + 1]
        picks: list[tuple[str, int, int, int]] = []  # tag, first position, first row, rows
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            tag = (getattr(params, "extra_args", None) or {}).get(TAG)
            if tag is None:
                continue
            computed, count = int(batch.num_computed_tokens_cpu[i]), int(starts[i + 1] - starts[i])
            lo, hi = self._span(state)
            first, last = max(computed, lo), min(computed + count, hi)
            if first < last:
                picks.append((tag, first, int(starts[i]) + first - computed, int(last - first)))
        if not picks:
            return
        index = np.concatenate([np.arange(row, row + k) for _, _, row, k in picks])
        index_t = torch.from_numpy(index).to(aux[0].device)
        rows = torch.stack([h.index_select(0, index_t) for h in aux]).to(self._dtype)
        if self._pinned:
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events.append(event)
            rows = host
        offset = 0
        for tag, first, _, k in picks:
            self._rows.setdefault(tag, []).append((first, rows[:, offset : offset + k]))
            offset += k

    def collect(self, wanted: list[list], directory: str, forget_others: bool) -> list[dict]:
        """Write the rows `[tag, first position, count]` asks for, one raw file per request
        (count 0 just forgets the request's rows). `forget_others` also drops every request not
        asked for: after an offline generate call those are leftovers (aborted requests); a
        server has others still running. A request missing a row is reported, never padded.
        """
        for event in self._events:
            event.synchronize()
        self._events.clear()
        out = []
        for tag, first, count in wanted:
            chunks = self._rows.pop(tag, [])
            if not count:
                continue
            hidden = chunks[0][1].shape[-1] if chunks else 0
            data = torch.empty((self._layers, count, hidden), dtype=self._dtype)
            filled = np.zeros(count, dtype=np.int32)
            for start, chunk in chunks:  # later chunks (recomputation) overwrite earlier ones
                a, b = max(start, first), min(start + chunk.shape[1], first + count)
                if a < b:
                    data[:, a - first : b - first] = chunk[:, a - start : b - start]
                    filled[a - first : b - first] += 1
            if not filled.all():
                missing = np.flatnonzero(filled == 0) + first
                out.append({"tag": tag, "missing": [int(missing[0]), int(missing[-1])]})
                continue
            path = os.path.join(directory, f"{tag}.bin")
            to_storage(data).tofile(path)
            recomputed = int((filled > 1).sum())
            out.append(
                {
                    "tag": tag,
                    "path": path,
                    "shape": [self._layers, count, hidden],
                    "recomputed": recomputed,
                }
            )
        if forget_others:
            self._rows.clear()
        return out


def _install(worker) -> None:
    """Give a freshly loaded worker's model the aux layer outputs and its runner the row tap."""
    config = (worker.vllm_config.additional_config or {}).get(CONFIG_KEY)
    worker.hallulens_rows = None
    if not config:
        return
    runner = worker.model_runner
    missing = [
        name
        for name in ("input_batch", "query_start_loc", "requests", "_model_forward", "get_model")
        if not hasattr(runner, name)
    ]
    model = runner.get_model() if not missing else None
    if missing or not hasattr(model, "set_aux_hidden_state_layers"):
        what = (
            f"model runner {type(runner).__name__} lacks {missing}"
            if missing
            else (f"{type(model).__name__} has no auxiliary hidden-state outputs (EagleModelMixin)")
        )
        raise CaptureError(
            f"hallulens-vllm cannot capture here: {what}; tested with vLLM 0.32 and its "
            "Llama/Qwen/Mistral-family models on the V1 model runner"
        )
    layer_ids = [int(i) for i in config["layer_ids"]]
    model.set_aux_hidden_state_layers(tuple(layer_ids))
    runner.use_aux_hidden_state_outputs = True  # the runner unpacks (hidden, aux) itself
    from vllm.distributed import get_tp_group

    if get_tp_group().rank_in_group != 0:
        return
    rows = LayerRows(runner, layer_ids, config["tokens"], config["dtype"])
    forward = runner._model_forward

    def _model_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        rows.take(output[1])
        return output

    runner._model_forward = _model_forward
    worker.hallulens_rows = rows


class CaptureWorkerMixin:
    """Put before vLLM's worker class: installs capture between load and compile."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        _install(self)

    def hallulens_collect(
        self, wanted: list[list], directory: str, forget_others: bool = True
    ) -> list[dict]:
        rows = getattr(self, "hallulens_rows", None)
        return [] if rows is None else rows.collect(wanted, directory, forget_others)


def _worker_class() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as base
    else:
        from vllm.v1.worker.gpu_worker import Worker as base
    return type("CaptureWorker", (CaptureWorkerMixin, base), {"__module__": __name__})


CaptureWorker = _worker_class()  # vLLM's worker_cls: "hallulens_models.vllm_worker.CaptureWorker"
