"""`hallulens-vllm`: the harness's VLLM model, plus activation capture inside vLLM's engine.

Everything the parent does is untouched (loglikelihood, batching, chat templates, tensor
parallel, `max_model_len`, `gpu_memory_utilization`). With `activations=PATH` the engine runs our
worker class (`vllm_worker.CaptureWorker`), which records the chosen layers of every tagged
request; `_model_generate` tags the generate requests, and after vLLM returns collects each
request's rows and hands them to the shared record writer.

Capture runs with prefix caching off: a cached prefix is never recomputed, so its rows would be
missing. Data parallel is refused (the harness runs DP replicas as separate Ray jobs whose
engines this process cannot reach); so are pipeline parallel and speculative decoding.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
import weakref
from importlib.metadata import version

import numpy as np
from lm_eval.api.registry import register_model
from lm_eval.models.vllm_causallms import VLLM

from hallulens_capture.errors import CaptureConfigError, CaptureError
from hallulens_capture.positions import response_length, token_positions
from hallulens_capture.record import CAPTURE_DTYPE_LABELS, STORAGE_DTYPES
from hallulens_capture.session import CapturedSample, CaptureSession
from hallulens_capture.spec import CaptureSpec
from hallulens_models.embedded import resolve_pretrained
from hallulens_models.harness import CaptureMixin, join_harness_cli
from hallulens_models.model_config import text_config
from hallulens_models.vllm_worker import CONFIG_KEY, TAG

log = logging.getLogger(__name__)

TESTED_VLLM = ("0.32.0",)
WORKER = "hallulens_models.vllm_worker.CaptureWorker"


def _engine_settings(kwargs: dict, layer_ids: list[int], spec: CaptureSpec) -> None:
    """Refuse what capture cannot follow; add our worker, its settings and no prefix caching."""
    for name, bad in (
        ("data_parallel_size", lambda v: int(v) > 1),
        ("pipeline_parallel_size", lambda v: int(v) > 1),
        ("speculative_config", bool),
        ("enable_prefix_caching", bool),
    ):
        if name in kwargs and bad(kwargs[name]):
            raise CaptureConfigError(
                f"{name}={kwargs[name]} cannot be used with activation capture: "
                + {
                    "data_parallel_size": "run one lm_eval per GPU group with its own "
                    "activations= store instead",
                    "pipeline_parallel_size": "use tensor_parallel_size",
                    "speculative_config": "verified draft tokens do not map to rows one to one",
                    "enable_prefix_caching": "cached prefix tokens are never recomputed, so "
                    "their activations would be missing",
                }[name]
            )
    if kwargs.get("worker_cls", "auto") not in ("auto", WORKER):
        raise CaptureConfigError(f"worker_cls={kwargs['worker_cls']}: capture needs {WORKER}")
    extra = dict(kwargs.get("additional_config") or {})
    extra[CONFIG_KEY] = {"layer_ids": layer_ids, "tokens": spec.tokens, "dtype": spec.dtype}
    kwargs.update(worker_cls=WORKER, enable_prefix_caching=False, additional_config=extra)


def _staging_dir() -> str:
    """Where the worker hands rows over: shared memory when the machine has it."""
    shm = "/dev/shm"
    where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="hallulens-vllm-", dir=where)


@register_model("hallulens-vllm")
class HalluLensVLLM(CaptureMixin, VLLM):
    def __init__(
        self,
        pretrained: str = "smollm2",
        activations: str | None = None,
        capture_layers: object = None,
        capture_tokens: str | None = None,
        capture_dtype: str | None = None,
        map_size_gb: float | None = None,
        **kwargs,
    ) -> None:
        join_harness_cli()
        spec = CaptureSpec.from_model_args(
            activations, capture_layers, capture_tokens, capture_dtype, map_size_gb
        )
        model_name, pretrained = pretrained, resolve_pretrained(pretrained)
        layer_ids: list[int] = []
        if spec is not None:
            installed = version("vllm")
            if installed.split("+")[0] not in TESTED_VLLM:
                log.warning(
                    "vLLM %s is not one of the versions hallulens-vllm was tested with (%s); "
                    "capture checks the engine internals it uses and stops if they changed",
                    installed,
                    ", ".join(TESTED_VLLM),
                )
            text = text_config(pretrained, kwargs)
            self._hidden = text.hidden_size
            layer_ids = [int(i) for i in spec.layer_ids(text.num_hidden_layers)]
            _engine_settings(kwargs, layer_ids, spec)
            # Model Runner V2 (GPU default for dense models) keeps its batch elsewhere.
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        super().__init__(pretrained=pretrained, **kwargs)
        if spec is None:
            return
        self._staging = _staging_dir()
        weakref.finalize(self, shutil.rmtree, self._staging, True)
        self._run = uuid.uuid4().hex[:12]
        self._tags = 0
        self._start_capture(CaptureSession(spec, layer_ids, model_name, backend="vllm"))

    def _model_generate(self, requests, generate=False, sampling_params=None):
        if not (self.capturing and generate and isinstance(sampling_params, list)):
            return super()._model_generate(requests, generate, sampling_params)
        tags = []
        for params in sampling_params:
            self._tags += 1
            tags.append(f"{self._run}-{self._tags}")
            params.extra_args = {**(params.extra_args or {}), TAG: tags[-1]}
        outputs = super()._model_generate(requests, generate, sampling_params)
        self._hand_over(outputs, tags, sampling_params)
        return outputs

    def _hand_over(self, outputs, tags: list[str], sampling_params) -> None:
        """Collect each output's rows from the worker and queue them for the record writer."""
        scope = self._capture.spec.tokens
        plans = []
        for output, params in zip(outputs, sampling_params, strict=True):
            completion = output.outputs[0]
            generated = list(completion.token_ids)
            ends = {self.eot_token_id}
            if completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
                ends.update(generated[-1:])  # vLLM stopped on this token (EOS or a stop id)
            keep = response_length(
                generated,
                ends,
                params.stop or [],
                lambda ids, p=params: self.tokenizer.decode(
                    ids, skip_special_tokens=p.skip_special_tokens
                ),
            )
            prompt = list(output.prompt_token_ids)
            plans.append((prompt, generated[:keep], token_positions(scope, len(prompt), keep)))
        wanted = [
            [tag, int(pos[0]), len(pos)]
            for tag, (_, _, pos) in zip(tags, plans, strict=True)
            if len(pos)
        ]
        found = {}
        for rank_result in self.model.collective_rpc(
            "hallulens_collect", args=(wanted, self._staging)
        ):
            found.update({item["tag"]: item for item in rank_result})
        recomputed = sum(item.get("recomputed", 0) for item in found.values())
        if recomputed:
            log.info(
                "%d captured rows were computed again after preemption (kept once)", recomputed
            )
        dtype = STORAGE_DTYPES[CAPTURE_DTYPE_LABELS[self._capture.spec.dtype]]
        for tag, (prompt, generated, positions) in zip(tags, plans, strict=True):
            if len(positions):
                item = found.get(tag)
                if item is None or "missing" in item:
                    span = item["missing"] if item else "all"
                    raise CaptureError(
                        f"vLLM ran no forward pass for positions {span} of a request; "
                        "its activations are incomplete"
                    )
                rows = np.fromfile(item["path"], dtype=dtype).reshape(item["shape"])
                os.unlink(item["path"])
            else:
                rows = np.empty((len(self._capture.layer_ids), 0, self._hidden), dtype=dtype)
            self._captured(
                CapturedSample(
                    prompt=None,
                    prompt_token_ids=prompt,
                    generated_token_ids=generated,
                    token_positions=positions,
                    activations=rows,
                )
            )
