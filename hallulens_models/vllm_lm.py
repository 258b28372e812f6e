"""`hallulens-vllm`: the harness's VLLM model, plus activation capture inside vLLM's engine.

Everything the parent does is untouched (loglikelihood, batching, chat templates, tensor
parallel, `max_model_len`, `gpu_memory_utilization`), except that a CPU engine reserves a share
of RAM that fits (`vllm_defaults`) when the user sets none. With `activations=PATH` the engine
runs our worker class (`vllm_worker.CaptureWorker`), which records the chosen layers and token
statistics of every tagged request, and is built as a `vllm_engine.CaptureLLM`, which collects
each request's rows as soon as it finishes; `_model_generate` tags the generate requests, and
each finished request goes to the shared record writer while vLLM generates the others.

Capture runs with prefix caching off: a cached prefix is never recomputed, so its rows would be
missing; speculative decoding is refused. With `data_parallel_size` > 1 the harness runs its
replicas as Ray tasks (on any node of the Ray cluster); each replica captures and sends its rows
back with its outputs (`vllm_engine`), and this process writes the records. Pipeline parallel
is refused (README: Many processes and GPUs).
"""

from __future__ import annotations

import contextlib
import uuid

from lm_eval.api.registry import register_model
from lm_eval.models.utils import postprocess_generated_text
from lm_eval.models.vllm_causallms import VLLM

from hallulens_capture.errors import CaptureError
from hallulens_models import vllm_capture as capture
from hallulens_models.capture_mixin import CaptureMixin
from hallulens_models.embedded import resolve_pretrained
from hallulens_models.model_config import check_local_weights, text_config
from hallulens_models.vllm_defaults import cpu_memory_default
from hallulens_models.vllm_engine import SAMPLE, capture_engine


@register_model("hallulens-vllm")
class HalluLensVLLM(CaptureMixin, VLLM):
    def __init__(
        self,
        pretrained: str = "smollm2",
        **kwargs,
    ) -> None:
        spec = self._capture_spec(kwargs)
        model_name, pretrained = pretrained, resolve_pretrained(pretrained)
        check_local_weights(pretrained, kwargs)
        kwargs.update(cpu_memory_default(kwargs))
        layer_ids: list[int] = []
        if spec is not None:
            text = text_config(pretrained, kwargs)
            layer_ids = spec.layer_ids(text.num_hidden_layers)
            spec.check_vocab(text.vocab_size)
            kwargs.update(capture.engine_settings(kwargs, layer_ids, spec))
        with capture_engine() if spec is not None else contextlib.nullcontext():
            super().__init__(pretrained=pretrained, **kwargs)
        if spec is None:
            return
        # one engine in this process (data-parallel replicas are built per call): its records
        # are written as its requests finish
        if getattr(self, "model", None) is not None:
            self.model.on_finished = self._request_finished
        self._contexts: dict[tuple[int, ...], str] = {}
        self._run = uuid.uuid4().hex[:12]
        self._tags = 0
        self._start_capture(spec, layer_ids, model_name, backend="vllm")

    def tok_encode(self, string, *args, **kwargs):
        """The parent's; while capturing, the prompts of the call (the harness encodes them all
        at once) are remembered by their tokens: vLLM's outputs carry only the tokens."""
        encoded = super().tok_encode(string, *args, **kwargs)
        if self.capturing and isinstance(string, (list, tuple)):
            self._contexts = {tuple(ids): text for text, ids in zip(string, encoded, strict=True)}
        return encoded

    def _model_generate(self, requests, generate=False, sampling_params=None):
        if not (self.capturing and generate and isinstance(sampling_params, list)):
            return super()._model_generate(requests, generate, sampling_params)
        for params in sampling_params:
            self._tags += 1
            capture.tag(params, f"{self._run}-{self._tags}")
        if self.data_parallel_size == 1:  # each record was written as its request finished
            return super()._model_generate(requests, generate, sampling_params)
        with capture_engine():  # the replicas send each sample back with its output
            outputs = super()._model_generate(requests, generate, sampling_params)
        for output, params in zip(outputs, sampling_params, strict=True):
            if not hasattr(output, SAMPLE):
                raise CaptureError("the engine returned an output without captured activations")
            self._request_finished(output, params, getattr(output, SAMPLE))
        return outputs

    def _request_finished(self, output, params, sample) -> None:
        """A finished request's sample, with its prompt and the text the harness will return
        (`VLLM.generate_until`'s own post-processing: it passed `until` as the stop strings;
        with `think_end_token` the stop strings differ, and the harness's text is waited for)."""
        context = self._contexts.get(tuple(output.prompt_token_ids))
        if context is None:
            context = _untruncated(output.prompt_token_ids, self._contexts)
        text = output.outputs[0].text
        response = (
            None if self.think_end_token else postprocess_generated_text(text, params.stop, None)
        )
        self._finished(context, response, sample)


def _untruncated(ids: list[int], contexts: dict[tuple[int, ...], str]) -> str:
    """The prompt whose tokens are `ids` with one run of tokens cut out: the harness truncates
    a prompt too long for the model from the left, right or middle (`maybe_truncate`)."""
    n, found = len(ids), []
    for tokens, text in contexts.items():
        if len(tokens) > n:
            head = next((i for i in range(n) if tokens[i] != ids[i]), n)
            if tokens[len(tokens) - (n - head) :] == tuple(ids[head:]):
                found.append(text)
    if len(found) != 1:
        raise CaptureError("cannot tell which prompt a truncated vLLM request was made from")
    return found[0]
