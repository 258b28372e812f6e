"""Capture inside vLLM's worker: chosen layers' residual stream for the requests that ask.

Route: the model's own auxiliary hidden-state outputs (`EagleModelMixin`, what EAGLE-3 and
vLLM's `extract_hidden_states` use). The layer set is fixed right after the weights load and
before `compile_or_warm_up_model`, so it is part of the traced graph: capture works with
torch.compile and CUDA graphs, no eager mode needed. Each aux entry is `hidden + residual`
(vLLM layers return the two un-summed), entry 0 the embedding output — the project's layer
numbering as is.

Per forward step, the wrapped `_model_forward` picks the rows of tagged requests
(`SamplingParams.extra_args[TAG]`) by `query_start_loc`; the rows are gathered into one
token-major block per step in the storage dtype (one slice per layer when they sit side by side,
as a prefill's and the decode rows of a batch of tagged requests do) and a helper thread writes
each request's run of rows into its hand-over file with one `pwrite` (`Handover`: a file in
shared memory; rows by absolute position, so chunked prefill arrives in order-independent pieces
and a preempted request's recomputation overwrites its earlier rows instead of duplicating
them). On a CPU engine the helper does the gathering too, from the step's outputs (vLLM makes
new ones each step), into a block it keeps (the largest step's rows), so the engine's thread
only notes the rows and goes on; on CUDA the block is gathered on the device and leaves it
asynchronously, into pinned memory, and the helper writes it out once the copy is done. At most
two steps wait for the helper.

Token statistics (capture_topk > 0): a hook before the runner's sampler copies the raw logits of
the tagged requests that sample a token this step (not partial prefill chunks), one after it
reduces them with the sampled tokens (`token_stats.Reduction`: on a CPU worker on a helper
thread while the engine goes on); one row of 2 + 2k floats per request and step leaves the
device, keyed by the generated token's index, so recomputation overwrites too. What the
client gets back is untouched: vLLM's own logprobs are computed from the same logits, which the
hooks only read.

`hallulens_collect` (called through `collective_rpc` as soon as a request has finished) waits
for the helper, appends the request's token statistics to its file and returns where it is, so
no bulk data crosses the engine's RPC channel and nothing is copied on the way: the front end
maps the file. Only the first tensor-parallel rank keeps rows (the residual stream is
replicated after each all-reduce).
"""

from __future__ import annotations

import collections
import functools
import itertools
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from hallulens_capture.errors import CaptureError
from hallulens_capture.record import storage_dtype
from hallulens_models import token_stats
from hallulens_models.hf_tap import TORCH_DTYPES, storage_view
from hallulens_models.vllm_handover import Handover, HandoverPool

CONFIG_KEY = "hallulens_capture"  # in vLLM's additional_config: layer_ids, tokens, dtype, topk
TAG = "hallulens_tag"  # in SamplingParams.extra_args: the request's capture id


