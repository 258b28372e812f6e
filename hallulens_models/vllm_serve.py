"""`vllm serve` with activation capture, as a vLLM general plugin (`vllm.general_plugins`).

`ACTIVATION_LMDB_PATH=acts.lmdb vllm serve MODEL` records every completions and chat request:
the plugin gives the engine the capture worker `hallulens-vllm` uses, tags each request in
`AsyncLLM.generate`, and once the request has finished collects its rows and writes the record
under sha256 of the prompt as the engine received it (for chat requests the rendered chat
text; a prompt seen before gets the next `-n` suffix). Records are written by one background
thread after the response has gone out. The plugin opens no port or file beyond the store.

Outside the `vllm serve` front end, or without the variable, the plugin does nothing and
imports nothing. `HALLULENS_CAPTURE_LAYERS`, `HALLULENS_CAPTURE_TOKENS`,
`HALLULENS_CAPTURE_DTYPE` and `HALLULENS_CAPTURE_TOPK` choose what is kept (defaults as for
model_args). The token statistics are computed in the engine's worker from the same logits the
sampler gets, so a response, and any logprobs the client asks for, are what they would be
without the plugin.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

ENV_LAYERS = "HALLULENS_CAPTURE_LAYERS"
ENV_TOKENS = "HALLULENS_CAPTURE_TOKENS"
ENV_DTYPE = "HALLULENS_CAPTURE_DTYPE"
ENV_TOPK = "HALLULENS_CAPTURE_TOPK"
_ENGINE_FIELDS = (
    "data_parallel_size",
    "pipeline_parallel_size",
    "speculative_config",
    "enable_prefix_caching",
    "worker_cls",
    "additional_config",
)


def _serving() -> bool:
    """True in the `vllm serve` front end (also `python -m vllm.entrypoints.openai.api_server`)."""
    argv = sys.argv
    command = os.path.basename(argv[0]) if argv else ""
    return (command == "vllm" and argv[1:2] == ["serve"]) or any(
        a.endswith("entrypoints.openai.api_server") for a in argv[:3]
    )


def register() -> None:
    """The plugin entry point; vLLM calls it in each of its processes."""
    from hallulens_capture.spec import ENV_STORE_PATH

    if not os.environ.get(ENV_STORE_PATH) or not _serving():
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    if getattr(AsyncLLM.generate, "_hallulens", False):
        return
    EngineArgs.create_engine_config = _with_capture_settings(EngineArgs.create_engine_config)
    AsyncLLM.generate = _recording(AsyncLLM.generate)


def _spec():
    from hallulens_capture.spec import CaptureSpec

    env = os.environ
    return CaptureSpec.from_model_args(
        None,
        env.get(ENV_LAYERS),
        env.get(ENV_TOKENS),
        env.get(ENV_DTYPE),
        capture_topk=env.get(ENV_TOPK),
    )


def _with_capture_settings(create):
    def create_engine_config(self, *args, **kwargs):
        from hallulens_capture.errors import CaptureConfigError
        from hallulens_models.model_config import text_config
        from hallulens_models.vllm_capture import engine_settings

        if (getattr(self, "data_parallel_size", 1) or 1) > 1:
            raise CaptureConfigError(
                f"data_parallel_size={self.data_parallel_size} cannot be used with the capture "
                "plugin: run one `vllm serve` per data-parallel rank, each with its own "
                "ACTIVATION_LMDB_PATH (or hallulens-vllm, which captures in every replica)"
            )
        spec = _spec()
        text = text_config(
            self.model, {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        )
        user = {name: getattr(self, name, None) for name in _ENGINE_FIELDS}
        layer_ids = spec.layer_ids(text.num_hidden_layers)
        spec.check_vocab(text.vocab_size)
        for name, value in engine_settings(user, layer_ids, spec).items():
            setattr(self, name, value)
        log.info("recording activations of every request into %s", spec.path)
        return create(self, *args, **kwargs)

    return create_engine_config


class _Answer:
    """A request's whole answer, also when the client streams (vLLM then yields deltas)."""

    def __init__(self) -> None:
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] = []
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason = self.stop_reason = None

    def add(self, output, delta: bool) -> None:
        if output.prompt is not None:
            self.prompt = output.prompt
        if output.prompt_token_ids:
            self.prompt_token_ids = list(output.prompt_token_ids)
        completion = output.outputs[0]
        if delta:
            self.token_ids += completion.token_ids
            self.text += completion.text
        else:
            self.token_ids, self.text = list(completion.token_ids), completion.text
        self.finish_reason, self.stop_reason = completion.finish_reason, completion.stop_reason


