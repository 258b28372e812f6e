"""Token statistics of a decode step, computed where its logits are (every engine uses this).

The distribution is the model's raw next-token distribution: the float32 softmax of the logits
the model outputs, before temperature, top-k/top-p, repetition penalties or any other
step a sampler applies. It is the same on every engine (vLLM calls it `raw_logprobs`), so a
record's numbers depend neither on the engine nor on the sampling settings that chose its tokens.

A step's logits block [n, vocab] is reduced on its own device: `summarize` keeps the entropy and
the top-k (and the shifted logits, until the chosen tokens are known: a sampler may change the
logits in place, and some engines reveal the chosen token only at the next step), `rows` adds each
chosen token's logprob and packs one float32 row per token, [logprob, entropy, k top logprobs,
k top ids] (`hallulens_capture.record.token_stat_tensors` unpacks them). Only these rows, 2 + 2k
values per token, ever leave the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch

from hallulens_capture.errors import CaptureError

EXACT_IDS = 1 << 24  # token ids travel as float32: exact below this


R = TypeVar("R")


def on_calling_thread(reduce: Callable[..., R]) -> Callable[..., R]:
    """Run a reduction of CPU tensors on the calling thread alone. A few megabytes of logits
    gain nothing from torch's thread pool, and each parallel op waits for a pool thread to get
    a core: beside llama.cpp's threads or a busy writer on two cores, 50 ms a step instead of
    4 (measured: 16 rows x 49152, and 0.1 ms instead of 55 for one row). The engine's own
    thread setting is restored at once; on a GPU nothing changes."""

    @functools.wraps(reduce)
    def wrapped(first, *args):
        threads = torch.get_num_threads()
        tensor = first if isinstance(first, torch.Tensor) else first[0]
        if tensor.is_cuda or threads == 1:
            return reduce(first, *args)
        torch.set_num_threads(1)
        try:
            return reduce(first, *args)
        finally:
            torch.set_num_threads(threads)

    return wrapped


class StepStats(NamedTuple):
    """One step's reduction, on the logits' device."""

    shifted: torch.Tensor  # [n, vocab] float32 logits minus each row's max; dropped once the
    # chosen tokens are known
    log_total: torch.Tensor  # [n, 1]: logprob = shifted - log_total
    head: torch.Tensor  # [n, 1 + 2k] float32: entropy, top-k logprobs, top-k ids


@on_calling_thread
def summarize(logits: torch.Tensor, k: int, index: torch.Tensor | None = None) -> StepStats:
    """Entropy and top-k of each row of `logits` [n, vocab] (the rows `index` picks, if given)
    under its float32 softmax.

    Works on the logits shifted by their row maximum (never a vocabulary-sized log_softmax):
    with w = exp(shifted), Z = sum(w), the entropy is log Z - sum(w * shifted) / Z, both terms
    small for a peaked distribution, so float32 keeps it exact to ~1e-6. `shifted` is a new
    tensor, so a sampler that then changes `logits` in place changes nothing here."""
    if logits.shape[-1] > EXACT_IDS:
        raise CaptureError(
            f"a vocabulary of {logits.shape[-1]} tokens is too large for capture_topk"
        )
    x = (logits if index is None else logits.index_select(0, index)).float()
    shifted = x - x.amax(-1, keepdim=True)
    # a token a processor masked to -inf has weight 0 and adds nothing (0 * -1e30 = 0)
    shifted.clamp_(min=-1e30)
    weights = shifted.exp()
    total = weights.sum(-1, keepdim=True)
    log_total = total.log()
    entropy = log_total - torch.linalg.vecdot(weights, shifted).unsqueeze(-1) / total
    top = shifted.topk(k, dim=-1)
    head = torch.cat([entropy, top.values - log_total, top.indices.float()], dim=-1)
    return StepStats(shifted, log_total, head)


@on_calling_thread
def rows(stats: StepStats, chosen: torch.Tensor) -> torch.Tensor:
    """[n, 2 + 2k] float32: the chosen tokens' logprobs (`chosen` [n] token ids) before the head."""
    picked = stats.shifted.gather(-1, chosen.reshape(-1, 1).long()) - stats.log_total
    return torch.cat([picked, stats.head], dim=-1)
