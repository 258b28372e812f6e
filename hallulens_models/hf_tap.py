"""Hooks on an HF decoder that copy chosen layers out of every forward step.

Layer 0 is the input of the first decoder layer (the embedding output, after any scaling the
model applies); layer i is the output of decoder layer i, before the final norm (HF's own
`hidden_states[-1]` is after it). Each step's layers leave the device at once, in one copy per
step (asynchronously into pinned memory on CUDA), so a long generation never piles up hidden
states on the device. With token statistics, hooks on the model itself read each step's output
logits (the model's own, as `generate` gets them) and the tokens fed at the next step. The hooks
wrap each module's `forward` (`watch`) rather than use torch's module hooks, whose call path
cost about as much as the copying.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from hallulens_capture.errors import CaptureError
from hallulens_capture.record import TokenParts
from hallulens_models import token_stats

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_view(tensor: torch.Tensor) -> np.ndarray:
    """A host tensor's stored bytes as a numpy view, strides kept (bfloat16 as uint16 bits)."""
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
    """Host copies per forward step of one `generate` call: step i's activations
    [n_layers, batch, tokens_i, hidden] and, with token statistics, its rows [batch, 2 + 2k]
    (`token_stats`). The hooks fill it; `row` and `row_stats` read one batch row, also while
    generate still runs (a finished row's steps are all there)."""

    def __init__(self, n_layers: int, hidden: int, dtype: torch.dtype, cuda: bool) -> None:
        self._empty = torch.empty((n_layers, 0, hidden), dtype=dtype)
        self.lengths: list[int] = []
        self.blocks: dict[int, torch.Tensor] = {}
        self.stats: list[torch.Tensor] = []
        self._cuda = cuda
        # read per row, made once per step: a batch's rows each take a view of every step, and
        # a torch index and `.numpy()` per row and step cost ~5 us each (16 rows x 64 steps: ~5
        # ms a batch, while the engine waits)
        self._views: dict[int, np.ndarray] = {}
        self._stacked = torch.empty(0)  # the steps' statistics [steps, batch, 2 + 2k]

    def _ready(self) -> None:
        """Wait for the asynchronous copies into pinned memory made so far (CUDA only)."""
        if self._cuda:
            torch.cuda.current_stream().synchronize()

    def row(self, row: int, n_prompt: int, n_decode: int) -> np.ndarray | TokenParts:
        """[n_layers, tokens, hidden] of one batch row as stored bytes: the last `n_prompt`
        prefill rows kept (the batch is left-padded, so its prompt ends at the last column),
        then its first `n_decode` decode steps. Views of the step copies, joined only where the
        record is encoded (they keep the copies alive until then)."""
        self._ready()
        parts = [self._view(step)[:, row] for step in range(1, n_decode + 1)]
        if 0 in self.blocks and n_prompt > 0:
            prefill = self._view(0)[:, row]
            parts.insert(0, prefill[:, prefill.shape[1] - n_prompt :])
        if not parts:
            return storage_view(self._empty)
        return parts[0] if len(parts) == 1 else TokenParts(parts)

    def _view(self, step: int) -> np.ndarray:
        view = self._views.get(step)
        if view is None:
            view = self._views[step] = storage_view(self.blocks[step])
        return view

    def row_stats(self, row: int, n_tokens: int) -> np.ndarray:
        """[n_tokens, 2 + 2k] token statistics of one batch row's first generated tokens."""
        self._ready()
        if len(self._stacked) != len(self.stats):  # stacked again once steps were added
            self._stacked = torch.stack(self.stats)
        return self._stacked[:n_tokens, row].numpy().copy()

    def release(self) -> None:
        """Drop the step copies once every row is read: on CUDA their pinned blocks go back to
        torch's pinned-memory cache for the next batch at once, not when the garbage collector
        finds the log (the caller's callback refers back to it), which left the next batch to
        page-lock fresh memory at every step."""
        self.blocks.clear()
        self.stats.clear()
        self._views.clear()
        self._stacked = torch.empty(0)


