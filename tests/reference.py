"""Compare stored records with an independent plain forward pass (`output_hidden_states`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Agreement:
    max_rel_error: float  # max over (layer, token) rows of max|a-b| / max|b|
    min_cosine: float  # min over (layer, token) rows
    rows: int


def compare_record(record, model, layer_shift: int = 0) -> Agreement:
    """Run `model` on prompt + generated ids (the last generated token is never fed back) and
    compare every stored row. HF's last `hidden_states` entry is after the final norm; our layer
    L is before it, so the stored row is normed with the model's own norm for that layer.
    `layer_shift` compares with the wrong layers on purpose (a check must be able to fail)."""
    ids = np.concatenate([record.prompt_token_ids, record.generated_token_ids[:-1]]).astype(
        np.int64
    )
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states
    last = len(hidden) - 1
    positions = torch.from_numpy(record.token_positions.astype(np.int64))
    worst, lowest, rows = 0.0, 1.0, 0
    for index, layer in enumerate(record.layer_ids.tolist()):
        got = torch.from_numpy(record.all_layers_activations[index].astype(np.float32))
        if not 0 <= layer + layer_shift <= last:
            continue
        layer += layer_shift
        want = hidden[layer][0, positions]
        if layer == last:
            with torch.no_grad():
                got = model.model.norm(got)
        if len(want) == 0:
            continue
        rel = (got - want).abs().amax(-1) / want.abs().amax(-1)
        cos = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)
        worst = max(worst, rel.max().item())
        lowest = min(lowest, cos.min().item())
        rows += len(want)
    return Agreement(worst, lowest, rows)


@dataclass
class TokenAgreement:
    """Max absolute errors of a record's token statistics against the reference pass."""

    logprob: float  # generated_logprobs vs log_softmax at the generated token
    entropy: float  # generated_entropy vs the entropy of the whole distribution
    topk: float  # topk_logprobs vs the reference logprobs of the same token ids
    tokens: int

    def worst(self, other: TokenAgreement) -> TokenAgreement:
        return TokenAgreement(
            max(self.logprob, other.logprob),
            max(self.entropy, other.entropy),
            max(self.topk, other.topk),
            self.tokens + other.tokens,
        )


NO_TOKENS = TokenAgreement(0.0, 0.0, 0.0, 0)


def compare_token_stats(record, model, shift: int = 0) -> TokenAgreement:
    """Run `model` on the record's prompt + generated ids and compare the stored statistics of
    generated token j with log_softmax of the fp32 logits at position P - 1 + j (those that
    predicted it). `shift` compares with the next positions' on purpose (a check must fail)."""
    n_prompt, generated = len(record.prompt_token_ids), record.generated_token_ids
    ids = np.concatenate([record.prompt_token_ids, generated]).astype(np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].float()
    rows = n_prompt - 1 + shift + np.arange(len(generated))
    logprobs = torch.log_softmax(logits[torch.from_numpy(rows)], dim=-1).double()
    chosen = logprobs.gather(1, torch.tensor(generated, dtype=torch.int64)[:, None])[:, 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    top = logprobs.gather(1, torch.tensor(record.topk_ids, dtype=torch.int64))

    def error(want: torch.Tensor, stored: np.ndarray) -> float:
        return float((want - torch.tensor(stored, dtype=torch.float64)).abs().max())

    return TokenAgreement(
        error(chosen, record.generated_logprobs),
        error(entropy, record.generated_entropy),
        error(top, record.topk_logprobs),
        len(generated),
    )
