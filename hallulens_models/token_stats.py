"""Token statistics of a decode step, computed where its logits are (every engine uses this).

The distribution is the model's raw next-token distribution: the float32 softmax of the logits
the model outputs, before temperature, top-k/top-p, repetition penalties or any other
step a sampler applies. It is the same on every engine (vLLM calls it `raw_logprobs`), so a
record's numbers depend neither on the engine nor on the sampling settings that chose its tokens.

A step's logits block [n, vocab] is reduced on its own device by a `Reduction` (every engine's
way in): `load` copies the step's rows (a sampler may change the logits in place, an engine may
reuse its buffer), `reduce` computes the entropy and the top-k once the chosen tokens are known
(some engines reveal them only at the next step) with each chosen token's logprob, packed as
one float32 row per token, [logprob, entropy, k top logprobs, k top ids]
(`hallulens_capture.record.token_stat_tensors` unpacks them). Only these rows, 2 + 2k values per
token, ever leave the device.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, TypeVar

import numpy as np
import torch

from hallulens_capture.errors import CaptureError

EXACT_IDS = 1 << 24  # token ids travel as float32: exact below this
LOG2E = 1 / math.log(2)


R = TypeVar("R")


def on_calling_thread(method: Callable[..., R]) -> Callable[..., R]:
    """Run a Reducer's work on CPU tensors on the calling thread alone, unless the reducer
    shares the engine's threads (`Reducer.engine_threads`). A few megabytes of logits gain
    little from torch's thread pool when it is not the engine's, and each parallel op waits
    for a pool thread to get a core: beside llama.cpp's threads or a busy writer on two cores,
    50 ms a step instead of 4 (measured: 16 rows x 49152, and 0.1 ms instead of 55 for one
    row). The engine's own thread setting is restored at once; with a CUDA tensor argument
    nothing changes."""

    @functools.wraps(method)
    def wrapped(self: Reducer, *args):
        threads = torch.get_num_threads()
        cuda = any(a.is_cuda for a in args if isinstance(a, torch.Tensor))
        if self.engine_threads or cuda or threads == 1:
            return method(self, *args)
        torch.set_num_threads(1)
        try:
            return method(self, *args)
        finally:
            torch.set_num_threads(threads)

    return wrapped


class StepStats(NamedTuple):
    """One step's reduction, on the logits' device."""

    shifted: torch.Tensor  # [n, vocab] float32 logits minus each row's max; dropped once the
    # chosen tokens are known
    log_total: torch.Tensor  # [n, 1]: logprob = shifted - log_total
    head: torch.Tensor  # [n, 1 + 2k] float32: entropy, top-k logprobs, top-k ids


BLOCK = 128  # top-k candidates are searched in blocks of this many logits


def top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of `x` [n, vocab] and their ids, most likely first.

    Read in blocks: the k-th largest of the block maxima is a value at least k logits reach, so
    every top-k logit lies in one of the k blocks with the largest maxima. A full `topk` copies
    each row into (value, id) pairs before partially sorting it; this reads the row once and
    sorts k blocks (3-5x less work for 49,152 or 128,256 tokens, the same result). Ids are made
    for the k winners alone, from their block and place in it."""
    n, vocab = x.shape
    whole = vocab - vocab % BLOCK
    if whole // BLOCK <= k:
        return x.topk(k, dim=-1)
    blocks = x[:, :whole].unflatten(1, (whole // BLOCK, BLOCK))
    best = blocks.amax(-1).topk(k, dim=-1).indices  # [n, k]
    values = blocks[torch.arange(n, device=x.device)[:, None], best].flatten(1)  # [n, k * BLOCK]
    if whole < vocab:  # the last, partial block is always a candidate: block k of `best`
        values = torch.cat([values, x[:, whole:]], dim=1)
        best = torch.cat([best, best.new_full((n, 1), whole // BLOCK)], dim=1)
    chosen = values.topk(k, dim=-1)
    at = chosen.indices
    return chosen.values, best.gather(1, at // BLOCK) * BLOCK + at % BLOCK


class Reducer:
    """Reduces the logits of one engine's successive steps, in buffers it keeps between steps.

    A fresh vocabulary-sized tensor per step is not free: under vLLM's CPU build (which preloads
    tcmalloc) each one pays its page faults again, 4.7 ms a step instead of 1.6 for 16 rows x
    49,152 logits. The StepStats a Reducer returns lives in its buffers: it is valid until the
    next `load` (every engine finishes a step's rows before it loads the next step).

    `engine_threads`: reduce with the calling thread's torch thread pool (`on_calling_thread`):
    HF on a CPU, whose model's pool waits while its thread runs the hooks between two steps
    (16 rows x 49,152 logits: 0.84 ms a step on two threads, 1.5 ms on one)."""

    def __init__(self, k: int, engine_threads: bool = False) -> None:
        self.k = k
        self.engine_threads = engine_threads
        self._buffers: dict[str, torch.Tensor] = {}
        self._host: np.ndarray | None = None  # the "shifted" buffer, seen by numpy

    def _buffer(
        self, name: str, rows: int, like: torch.Tensor, dtype: torch.dtype, keep: int = 0
    ) -> torch.Tensor:
        """[rows, vocab] of a kept buffer, grown (never shrunk) to the most rows asked; its
        first `keep` rows survive a growth."""
        kept = self._buffers.get(name)
        vocab = like.shape[-1]
        if (
            kept is None
            or kept.shape[0] < rows
            or kept.shape[1] != vocab
            or kept.dtype != dtype
            or kept.device != like.device
        ):
            grown = torch.empty((rows, vocab), dtype=dtype, device=like.device)
            if keep:
                grown[:keep].copy_(kept[:keep])
            kept = self._buffers[name] = grown
            if name == "shifted":
                self._host = grown.numpy() if grown.device.type == "cpu" else None
        return kept[:rows]

    def load_host(self, logits: np.ndarray, at: int = 0) -> None:
        """`load` of host rows (numpy float32 [n, vocab]) with numpy alone: on llama.cpp's
        thread a torch call per token, its caches cold after the decode, costs 0.27 ms a token
        where this copy costs 0.025 (measured on 2 cores, 49,152 logits)."""
        rows, vocab = logits.shape
        _check_vocab(vocab)
        host = self._host
        if host is None or host.shape[0] < at + rows or host.shape[1] != vocab:
            self._buffer("shifted", at + rows, torch.empty(0, vocab), torch.float32, keep=at)
            host = self._host
        host[at : at + rows] = logits

    @on_calling_thread
    def load(self, logits: torch.Tensor, index: torch.Tensor | None = None, at: int = 0) -> None:
        """Copy the rows to reduce into this reducer's own float32 buffer (exact for
        lower-precision logits), so a sampler that then changes `logits` in place, or an engine
        that reuses its logits buffer, changes nothing here. They go after the `at` rows loaded
        before (steps reduced together); `reduce` takes all of them."""
        _check_vocab(logits.shape[-1])
        rows = logits.shape[0] if index is None else len(index)
        block = self._buffer("shifted", at + rows, logits, torch.float32, keep=at)
        loaded = block[at:]
        if index is None:
            loaded.copy_(logits)
        elif logits.dtype == torch.float32:
            torch.index_select(logits, 0, index, out=loaded)
        else:  # lower precision: pick, then widen
            picked = self._buffer("picked", rows, logits, logits.dtype)
            loaded.copy_(torch.index_select(logits, 0, index, out=picked))

    @on_calling_thread
    def reduce(self, n: int) -> StepStats:
        """The statistics of the first `n` loaded rows (a step loaded but never reduced, as
        when sampling fails, is left out).

        Works on the logits shifted by their row maximum (never a vocabulary-sized
        log_softmax): with w = exp(shifted), Z = sum(w), the entropy is
        log Z - sum(w * shifted) / Z, both terms small for a peaked distribution, so float32
        keeps it exact to ~1e-6. The weights are 2 ** (shifted * log2 e): `exp2` takes half the
        time of `exp` on a CPU, and the weights are most of a step's work."""
        shifted = self._buffers["shifted"][:n]
        values, ids = top(shifted, self.k)  # before the shift: values are the logits
        peak = values[:, :1]
        shifted.sub_(peak)
        weights = torch.mul(
            shifted, LOG2E, out=self._buffer("weights", len(shifted), shifted, torch.float32)
        ).exp2_()
        total = weights.sum(-1, keepdim=True)
        log_total = total.log()
        # a token a processor masked to -inf has weight 0 and adds nothing: 0 * -inf is NaN
        entropy = log_total - weights.mul_(shifted).nansum(-1, keepdim=True) / total
        head = torch.cat([entropy, values - peak - log_total, ids.float()], dim=-1)
        return StepStats(shifted, log_total, head)

    @on_calling_thread
    def rows(self, stats: StepStats, chosen: torch.Tensor) -> torch.Tensor:
        """[n, 2 + 2k] float32: the chosen tokens' logprobs (`chosen` [n] token ids) before the
        head."""
        picked = stats.shifted.gather(-1, chosen.reshape(-1, 1).long()) - stats.log_total
        return torch.cat([picked, stats.head], dim=-1)


def _check_vocab(vocab: int) -> None:
    if vocab > EXACT_IDS:
        raise CaptureError(f"a vocabulary of {vocab} tokens is too large for capture_topk")


def helper_thread() -> None:
    """A ThreadPoolExecutor's initializer for the helper threads of capture: the thread works
    alone (torch's thread count is per thread) on any CPU the process may use: an engine may
    have bound its own threads to cores (vLLM's CPU worker), and a thread inherits its
    creator's binding. (vLLM's CPU worker replaces `torch.set_num_threads` with a warning: it
    is called only where the thread count is not 1 already.)"""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    # no affinity call on this system, or a cpuset that refuses: the inherited binding stays
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


COALESCE = 64  # rows: steps with fewer rows are reduced together
Step = tuple[torch.Tensor | Sequence[int], Callable[[torch.Tensor], None]]  # chosen ids, done


class Reduction:
    """The token statistics of one engine's successive steps: `load` a step's logits, `reduce`
    them once its chosen tokens are known; `done(rows)` gets the step's [n, 2 + 2k] rows.

    With `threaded` (logits in host memory) the reduction runs on a helper thread while the
    engine goes on, and the engine's thread only copies the step's rows: llama.cpp generates on
    half the cores by default and vLLM's CPU worker leaves a core to its front end, so it mostly
    runs on a core that would wait. Steps are copied one after another into a block and the
    block goes to the helper once it holds COALESCE rows: a one-row step (llama.cpp
    decoding one sequence) costs 0.32 ms reduced alone and 0.10 ms in a block of 16, and each
    block's ~25 torch calls contend for the GIL with the engine's thread (llama.cpp's graph
    callbacks are Python, and so is vLLM's step) once per block, not once per step: in vLLM's
    CPU worker (16 rows a step) handing a block over took the engine's thread 0.48-0.74 ms a
    step with blocks of 16 rows, 0.17-0.37 with blocks of 64 (a block's buffers: 64 x vocab
    float32, twice per reducer). Two reducers alternate: a block is filled while the one before
    is reduced, and the first `load` into a reducer waits only while its previous block is
    still being reduced. `done` runs on the helper thread, in step order; `wait` hands over
    the partly filled block, returns once every step is done and raises the first failure.
    Without `threaded` (CUDA, where the reduction is kernels queued on the device, and HF on a
    CPU, whose model keeps every core busy) a full block is reduced on the calling thread, with
    its torch threads if `engine_threads` (`Reducer`): a reduction's ~25 torch calls then come
    once per COALESCE rows, not once per step (HF on two cores: at batch 4 the statistics took
    0.94 ms of each step on the model's thread reduced step by step, 0.56 ms in blocks of 16
    rows; at batch 16, 2.2 ms a step in blocks of 16 rows, 1.9 in blocks of 64). A Reduction
    kept from call to call keeps its buffers: fresh ones pay their page faults again (with
    blocks of 64 that undid the gain at batch 4)."""

    def __init__(self, k: int, threaded: bool, engine_threads: bool = False) -> None:
        self._reducers = (
            (Reducer(k), Reducer(k)) if threaded else (Reducer(k, engine_threads=engine_threads),)
        )
        self._futures: list[Future | None] = [None] * len(self._reducers)
        self._turn = 0
        self._block: list[Step] = []
        self._rows = 0  # rows loaded into the block being filled
        self._pool = (
            ThreadPoolExecutor(1, "hallulens-token-stats", helper_thread) if threaded else None
        )

    def load(self, logits: torch.Tensor | np.ndarray, index: torch.Tensor | None = None) -> None:
        """Copy this step's rows after the block's (`Reducer.load`; host rows given as numpy,
        by llama.cpp: `Reducer.load_host`)."""
        pending = self._futures[self._turn]
        if not self._rows and pending is not None:
            pending.result()
        if isinstance(logits, np.ndarray):
            self._reducers[self._turn].load_host(logits, self._rows)
        else:
            self._reducers[self._turn].load(logits, index, self._rows)

    def reduce(
        self, chosen: torch.Tensor | Sequence[int], done: Callable[[torch.Tensor], None]
    ) -> None:
        """The loaded step's rows for the `chosen` [n] token ids, handed to `done`."""
        self._block.append((chosen, done))
        self._rows += len(chosen)
        if self._rows >= COALESCE:
            self._hand_over()

    def _hand_over(self) -> None:
        reducer, block = self._reducers[self._turn], self._block
        self._block, self._rows = [], 0
        if self._pool is None:
            _statistics(reducer, block)
            return
        self._futures[self._turn] = self._pool.submit(_statistics, reducer, block)
        self._turn = (self._turn + 1) % len(self._reducers)

    def discard(self) -> None:
        """Forget the steps not handed over yet (a call that failed before its end), keeping
        the buffers for the next call."""
        self._block, self._rows = [], 0

    def wait(self) -> None:
        if self._block:
            self._hand_over()
        for future in self._futures:
            if future is not None:
                future.result()


@torch.inference_mode()
def _statistics(reducer: Reducer, block: list[Step]) -> None:
    """Each step's rows to its `done`. In inference mode on any thread: an engine's buffers
    made in inference mode (vLLM's) can only be changed in place there, and grad mode is a
    per-thread setting."""
    chosen = [torch.as_tensor(c) for c, _ in block]
    ids = chosen[0] if len(chosen) == 1 else torch.cat(chosen)
    out = reducer.rows(reducer.reduce(len(ids)), ids)
    start = 0
    for c, done in block:
        done(out[start : start + len(c)])
        start += len(c)