class LayerTap:
    """Hooks for `layer_ids` of one model (and its logits), active only inside `recording()`."""

    def __init__(self, model: torch.nn.Module, layer_ids: Sequence[int], dtype: torch.dtype):
        self._model = model
        self._layers = decoder_layers(model)
        self._hidden = model.config.get_text_config().hidden_size
        self.layer_ids = list(layer_ids)
        self.dtype = dtype
        # kept from call to call: a reduction's buffers are vocabulary-sized blocks, and fresh
        # ones pay their page faults again at every batch
        self._reductions: dict[int, token_stats.Reduction] = {}

    def _reduction_for(self, topk: int) -> token_stats.Reduction | None:
        """This tap's reduction for `topk`, without the steps a failed call left in it. On the
        CPU, HF's model keeps every core busy while it runs: reduced on its thread, with its
        threads, between two steps."""
        if not topk:
            return None
        reduction = self._reductions.get(topk)
        if reduction is None:
            reduction = token_stats.Reduction(topk, threaded=False, engine_threads=True)
            self._reductions[topk] = reduction
        reduction.discard()
        return reduction

    @contextmanager
    def recording(
        self,
        prefill_rows: int | None,
        keep_decode: bool,
        topk: int,
        on_tokens: Callable[[torch.Tensor], None],
    ) -> Iterator[Recording]:
        """Record forward steps: of the prefill, the last `prefill_rows` columns (None: all,
        0: none), every decode step if `keep_decode`, and with `topk` > 0 each step's token
        statistics. `on_tokens` gets the tokens each step chose ([batch]), as soon as they are
        known: when the next step feeds them, and the last step's through `Recording.close`."""
        recording = Recording(self, prefill_rows, keep_decode, self._reduction_for(topk), on_tokens)
        try:
            recording.start()
            yield recording
        finally:
            recording.stop()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.current_stream().synchronize()  # pending copies into pinned memory


def watch(
    module: torch.nn.Module,
    before: Callable[[tuple, dict], None] | None = None,
    after: Callable[[object], None] | None = None,
) -> Callable[[], None]:
    """Have `before(args, kwargs)` see each call's inputs and `after(output)` its output, by
    wrapping the module's own `forward` (the way accelerate attaches its hooks); the function
    returned puts the previous `forward` back. Not torch's module hooks: a module with a hook
    takes torch's slow call path, which cost about as much as capture's own work (SmolLM2, one
    decode step timed alone, 31 layers kept and copied once a step, alternating steps: hooks
    1.1-1.6 % of a batch-4 step and 1.9 % at batch 16, this wrapper 0.6-0.9 % and 0.5 %)."""
    inner = module.forward
    own = "forward" in module.__dict__  # an instance's forward (accelerate's) goes back as is

    @functools.wraps(inner)  # generate reads the forward's signature
    def forward(*args, **kwargs):
        if before is not None:
            before(args, kwargs)
        output = inner(*args, **kwargs)
        if after is not None:
            after(output)
        return output

    module.forward = forward

    def restore() -> None:
        if own:
            module.forward = inner
        else:
            del module.forward

    return restore


