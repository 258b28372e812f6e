"""`hallulens-hf`: the harness's HFLM, plus activation capture during `generate_until`.

Everything HFLM does is untouched (loglikelihood, batching, chat templates); with
`activations=PATH` each generation's residual stream goes to the store. Capture sits in two
overrides: `tok_batch_encode` remembers the batch's prompts, `_model_generate` records the
forward steps of `model.generate` through `LayerTap` and turns each batch row into a
`CapturedSample` (left padding dropped, positions counted per row).

One change to HFLM itself: under `accelerate launch`, ranks are numbered over all processes of
all nodes, also on CPUs (see `_rank_per_process`).
"""

from __future__ import annotations

import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from hallulens_capture.errors import CaptureConfigError, CaptureError
from hallulens_capture.positions import response_length, token_positions
from hallulens_capture.session import CapturedSample
from hallulens_models.capture_mixin import CaptureMixin
from hallulens_models.embedded import resolve_pretrained
from hallulens_models.hf_tap import TORCH_DTYPES, LayerTap, to_storage
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
        layer_ids = (
            spec.layer_ids(text_config(pretrained, kwargs).num_hidden_layers) if spec else None
        )
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
        scope = self._capture.spec.tokens
        # `response` needs one prefill column: the last prompt token's (left padding)
        prefill_rows = {"generated": 0, "response": 1}.get(scope)
        with self._tap.recording(prefill_rows, keep_decode=scope != "prompt") as log:
            sequences = super()._model_generate(context, max_length, stop, **generation_kwargs)
        width = context.shape[1]
        if log.lengths[:1] != [width] or sum(log.lengths) != sequences.shape[1] - 1:
            raise CaptureError(
                f"generate ran forward steps of {log.lengths[:4]}... tokens for a {width}-token "
                f"batch and {sequences.shape[1] - width} new tokens; cannot place them"
            )
        mask = generation_kwargs.get("attention_mask")
        prompt_lengths = mask.sum(dim=1).tolist() if mask is not None else [width] * len(prompts)
        for row, (prompt, n_prompt) in enumerate(zip(prompts, prompt_lengths, strict=True)):
            generated = sequences[row, width:].tolist()
            generated = generated[
                : response_length(generated, self._eos_ids, stop, self.tok_decode)
            ]
            # decode step j feeds generated token j-1: the last generated token is never fed
            n_decode = 0 if scope == "prompt" else max(len(generated) - 1, 0)
            prompt_rows = {"generated": 0, "response": 1}.get(scope, n_prompt)
            acts = log.row(row, prompt_rows, n_decode)
            self._captured(
                CapturedSample(
                    prompt=prompt,
                    prompt_token_ids=context[row, width - n_prompt :].tolist(),
                    generated_token_ids=generated,
                    token_positions=token_positions(scope, n_prompt, len(generated)),
                    activations=to_storage(acts),
                )
            )
        return sequences
