"""`hallulens-hf`: the harness's HFLM, plus activation capture during `generate_until`.

Everything HFLM does is untouched (loglikelihood, batching, chat templates); with
`activations=PATH` each generation's residual stream and token statistics go to the store.
Capture sits in two overrides: `tok_batch_encode` remembers the batch's prompts,
`_model_generate` records the forward steps of `model.generate` through `LayerTap` and turns
each batch row into a `CapturedSample` (left padding dropped, positions counted per row) as soon
as its response has ended, while generate goes on with the other rows.

One change to HFLM itself: under `accelerate launch`, ranks are numbered over all processes of
all nodes, also on CPUs (see `_rank_per_process`).
"""

from __future__ import annotations

import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import postprocess_generated_text

from hallulens_capture.errors import CaptureConfigError, CaptureError
from hallulens_capture.positions import ends_response, response_length, token_positions
from hallulens_capture.session import CapturedSample
from hallulens_models.capture_mixin import CaptureMixin
from hallulens_models.embedded import resolve_pretrained
from hallulens_models.hf_tap import TORCH_DTYPES, LayerTap
from hallulens_models.model_config import check_local_weights, text_config


@register_model("hallulens-hf")
class HalluLensHFLM(CaptureMixin, HFLM):
    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel = "gpt2",
        **kwargs,
    ) -> None:
        spec = self._capture_spec(kwargs)
        model_name = pretrained if isinstance(pretrained, str) else pretrained.name_or_path
        if isinstance(pretrained, str):
            pretrained = resolve_pretrained(pretrained)
            check_local_weights(pretrained, kwargs)
        layer_ids = None
        if spec is not None:
            config = text_config(pretrained, kwargs)
            layer_ids = spec.layer_ids(config.num_hidden_layers)
            spec.check_vocab(config.vocab_size)
        self._batch_prompts: list[str] | None = None
        super().__init__(pretrained=pretrained, **kwargs)
        self._rank_per_process()
        if spec is None:
            return
        if self.backend != "causal":
            raise CaptureConfigError("activation capture needs a decoder-only (causal) model")
        self._tap = LayerTap(self.model, layer_ids, TORCH_DTYPES[spec.dtype])
        self._eos_ids = self._end_token_ids()
        self._start_capture(spec, layer_ids, model_name, backend="hf")

    def _rank_per_process(self) -> None:
        """Under `accelerate launch`, each process is one rank of the harness's data parallelism,
        numbered over all nodes. HFLM makes ranks only on two or more GPUs and numbers them per
        node (`local_process_index`): on CPUs every process then ran every document, and on
        several nodes the ranks of each node repeated the documents of the first."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def _end_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def tok_batch_encode(self, strings: list[str], *args, **kwargs):
        self._batch_prompts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if not self.capturing:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        prompts, self._batch_prompts = self._batch_prompts, None
        if prompts is None or len(prompts) != context.shape[0]:
            raise CaptureError("generate call without its batch of prompts; cannot key the records")
        if (
            generation_kwargs.get("num_beams", 1) != 1
            or generation_kwargs.get("num_return_sequences", 1) != 1
        ):
            raise CaptureError("activation capture supports one sequence per prompt (no beams)")
        spec = self._capture.spec
        # `response` needs one prefill column: the last prompt token's (left padding)
        prefill_rows = {"generated": 0, "response": 1}.get(spec.tokens)
        mask = generation_kwargs.get("attention_mask")
        batch = _Batch(self, prompts, context, mask, stop)
        try:
            with self._tap.recording(
                prefill_rows, spec.tokens != "prompt", spec.topk, batch.chosen
            ) as batch.log:
                sequences = super()._model_generate(context, max_length, stop, **generation_kwargs)
                batch.log.close(sequences[:, -1])
            batch.finish_rest()
        finally:
            if batch.log is not None:
                batch.log.release()
        return sequences

    def response_text(self, tokens: list[int], stop: list[str]) -> str:
        """The text HFLM.generate_until returns for a row whose response is `tokens` (its own
        steps; it decodes the row's later padding too, which decodes to nothing)."""
        think = self.think_end_token
        if isinstance(think, int) and think in tokens:
            tokens = tokens[len(tokens) - tokens[::-1].index(think) :]
        text = self.tok_decode(tokens)
        if isinstance(think, int):
            text = text.lstrip()
        return postprocess_generated_text(text, stop, think if isinstance(think, str) else None)


STOP_EVERY = 4  # steps between looks for the stop strings in the rows' text


class _Batch:
    """The rows of one capturing `generate` call. Each step's chosen tokens arrive as the next
    step feeds them; a row whose response has ended goes to the record writer while generate
    goes on with the others, the rest when generate returns. An end-of-sequence token is seen
    at once; a stop string within STOP_EVERY steps, since looking means decoding each row's
    last tokens (~15 us a row: 16 rows x 64 steps took 17 ms a batch looking at every step,
    while the engine waits). A late look changes nothing in the record: `_finish` cuts the
    response where its stop string ends."""

    def __init__(self, lm: HalluLensHFLM, prompts: list[str], context, mask, stop: list[str]):
        self.lm = lm
        self.log = None  # the tap's Recording, set once recording starts
        self.prompts = prompts
        self.context = context
        self.width = context.shape[1]
        self.prompt_lengths = (
            mask.sum(dim=1).tolist() if mask is not None else [self.width] * len(prompts)
        )
        self.stop = stop
        # a stop string shows in the text of the last few tokens (and of the steps since the
        # last look); a miss only delays the record
        self.window = 2 * max((len(s) for s in stop), default=0) + 1 + STOP_EVERY
        self.steps = 0
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.open = set(range(len(prompts)))

    def chosen(self, tokens) -> None:
        """The tokens one step chose, one per row."""
        self.steps += 1
        lengths = self.log.lengths  # the prefill, then one token per step
        if lengths != [self.width] + [1] * (self.steps - 1):
            raise CaptureError(
                f"generate ran forward steps of {lengths[:4]}... tokens for a {self.width}-token "
                f"batch and {self.steps} new tokens; cannot place them"
            )
        tokens = tokens.tolist()
        stop = self.stop if self.steps % STOP_EVERY == 0 else ()
        for row in sorted(self.open):
            generated = self.generated[row]
            generated.append(tokens[row])
            window = generated[-self.window :]
            if ends_response(window, self.lm._eos_ids, stop, self.lm.tok_decode):
                self._finish(row)

    def finish_rest(self) -> None:
        for row in sorted(self.open):
            self._finish(row)

    def _finish(self, row: int) -> None:
        self.open.discard(row)
        lm, spec = self.lm, self.lm._capture.spec
        generated = self.generated[row]
        generated = generated[: response_length(generated, lm._eos_ids, self.stop, lm.tok_decode)]
        n_prompt = self.prompt_lengths[row]
        # decode step j feeds generated token j-1: the last generated token is never fed
        n_decode = 0 if spec.tokens == "prompt" else max(len(generated) - 1, 0)
        prompt_rows = {"generated": 0, "response": 1}.get(spec.tokens, n_prompt)
        sample = CapturedSample(
            prompt_token_ids=self.context[row, self.width - n_prompt :].tolist(),
            generated_token_ids=generated,
            token_positions=token_positions(spec.tokens, n_prompt, len(generated)),
            activations=self.log.row(row, prompt_rows, n_decode),
            token_stats=self.log.row_stats(row, len(generated)) if spec.topk else None,
        )
        lm._finished(self.prompts[row], lm.response_text(generated, self.stop), sample)