class Recording(StepLog):
    """The hooks' side of a StepLog: each step's chosen layers go to a host block in one copy
    (on CUDA: gathered on the device, then one asynchronous copy into pinned memory), its
    logits are reduced on the device (`token_stats`) until the next step reveals the chosen
    tokens. `start` watches the layers for the prefill and the model for every step; the
    first decode step watches the layers again, for decode steps (`_watch_decode`); `stop`
    puts every `forward` back."""

    def __init__(
        self,
        tap: LayerTap,
        prefill_rows: int | None,
        keep_decode: bool,
        reduction: token_stats.Reduction | None,
        on_tokens: Callable[[torch.Tensor], None],
    ) -> None:
        cuda = next(tap._model.parameters()).is_cuda
        super().__init__(len(tap.layer_ids), tap._hidden, tap.dtype, cuda)
        self._tap = tap
        self._slots = {lid: i for i, lid in enumerate(tap.layer_ids)}
        self._last = tap.layer_ids[-1]
        self._dtype = tap.dtype
        self._prefill_rows = prefill_rows
        self._keep_decode = keep_decode
        self._reduction = reduction
        self._on_tokens = on_tokens
        self._block: torch.Tensor | None = None  # the prefill's layers: host, or device on CUDA
        self._layer_views: tuple[torch.Tensor, ...] = ()  # the block per layer
        self._kept: list = []  # this decode step's layer outputs, in layer order
        self._fed = 0  # tokens fed to the decode step that is running
        self._decoding = False  # the layers are watched for decode steps
        self._pending = False  # last step's logits are loaded, awaiting its tokens
        self._layer_undo: list[Callable[[], None]] = []
        self._model_undo: Callable[[], None] | None = None

    def start(self) -> None:
        """Watch the chosen layers for the prefill, then the model (its steps' inputs and
        logits)."""
        grab = self._grab_prefill
        self._watch_layers(functools.partial(grab, 0), lambda lid: functools.partial(grab, lid))
        self._model_undo = watch(self._tap._model, before=self.before_step, after=self.after_step)

    def stop(self) -> None:
        """Put back every `forward` this recording wrapped (also after a failed step)."""
        if self._model_undo is not None:
            self._model_undo()
            self._model_undo = None
        self._unwatch_layers()

    def _watch_layers(
        self,
        on_input: Callable[[torch.Tensor], None],
        on_output: Callable[[int], Callable[[object], None]],
    ) -> None:
        """Wrap the chosen layers: layer 0's input goes to `on_input`, layer i's output, as the
        decoder layer returns it, to `on_output(i)`."""
        layers = self._tap._layers
        for lid in self._tap.layer_ids:
            if lid == 0:

                def before(args, kwargs):
                    on_input(args[0] if args else kwargs["hidden_states"])

                self._layer_undo.append(watch(layers[0], before=before))
            else:
                self._layer_undo.append(watch(layers[lid - 1], after=on_output(lid)))

    def _unwatch_layers(self) -> None:
        undo, self._layer_undo = self._layer_undo, []
        for restore in reversed(undo):  # layer 0 may be wrapped twice (layers 0 and 1)
            restore()

    def _watch_decode(self) -> None:
        """From the first decode step on, a chosen layer's output only joins the step's list,
        the list's own `append` called by the wrapper, and the step's end copies them all at
        once (`_end_decode_step`). A copy per layer, called from Python between two layers with
        the caches cold, cost more than the copying (SmolLM2, 16 rows x 64 steps, all layers,
        two cores: the hooks took 34-52 ms a call, 22-28 with one copy a step); our Python per
        layer, three calls, cost a fifth of the rest (16 rows x 16 steps, alternating calls:
        12.6 ms a call in the hooks with them, 9.9 with the `append` alone). The model never
        changes a layer's output in place: HF's own `output_hidden_states` hands out the same
        tensors. Without `keep_decode` no layer is watched."""
        self._unwatch_layers()
        self._decoding = True
        if not self._keep_decode:
            return
        kept = self._kept
        self._watch_layers(kept.append, lambda lid: kept.append)

    def _grab_prefill(self, lid: int, output: object) -> None:
        hidden = _hidden_states(output)
        length = hidden.shape[1]
        if self._prefill_rows != 0:
            if self._prefill_rows is not None:
                hidden = hidden[:, -self._prefill_rows :]
            if self._block is None:
                self._block = torch.empty(
                    (len(self._slots), *hidden.shape), dtype=self._dtype, device=hidden.device
                )
                self._layer_views = self._block.unbind(0)
            # copied at once: the prefill's layer outputs are large, and each is freed as soon
            # as the next layer has read it
            self._layer_views[self._slots[lid]].copy_(hidden)
        if lid == self._last:
            self.lengths.append(length)
            if self._block is not None:
                self.blocks[0] = _to_host(self._block)
                self._block = None

    def _end_decode_step(self) -> None:
        step = len(self.lengths)
        self.lengths.append(self._fed)
        if not self._keep_decode:
            return
        outputs = [_hidden_states(o) for o in self._kept]
        self._kept.clear()
        if len(outputs) != len(self._slots):
            raise CaptureError(
                f"decode step {step} ran {len(outputs)} of the {len(self._slots)} watched "
                "layers; cannot place its activations"
            )
        block = torch.empty(
            (len(outputs), *outputs[-1].shape), dtype=self._dtype, device=outputs[-1].device
        )
        torch._foreach_copy_(block.unbind(0), outputs)
        self.blocks[step] = _to_host(block)

    def before_step(self, args: tuple, kwargs: dict) -> None:
        """From the second forward on, the fed tokens are the ones the previous step chose."""
        if self.lengths:
            if not self._decoding:
                self._watch_decode()
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self._fed = ids.shape[1]
            self._chosen(ids[:, -1])

    def after_step(self, output) -> None:
        if self._decoding:
            self._end_decode_step()
        if self._reduction is not None:
            logits = output.logits if hasattr(output, "logits") else output[0]
            self._reduction.load(logits[:, -1])
            self._pending = True

    def row_stats(self, row: int, n_tokens: int) -> np.ndarray:
        self._reduction.wait()  # steps still gathered for one reduction
        return super().row_stats(row, n_tokens)

    def close(self, last_tokens: torch.Tensor) -> None:
        """The tokens the last step chose (generate never feeds them back)."""
        self._chosen(last_tokens)

    def release(self) -> None:
        super().release()
        self._on_tokens = _no_tokens  # the caller's callback usually refers back to this log

    def _chosen(self, tokens: torch.Tensor) -> None:
        if self._pending:
            # the ids wait for the block's reduction: a copy, whatever generate does with its own
            self._reduction.reduce(tokens.clone(), lambda rows: self.stats.append(_to_host(rows)))
            self._pending = False
        self._on_tokens(tokens)


def _hidden_states(output: object) -> torch.Tensor:
    """A decoder layer's hidden states from what it returned (a tensor, or a tuple whose first
    item is one, by transformers version and architecture)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _no_tokens(tokens: torch.Tensor) -> None:
    raise CaptureError("a released recording got tokens")


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A step's device tensor in host memory: one asynchronous copy into pinned memory on CUDA
    (`StepLog._ready` waits for it), the tensor itself on the CPU."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
