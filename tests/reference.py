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
