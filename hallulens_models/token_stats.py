"""Token statistics of a decode step, computed where its logits are (every engine uses this).

The distribution is the model's raw next-token distribution: log_softmax, in float32, of the
logits the model outputs, before temperature, top-k/top-p, repetition penalties or any other
step a sampler applies. It is the same on every engine (vLLM calls it `raw_logprobs`), so a
record's numbers depend neither on the engine nor on the sampling settings that chose its tokens.

A step's logits block [n, vocab] is reduced on its own device: `summarize` keeps the entropy and
the top-k (and the logprobs, until the chosen tokens are known: a sampler may change the logits
in place, and some engines reveal the chosen token only at the next step), `rows` adds each
chosen token's logprob and packs one float32 row per token, [logprob, entropy, k top logprobs,
k top ids] (`hallulens_capture.record.token_stat_tensors` unpacks them). Only these rows, 2 + 2k
values per token, ever leave the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hallulens_capture.errors import CaptureError

EXACT_IDS = 1 << 24  # token ids travel as float32: exact below this


class StepStats(NamedTuple):
    """One step's reduction, on the logits' device."""

    logprobs: torch.Tensor  # [n, vocab] float32; dropped once the chosen tokens are known
    head: torch.Tensor  # [n, 1 + 2k] float32: entropy, top-k logprobs, top-k ids


def summarize(logits: torch.Tensor, k: int) -> StepStats:
    """Entropy and top-k of each row of `logits` [n, vocab], from its float32 log_softmax."""
    if logits.shape[-1] > EXACT_IDS:
        raise CaptureError(
            f"a vocabulary of {logits.shape[-1]} tokens is too large for capture_topk"
        )
    logprobs = logits.float().log_softmax(-1)
    # 0 * log 0 = 0: a token a processor masked to -inf adds nothing
    entropy = -(logprobs.exp() * logprobs).nan_to_num_(0.0).sum(-1, keepdim=True)
    top = logprobs.topk(k, dim=-1)
    return StepStats(logprobs, torch.cat([entropy, top.values, top.indices.float()], dim=-1))


def rows(stats: StepStats, chosen: torch.Tensor) -> torch.Tensor:
    """[n, 2 + 2k] float32: the chosen tokens' logprobs (`chosen` [n] token ids) before the head."""
    picked = stats.logprobs.gather(-1, chosen.reshape(-1, 1).long())
    return torch.cat([picked, stats.head], dim=-1)
