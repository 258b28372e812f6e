"""`hallulens-vllm`: the harness's VLLM model, plus activation capture inside vLLM's engine.

Everything the parent does is untouched (loglikelihood, batching, chat templates, tensor
parallel, `max_model_len`, `gpu_memory_utilization`), except that a CPU engine reserves a share
of RAM that fits (`vllm_defaults`) when the user sets none. With `activations=PATH` the engine
runs our worker class (`vllm_worker.CaptureWorker`), which records the chosen layers of every tagged
request; `_model_generate` tags the generate requests, and after vLLM returns collects each
request's rows and hands them to the shared record writer.

Capture runs with prefix caching off: a cached prefix is never recomputed, so its rows would be
missing; speculative decoding is refused. With `data_parallel_size` > 1 the harness runs its
replicas as Ray tasks (on any node of the Ray cluster); each replica captures and sends its rows
back with its outputs (`vllm_replica`), and this process writes the records. Pipeline parallel
is refused (README: Many processes and GPUs).
"""

from __future__ import annotations

import logging
import shutil
import uuid
import weakref

from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM

from hallulens_models import vllm_capture as capture
from hallulens_models.capture_mixin import CaptureMixin
from hallulens_models.embedded import resolve_pretrained
from hallulens_models.model_config import check_local_weights, text_config
from hallulens_models.vllm_defaults import cpu_memory_default
from hallulens_models.vllm_replica import ROWS, replicas_capture

log = logging.getLogger(__name__)


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
            self._shape = (len(layer_ids), text.hidden_size)
            kwargs.update(capture.engine_settings(kwargs, layer_ids, spec))
        super().__init__(pretrained=pretrained, **kwargs)
        if spec is None:
            return
        self._staging = capture.staging_dir()
        weakref.finalize(self, shutil.rmtree, self._staging, True)
        self._run = uuid.uuid4().hex[:12]
        self._tags = 0
        self._start_capture(spec, layer_ids, model_name, backend="vllm")

    def _model_generate(self, requests, generate=False, sampling_params=None):
        if not (self.capturing and generate and isinstance(sampling_params, list)):
            return super()._model_generate(requests, generate, sampling_params)
        tags = []
        for params in sampling_params:
            self._tags += 1
            tags.append(f"{self._run}-{self._tags}")
            capture.tag(params, tags[-1])
        if self.data_parallel_size > 1:
            with replicas_capture():
                outputs = super()._model_generate(requests, generate, sampling_params)
            results = [[getattr(output, ROWS) for output in outputs if hasattr(output, ROWS)]]
        else:
            outputs = super()._model_generate(requests, generate, sampling_params)
            results = None
        spec = self._capture.spec
        plans = [
            capture.plan(
                tag,
                output.prompt_token_ids,
                output.outputs[0],
                params,
                spec.tokens,
                self.eot_token_id,
                self.tokenizer.decode,
            )
            for tag, output, params in zip(tags, outputs, sampling_params, strict=True)
        ]
        if results is None:
            results = self.model.collective_rpc(
                capture.COLLECT, args=(capture.wanted(plans), self._staging, True)
            )
        if recomputed := capture.recomputed(results):
            log.info(
                "%d captured rows were computed again after preemption (kept once)", recomputed
            )
        for sample in capture.samples(plans, results, spec, self._shape):
            self._captured(sample)
        return outputs