class _Recorder:
    """Writes the records of one server process: one writer thread (requests are written one
    at a time, and a server has no end of run at which extra writers' shards are complete)."""

    def __init__(self, engine) -> None:
        import psutil

        from hallulens_capture.session import CaptureSession
        from hallulens_models.vllm_handover import directories_of, remove_when_gone
        from hallulens_models.vllm_worker import CONFIG_KEY

        # the engine's workers (running: a request came): the server kills them as it stops
        workers = directories_of(p.pid for p in psutil.Process().children(recursive=True))
        atexit.register(remove_when_gone, workers)
        config = engine.vllm_config.additional_config[CONFIG_KEY]
        model = engine.vllm_config.model_config
        self.spec = _spec()
        self.shape = (len(config["layer_ids"]), model.get_hidden_size())
        self.session = CaptureSession(
            self.spec, config["layer_ids"], model.served_model_name, backend="vllm", writers=1
        )
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="hallulens-store")
        self.tokenizer = engine.tokenizer
        self.tasks: set[asyncio.Task] = set()

    async def record(self, engine, answer: _Answer, params, tag: str) -> None:
        from hallulens_models import vllm_capture as capture

        plan = capture.plan(
            tag,
            answer.prompt_token_ids,
            answer,
            params,
            self.spec.tokens,
            self.tokenizer.eos_token_id,
            self.tokenizer.decode,
        )
        topk = self.spec.topk
        results = await engine.collective_rpc(
            capture.COLLECT, args=(capture.wanted([plan], topk), False)
        )
        [sample] = capture.samples([plan], results, self.spec.dtype, topk, self.shape)
        prompt = answer.prompt
        if prompt is None:  # a request given as token ids
            prompt = self.tokenizer.decode(plan.prompt_token_ids, skip_special_tokens=False)
        settings = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "stop": list(params.stop or []),
        }
        await asyncio.get_running_loop().run_in_executor(
            self.writer, self._write, prompt, answer.text, settings, sample
        )

    def _write(self, prompt: str, response: str, settings: dict, sample) -> None:
        from hallulens_capture.session import SampleRequest

        key = self.session.free_key(prompt)
        self.session.write(key, SampleRequest(prompt, settings), response, sample)
        self.session.flush()

    async def forget(self, engine, tag: str) -> None:
        from hallulens_models.vllm_capture import COLLECT

        await engine.collective_rpc(COLLECT, args=([[tag, 0, 0, 0]], False))

    def spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("activation record not written: %s", task.exception())


def _recording(generate):
    recorders: dict[int, _Recorder] = {}

    async def recording_generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        from hallulens_models.vllm_capture import tag as tag_request

        if sampling_params.n != 1:  # siblings would share one tag
            log.warning(
                "request %s asks for n=%d answers: not recorded", request_id, sampling_params.n
            )
            async for output in generate(
                self, prompt, sampling_params, request_id, *args, **kwargs
            ):
                yield output
            return
        recorder = recorders.get(id(self)) or recorders.setdefault(id(self), _Recorder(self))
        tag = f"serve-{request_id}"
        tag_request(sampling_params, tag)
        delta = sampling_params.output_kind == RequestOutputKind.DELTA
        answer, finished = _Answer(), False
        try:
            async for output in generate(
                self, prompt, sampling_params, request_id, *args, **kwargs
            ):
                answer.add(output, delta)
                finished = output.finished
                yield output
        finally:
            if finished:
                recorder.spawn(recorder.record(self, answer, sampling_params, tag))
            else:
                recorder.spawn(recorder.forget(self, tag))

    recording_generate._hallulens = True  # type: ignore[attr-defined]
    return recording_generate