class LayerRows:
    """Collects the aux hidden states and token statistics of tagged requests, step by step, on
    one worker."""

    def __init__(self, runner, layer_ids: list[int], tokens: str, dtype: str, topk: int) -> None:
        self._runner = runner
        self._layers = len(layer_ids)
        self._tokens = tokens
        self._dtype = TORCH_DTYPES[dtype]
        self._storage = storage_dtype(dtype)
        self._topk = topk
        self._pool = HandoverPool()
        self._handovers: dict[str, Handover] = {}  # per tagged request with rows, until collected
        # per request, in arrival order: (generated token index, host row [2 + 2k])
        self._stats: dict[str, list[tuple[int, torch.Tensor]]] = {}
        # this step's sampled rows of tagged requests: batch indexes, (tag, generated index)
        self._sampling: tuple[torch.Tensor, list[tuple[str, int]]] | None = None
        self._pinned = runner.device.type == "cuda"
        self._reduction = token_stats.Reduction(topk, threaded=not self._pinned) if topk else None
        self._loaded = False  # this step's sampled rows are in the reduction
        self._writing = ThreadPoolExecutor(1, "hallulens-rows", token_stats.helper_thread)
        self._block = torch.empty(0, dtype=self._dtype)  # the CPU helper's gathered rows
        self._written: collections.deque[Future] = collections.deque()  # steps being written

    def _span(self, state) -> tuple[int, int]:
        """Positions this request keeps: the prompt, the fed generated tokens, both, or (for
        `response`) the fed generated tokens from the last prompt token on. A request feeds at
        most its prompt and max_tokens - 1 generated tokens."""
        n_prompt = len(state.prompt_token_ids or ())
        if self._tokens == "prompt":
            return 0, n_prompt
        params = getattr(state, "sampling_params", None)
        limit = getattr(params, "max_tokens", None) or self._runner.model_config.max_model_len
        first = {"generated": n_prompt, "response": n_prompt - 1}.get(self._tokens, 0)
        return first, n_prompt + int(limit)

    def _handover(self, tag: str, span: tuple[int, int], hidden: int) -> Handover:
        """The request's hand-over file for the positions of `span`, made at its first kept row."""
        handover = self._handovers.get(tag)
        if handover is None:
            first, end = span
            shape = [end - first, self._layers, hidden]
            handover = self._pool.open(shape, self._storage, first)
            self._handovers[tag] = handover
        return handover

    def take(self, aux: list[torch.Tensor]) -> None:
        """Note this step's rows of tagged requests (called right after the model's forward)
        and have them written into their hand-over files off the engine's thread; note which
        requests the sampler will give a token (not a partial prefill chunk)."""
        if len(aux) != self._layers:
            raise CaptureError(f"the model returned {len(aux)} aux layers, expected {self._layers}")
        runner = self._runner
        batch = runner.input_batch
        n = batch.num_reqs
        self._sampling = None
        if not n:
            return
        starts = runner.query_start_loc.np[: n + 1]
        discard = runner.discard_request_mask.np[:n]
        picks: list[tuple[Handover, int, int, int]] = []  # file, first row there, batch row, rows
        sampled: list[tuple[int, str, int]] = []  # batch index, tag, generated token index
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            tag = (getattr(params, "extra_args", None) or {}).get(TAG)
            if tag is None:
                continue
            computed, count = int(batch.num_computed_tokens_cpu[i]), int(starts[i + 1] - starts[i])
            if self._topk and not discard[i]:
                sampled.append((i, tag, computed + count - len(state.prompt_token_ids)))
            lo, hi = self._span(state)
            first, last = max(computed, lo), min(computed + count, hi)
            if first < last:
                handover = self._handover(tag, (lo, hi), aux[0].shape[-1])
                picks.append(
                    (handover, first - lo, int(starts[i]) + first - computed, last - first)
                )
        if sampled:
            index = torch.tensor([i for i, _, _ in sampled], device=aux[0].device)
            self._sampling = index, [(tag, j) for _, tag, j in sampled]
        if not picks:
            return
        if self._pinned:  # the step's rows leave the device in one block, into pinned memory
            block = self._to_host(self._gather(aux, picks))
            ready = torch.cuda.Event()
            ready.record()
            job = functools.partial(_write_rows, block, picks, ready)
        else:  # the helper gathers from the step's outputs (vLLM makes new ones each step)
            job = functools.partial(self._gather_and_write, aux, picks)
        if len(self._written) >= 2:  # bounded: the step before the last must be written
            self._written.popleft().result()
        self._written.append(self._writing.submit(job))

    @torch.inference_mode()  # the engine's outputs are inference tensors (vLLM runs in that mode)
    def _gather_and_write(
        self, aux: list[torch.Tensor], picks: list[tuple[Handover, int, int, int]]
    ) -> None:
        _write_rows(self._gather(aux, picks), picks)

    def _gather(
        self, aux: list[torch.Tensor], picks: list[tuple[Handover, int, int, int]]
    ) -> torch.Tensor:
        """The picked rows of every layer, token-major [rows, layers, hidden] in the storage
        dtype, one slice per layer when the rows sit side by side (a prefill, the decode rows of
        a batch of tagged requests), gathered otherwise (on the device on CUDA, on the helper on
        CPU)."""
        first_row = picks[0][2]
        count = sum(k for *_, k in picks)
        adjacent = all(a[2] + a[3] == b[2] for a, b in itertools.pairwise(picks))
        shape = (count, len(aux), aux[0].shape[-1])
        size = count * len(aux) * aux[0].shape[-1]
        if self._pinned:  # torch's caching allocator keeps the device's memory
            out = torch.empty(shape, dtype=self._dtype, device=aux[0].device)
        else:  # the helper's block, kept: fresh host memory faults in page by page every step
            if self._block.numel() < size:
                self._block = torch.empty(size, dtype=self._dtype)
            out = self._block[:size].view(shape)
        if adjacent:
            for i, h in enumerate(aux):
                out[:, i].copy_(h[first_row : first_row + count])
            return out
        index = np.concatenate([np.arange(row, row + k) for _, _, row, k in picks])
        index_t = torch.from_numpy(index).to(aux[0].device)
        for i, h in enumerate(aux):
            out[:, i].copy_(h.index_select(0, index_t))
        return out

    def before_sampling(self, module, args, kwargs) -> None:
        """The raw logits of the sampled tagged requests, copied before the sampler (which may
        change them in place) runs."""
        if self._sampling is not None and self._reduction is not None:
            logits = kwargs["logits"] if "logits" in kwargs else args[0]
            self._reduction.load(logits, self._sampling[0])
            self._loaded = True

    def after_sampling(self, module, args, output) -> None:
        """Each sampled token's statistics, one row per request, leave the device together."""
        if not self._loaded or self._sampling is None:
            return
        index, places = self._sampling
        chosen = output.sampled_token_ids.index_select(0, index)[:, 0]

        def done(rows: torch.Tensor) -> None:
            for (tag, j), row in zip(places, self._to_host(rows), strict=True):
                self._stats.setdefault(tag, []).append((j, row))

        self._reduction.reduce(chosen, done)
        self._sampling, self._loaded = None, False

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """One asynchronous copy into pinned memory on CUDA (`collect` waits for them all)."""
        if not self._pinned:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def collect(self, wanted: list[list], forget_others: bool) -> list[dict]:
        """Hand over what `[tag, first position, count, generated tokens]` asks for: the
        request's hand-over file, whose rows from `first` on were written as its steps ran
        (later chunks, recomputation after preemption, overwrite earlier ones), with the token
        statistics of the first generated tokens appended. Zeros just forget the request.
        `forget_others` also drops every request not asked for: after an offline generate call
        those are leftovers (aborted requests); a server has others still running. A request
        missing a row, or whose file could not be written (a full /dev/shm), is reported, never
        padded: its call fails, the engine goes on.
        """
        while self._written:  # the steps still being written off the engine's thread
            self._written.popleft().result()
        if self._reduction is not None:
            self._reduction.wait()  # steps still being reduced off the engine's thread
        if self._pinned:
            torch.cuda.current_stream().synchronize()  # the statistics' copies into pinned memory
        out = []
        width = 2 + 2 * self._topk
        for tag, first, count, n_tokens in wanted:
            handover, stats = self._handovers.pop(tag, None), self._stats.pop(tag, [])
            if not count and not n_tokens:
                if handover is not None:
                    handover.discard()
                continue
            if handover is None:  # no row kept (the statistics alone, or rows missing)
                handover = self._pool.open([0, self._layers, 0], self._storage, first)
            if handover.failed:
                handover.discard()
                out.append({"tag": tag, "error": handover.failed})
                continue
            at = first - handover.first if count else 0  # no row kept: `first` is 0
            filled = handover.filled[at : at + count]
            if len(filled) < count:
                filled = np.concatenate([filled, np.zeros(count - len(filled), np.int32)])
            table = np.zeros((n_tokens, width), dtype=np.float32)
            known = np.zeros(n_tokens, dtype=bool)
            for j, row in stats:  # in step order: a recomputed token's row overwrites
                if j < n_tokens:
                    table[j], known[j] = row.numpy(), True
            if not filled.all() or not known.all():
                handover.discard()
                missing = np.flatnonzero(filled == 0) + first
                where = [int(missing[0]), int(missing[-1])] if len(missing) else "token statistics"
                out.append({"tag": tag, "missing": where})
                continue
            try:
                handover.write(handover.shape[0], table)  # at stats_offset, after the rows
            except CaptureError as exc:
                handover.discard()
                out.append({"tag": tag, "error": str(exc)})
                continue
            handover.close()
            out.append(
                {
                    "tag": tag,
                    "path": handover.path,
                    "shape": handover.shape,
                    "rows": [at, count],
                    "stats": [handover.stats_offset, n_tokens],
                    "recomputed": int((filled > 1).sum()),
                }
            )
        if forget_others:
            for handover in self._handovers.values():
                handover.discard()
            self._handovers.clear()
            self._stats.clear()
        self._pool.trim(len(self._handovers) + len(out))
        return out

    def close(self) -> None:
        """The worker shuts down: its hand-over directory goes (files the front end still maps
        stay readable until it unmaps them)."""
        self._pool.close()


