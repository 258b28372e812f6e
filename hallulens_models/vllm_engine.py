"""`CaptureLLM`: vLLM's offline `LLM` handing over each capturing request as soon as it finishes.

`LLM.generate` steps the engine until every request is done. `CaptureLLM` looks at the outputs
of each step: for the requests this plugin tagged that finished in it, it works out which rows
their records hold (`vllm_capture.plan`), has the worker hand them over (`collective_rpc`
calls of a few MiB each: files in shared memory, mapped by this process, not copied) and gives
each `CapturedSample` to `on_finished`, while the engine goes on with the other requests. So
a record is written while the rest of its batch still generates, and no call holds more than
its running requests' rows in the worker. Chunked prefill, preemption and tensor parallel work
as in the worker (rows by absolute position, the first rank keeps them).

`hallulens-vllm` builds its engine as a `CaptureLLM` and writes each record from
`on_finished`. With `data_parallel_size` > 1 the harness runs replicas as Ray tasks (maybe on
other nodes, where no path of the front end's machine exists): there `on_finished` hangs each
sample on its `RequestOutput`, and Ray carries it back with the outputs (its arrays copied
out of the hand-over files as they are pickled), for the front end to write: the store keeps
one writer, on the front end's machine.
`capture_engine` has the harness build `CaptureLLM` wherever it builds `LLM`: the replica
function finds `LLM` among its module's globals when Ray ships it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from vllm import LLM

from hallulens_capture.record import storage_dtype
from hallulens_capture.session import CapturedSample
from hallulens_models import vllm_capture as capture
from hallulens_models.vllm_worker import CONFIG_KEY, TAG

log = logging.getLogger(__name__)

SAMPLE = "hallulens_sample"  # RequestOutput attribute: the request's CapturedSample
Finished = Callable[[object, object, CapturedSample], None]  # (RequestOutput, params, sample)


def attach(output, params, sample: CapturedSample) -> None:
    """The default `on_finished`: the sample travels with its output."""
    setattr(output, SAMPLE, sample)


class CaptureLLM(LLM):
    """vLLM's `LLM` whose tagged requests are collected as each finishes (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        # the front end sets this for its own engines; a replica on a Ray cluster started
        # elsewhere does not inherit the front end's environment
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        super().__init__(*args, **kwargs)
        self.on_finished: Finished = attach
        self._tagged: dict[str, object] = {}  # request id -> SamplingParams, until finished
        self._running: set[str] = set()  # this call's request ids, until finished
        self._config = (self.llm_engine.vllm_config.additional_config or {}).get(CONFIG_KEY)
        if not self._config:
            return
        hidden = self.llm_engine.vllm_config.model_config.get_hidden_size()
        self._shape = (len(self._config["layer_ids"]), hidden)
        self._row_bytes = self._shape[0] * hidden * storage_dtype(self._config["dtype"]).itemsize
        self._tokenizer = self.get_tokenizer()
        self.recomputed = 0  # rows computed again after preemption, kept once
        step = self.llm_engine.step  # `generate` steps the engine through this attribute

        def step_and_collect():
            outputs = step()
            self._running.difference_update(o.request_id for o in outputs if o.finished)
            done = [o for o in outputs if o.finished and o.request_id in self._tagged]
            if done:
                self._collect(done)
            return outputs

        self.llm_engine.step = step_and_collect
        add = self.llm_engine.add_request  # `generate` adds each request through this attribute

        def add_and_note(request_id: str, prompt, params, *args, **kwargs):
            """Note a tagged request by the id its outputs carry (the one given here: the
            engine returns an internal id with a random suffix instead)."""
            self._running.add(request_id)
            if TAG in (getattr(params, "extra_args", None) or {}):
                self._tagged[request_id] = params
            return add(request_id, prompt, params, *args, **kwargs)

        self.llm_engine.add_request = add_and_note

    def generate(self, *args, **kwargs):
        try:
            return super().generate(*args, **kwargs)
        except BaseException:
            if self._config:
                self._stop_call()
            raise
        finally:
            if self._config and self.recomputed:
                log.info(
                    "%d captured rows were computed again after preemption (kept once)",
                    self.recomputed,
                )
                self.recomputed = 0

    def _stop_call(self) -> None:
        """A call failed (a capture error, an interrupt): its other requests stop, and the
        worker forgets the rows of every request not collected — those still running and those
        that finished with the failed one. An error here would hide the one being raised."""
        with contextlib.suppress(Exception):
            self.llm_engine.abort_request(list(self._running))
        self._running.clear()
        self._tagged.clear()
        with contextlib.suppress(Exception):
            self.collective_rpc(capture.COLLECT, args=([], True))

    def _collect(self, outputs: list) -> None:
        """Hand the finished requests' rows over, a few MiB per call (`capture.handover_groups`),
        each sample to `on_finished` as its group arrives: the writer encodes and stores the
        first records while the worker writes out the next."""
        params = [self._tagged.pop(o.request_id) for o in outputs]
        config, tokenizer = self._config, self._tokenizer
        plans = [
            capture.plan(
                p.extra_args[TAG],
                o.prompt_token_ids,
                o.outputs[0],
                p,
                config["tokens"],
                tokenizer.eos_token_id,
                tokenizer.decode,
            )
            for o, p in zip(outputs, params, strict=True)
        ]
        topk = int(config.get("topk", 0))
        for group in capture.handover_groups(plans, self._row_bytes):
            chosen = [plans[i] for i in group]
            results = self.collective_rpc(
                capture.COLLECT, args=(capture.wanted(chosen, topk), False)
            )
            self.recomputed += capture.recomputed(results)
            samples = capture.samples(chosen, results, config["dtype"], topk, self._shape)
            for i, sample in zip(group, samples, strict=True):
                self.on_finished(outputs[i], params[i], sample)


@contextlib.contextmanager
def capture_engine() -> Iterator[None]:
    """Have the harness build `CaptureLLM` where it builds `LLM` (its own engine in `__init__`,
    its data-parallel replicas in each generate call)."""
    from lm_eval.models import vllm_causallms

    original = vllm_causallms.LLM
    vllm_causallms.LLM = CaptureLLM
    try:
        yield
    finally:
        vllm_causallms.LLM = original
