"""Forward hooks on an HF decoder that copy chosen layers out of every forward step.

Layer 0 is the input of the first decoder layer (the embedding output, after any scaling the
model applies); layer i is the output of decoder layer i, before the final norm (HF's own
`hidden_states[-1]` is after it). Each step's copy leaves the device at once, layer by layer
(asynchronously into pinned memory on CUDA), so a long generation never piles up hidden states
on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from hallulens_capture.errors import CaptureError

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def to_storage(tensor: torch.Tensor) -> np.ndarray:
    """Host tensor -> numpy array of its stored bytes (bfloat16 as uint16 bits)."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers (Llama/Qwen/Mistral/GPT-2/GPT-NeoX/OPT layouts)."""
    count = model.config.get_text_config().num_hidden_layers
    holders = [model.get_decoder() if hasattr(model, "get_decoder") else None, model]
    holders += [
        getattr(h, a, None)
        for h in list(holders)
        for a in ("model", "transformer", "gpt_neox", "decoder")
    ]
    for holder in holders:
        for name in ("layers", "h", "blocks"):
            candidate = getattr(holder, name, None)
            if isinstance(candidate, torch.nn.ModuleList) and len(candidate) == count:
                return candidate
    raise CaptureError(f"cannot find the {count} decoder layers of {type(model).__name__}")


class StepLog:
    """Host copies per forward step: step i is [n_layers, batch, tokens_i, hidden]."""

    def __init__(self, n_layers: int, hidden: int, dtype: torch.dtype) -> None:
        self._empty = torch.empty((n_layers, 0, hidden), dtype=dtype)
        self.lengths: list[int] = []
        self.blocks: dict[int, torch.Tensor] = {}
        self._decode: torch.Tensor | None = None

    def row(self, row: int, n_prompt: int, n_decode: int) -> torch.Tensor:
        """[n_layers, tokens, hidden] of one batch row: the last `n_prompt` prefill rows kept
        (the batch is left-padded, so its prompt ends at the last column), then its first
        `n_decode` decode steps."""
        parts = []
        if 0 in self.blocks and n_prompt > 0:
            block = self.blocks[0]
            parts.append(block[:, row, block.shape[2] - n_prompt :])
        if n_decode > 0:
            if self._decode is None:
                self._decode = torch.cat(
                    [self.blocks[i] for i in range(1, len(self.lengths))], dim=2
                )
            parts.append(self._decode[:, row, :n_decode])
        if not parts:
            return self._empty
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class LayerTap:
    """Hooks for `layer_ids` of one model, active only inside `recording()`."""

    def __init__(self, model: torch.nn.Module, layer_ids: Sequence[int], dtype: torch.dtype):
        self._layers = decoder_layers(model)
        self._hidden = model.config.get_text_config().hidden_size
        self.layer_ids = list(layer_ids)
        self.dtype = dtype

    @contextmanager
    def recording(self, prefill_rows: int | None, keep_decode: bool) -> Iterator[StepLog]:
        """Record forward steps: of the prefill, the last `prefill_rows` columns (None: all,
        0: none), and every decode step if `keep_decode`."""
        log = StepLog(len(self.layer_ids), self._hidden, self.dtype)
        slots = {lid: i for i, lid in enumerate(self.layer_ids)}
        last = self.layer_ids[-1]
        current: list[torch.Tensor | None] = [None]

        def grab(lid: int, hidden: torch.Tensor) -> None:
            step, length = len(log.lengths), hidden.shape[1]
            if prefill_rows != 0 if step == 0 else keep_decode:
                if step == 0 and prefill_rows is not None:
                    hidden = hidden[:, -prefill_rows:]
                block = current[0]
                if block is None:
                    batch, tokens, width = hidden.shape
                    block = torch.empty(
                        (len(slots), batch, tokens, width),
                        dtype=self.dtype,
                        pin_memory=hidden.is_cuda,
                    )
                    current[0] = block
                if hidden.is_cuda:
                    block[slots[lid]].copy_(hidden.detach().to(self.dtype), non_blocking=True)
                else:
                    block[slots[lid]].copy_(hidden.detach())
            if lid == last:
                log.lengths.append(length)
                if current[0] is not None:
                    log.blocks[step] = current[0]
                    current[0] = None

        handles = []
        for lid in self.layer_ids:
            if lid == 0:

                def pre(module, args, kwargs):
                    grab(0, args[0] if args else kwargs["hidden_states"])

                handles.append(self._layers[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(module, args, output, lid=lid):
                    grab(lid, output[0] if isinstance(output, (tuple, list)) else output)

                handles.append(self._layers[lid - 1].register_forward_hook(post))
        try:
            yield log
        finally:
            for handle in handles:
                handle.remove()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.current_stream().synchronize()  # pending copies into pinned memory