def _write_rows(
    block: torch.Tensor,
    picks: list[tuple[Handover, int, int, int]],
    ready: torch.cuda.Event | None = None,
) -> None:
    """On the helper thread: each pick's run of rows of the step's block ([rows, layers, hidden]
    in the storage dtype, the picks' rows in order; on CUDA in pinned memory, once `ready`) into
    its request's hand-over file: one write per request and step."""
    if ready is not None:
        ready.synchronize()
    rows = storage_view(block)
    offset = 0
    for handover, at, _, k in picks:
        run, offset = rows[offset : offset + k], offset + k
        try:
            handover.write(at, run)  # raises once the request's file has failed
        except CaptureError as exc:  # the request's collect reports it; the engine goes on
            handover.failed = str(exc)
            continue
        handover.filled[at : at + k] += 1


def _install(worker) -> None:
    """Give a freshly loaded worker's model the aux layer outputs and its runner the row tap."""
    config = (worker.vllm_config.additional_config or {}).get(CONFIG_KEY)
    worker.hallulens_rows = None
    if not config:
        return
    runner = worker.model_runner
    missing = [
        name
        for name in (
            "input_batch",
            "query_start_loc",
            "requests",
            "_model_forward",
            "get_model",
            "discard_request_mask",
            "sampler",
        )
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
    topk = int(config.get("topk", 0))
    rows = LayerRows(runner, layer_ids, config["tokens"], config["dtype"], topk)
    if topk:  # the sampler is plain eager code, outside any compiled graph
        runner.sampler.register_forward_pre_hook(rows.before_sampling, with_kwargs=True)
        runner.sampler.register_forward_hook(rows.after_sampling)
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

    def shutdown(self) -> None:
        rows = getattr(self, "hallulens_rows", None)
        if rows is not None:
            rows.close()
        super().shutdown()  # type: ignore[misc]

    def hallulens_collect(self, wanted: list[list], forget_others: bool = True) -> list[dict]:
        rows = getattr(self, "hallulens_rows", None)
        return [] if rows is None else rows.collect(wanted, forget_others)


def _worker_class() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as base
    else:
        from vllm.v1.worker.gpu_worker import Worker as base
    return type("CaptureWorker", (CaptureWorkerMixin, base), {"__module__": __name__})


CaptureWorker = _worker_class()  # vLLM's worker_cls: "hallulens_models.vllm_worker.CaptureWorker"
