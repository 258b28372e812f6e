"""Reading llama.cpp's residual stream while it decodes, through the scheduler's `cb_eval` hook.

llama.cpp names its graph tensors: `embd` is the embedding output (our layer 0) and
`l_out-<i>` the residual stream after decoder layer i (our layer i + 1), float32 rows of
`n_embd` per token of the micro-batch. The scheduler asks the callback about every node
(`ask=True`) and, for the nodes we claim, calls again once computed (`ask=False`): the ask phase
is one name lookup, the copy phase one `ggml_backend_tensor_get` into numpy. llama.cpp computes
the last layer only for tokens whose logits are requested, so callers ask for all logits when
they need the last layer of every prompt token. Token statistics come from the logits row each
token was chosen from, reduced by `token_stats` (torch, imported only when they are asked for).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import numpy as np
from llama_cpp import llama_cpp as llama_lib
from llama_cpp._ggml import libggml

from hallulens_capture.errors import CaptureError

libggml.ggml_get_name.restype = ctypes.c_char_p
libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
libggml.ggml_nelements.restype = ctypes.c_int64
libggml.ggml_nelements.argtypes = [ctypes.c_void_p]
libggml.ggml_nbytes.restype = ctypes.c_size_t
libggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
libggml.ggml_backend_tensor_get.restype = None
libggml.ggml_backend_tensor_get.argtypes = [
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
]


def tensor_name(layer_id: int) -> bytes:
    return b"embd" if layer_id == 0 else f"l_out-{layer_id - 1}".encode()


class GraphTap:
    """Collects the rows of the named tensors of every decode while `active`."""

    def __init__(self, layer_ids, n_embd: int):
        self._index = {tensor_name(int(lid)): i for i, lid in enumerate(layer_ids)}
        self._n_embd = n_embd
        self.active = False
        self._rows: list[list[np.ndarray]] = [[] for _ in self._index]
        self._error: str | None = None
        # llama.cpp keeps only the pointer: this object must outlive the context
        self.callback = llama_lib.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, tensor, ask, _user_data) -> bool:
        i = self._index.get(libggml.ggml_get_name(tensor))
        if ask:
            return self.active and i is not None
        count = libggml.ggml_nelements(tensor)
        if libggml.ggml_nbytes(tensor) != 4 * count or count % self._n_embd:
            self._error = f"tensor {libggml.ggml_get_name(tensor)!r} is not float32 rows"
            return True
        out = np.empty(count, dtype=np.float32)
        libggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, 4 * count)
        self._rows[i].append(out.reshape(-1, self._n_embd))
        return True

    def take(self, n_tokens: int) -> np.ndarray:
        """[n_layers, n_tokens, n_embd] of everything recorded since the last take."""
        rows, self._rows = self._rows, [[] for _ in self._index]
        if n_tokens == 0:
            return np.empty((len(rows), 0, self._n_embd), dtype=np.float32)
        if self._error:
            raise CaptureError(f"llama.cpp capture: {self._error}")
        layers = []
        for name, parts in zip(self._index, rows, strict=True):
            got = sum(len(p) for p in parts)
            if got != n_tokens:
                raise CaptureError(
                    f"llama.cpp gave {got} rows of {name.decode()} for {n_tokens} tokens "
                    "(tensor names differ for this architecture, or outputs were pruned)"
                )
            layers.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
        return np.stack(layers)


class TapObserver:
    """A `llama_cpp_lm.DecodeObserver` that keeps the tapped rows of each sequence for the
    token scope asked (`prompt`, `generated`, `all`, `response`) and, with `topk` > 0, the token
    statistics of each chosen token (from the logits row it was chosen from, `token_stats`), and
    hands a finished generation to `sink(context, prompt, generated, text, rows, stats)`: rows
    [n_layers, n_tokens, n_embd] float32, stats [n_generated, 2 + 2 topk] or None."""

    def __init__(self, layer_ids, n_layer: int, n_embd: int, scope: str, topk: int, sink: Callable):
        self._tap = GraphTap(layer_ids, n_embd)
        self._parts = {"prompt": ("prompt",), "generated": ("generated",)}.get(
            scope, ("prompt", "generated")
        )
        # `response` keeps one prompt row: the last prompt token's, which produced the first
        # generated token (a prompt is fed in one call, so it is the last row fed)
        self._prompt_rows = 1 if scope == "response" else None
        self._topk = topk
        self._reduction = None  # a token_stats.Reduction, made when the first logits come
        self._sink = sink
        self._empty = np.empty((len(layer_ids), 0, n_embd), dtype=np.float32)
        self._rows: dict[int, list[np.ndarray]] = {}
        self._stats: dict[int, list[np.ndarray]] = {}
        self.eval_callback = self._tap.callback
        # llama.cpp computes its last layer only for tokens whose logits are requested
        self.all_prompt_logits = "prompt" in self._parts and n_layer in layer_ids

    def feeding(self, part: str | None) -> None:
        self._tap.active = part in self._parts

    def fed(self, part: str | None, seqs: Sequence[int]) -> None:
        if part == "prompt":  # a prompt starts its sequence afresh
            self._rows[seqs[0]] = []
            self._stats[seqs[0]] = []
        if part not in self._parts:
            return
        rows = self._tap.take(len(seqs))
        start = 0
        for end in range(1, len(seqs) + 1):  # runs of tokens of one sequence
            if end == len(seqs) or seqs[end] != seqs[start]:
                first = start
                if part == "prompt" and self._prompt_rows is not None:
                    first = max(start, end - self._prompt_rows)
                self._rows[seqs[start]].append(rows[:, first:end])
                start = end

    def chose(self, seqs: Sequence[int], logits: np.ndarray, tokens: Sequence[int]) -> None:
        if not self._topk:
            return
        import torch

        from hallulens_models import token_stats

        if self._reduction is None:
            self._reduction = token_stats.Reduction(self._topk, threaded=True)
        self._reduction.load(logits)  # llama.cpp's buffer: copied now
        targets = [self._stats[seq] for seq in seqs]

        def done(rows: torch.Tensor) -> None:
            for target, row in zip(targets, rows.numpy(), strict=True):
                target.append(row)

        self._reduction.reduce(tokens, done)

    def finished(
        self, seq: int, context: str, prompt: list[int], generated: list[int], text: str
    ) -> None:
        parts = self._rows.pop(seq, [])
        rows = np.concatenate(parts, axis=1) if parts else self._empty
        if self._reduction is not None:
            self._reduction.wait()
        stats = self._stats.pop(seq, [])
        self._sink(context, prompt, generated, text, rows, np.stack(stats) if self._topk else None)
