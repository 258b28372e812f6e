"""Capture in the harness's data-parallel vLLM replicas (`data_parallel_size` > 1).

The harness runs each replica as a Ray task that builds `LLM(**model_args)`, calls `generate`
and returns its outputs (`VLLM._model_generate`). The task may run on another node, where no
path of the front end's machine exists and no file written there can be read by the front end.
So the captured rows travel the way the outputs do: `ReplicaLLM.generate` collects the rows of
each tagged request from its engine and hangs them on the request's `RequestOutput`, and Ray
carries them to the front end with the outputs (numpy arrays go out of band, not through the
pickle stream). The front end then writes the records itself, as it does for one engine: the
store has one writer, on the front end's machine.

`hallulens-vllm` has the harness build `ReplicaLLM` instead of `LLM` for the length of one
generate call (`replicas_capture`): the harness's replica function finds `LLM` among its
module's globals when Ray ships it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import numpy as np
from vllm import LLM

from hallulens_capture.positions import token_positions
from hallulens_capture.record import CAPTURE_DTYPE_LABELS, STORAGE_DTYPES
from hallulens_models.vllm_capture import COLLECT, staging_dir
from hallulens_models.vllm_worker import CONFIG_KEY, TAG

ROWS = "hallulens_rows"  # RequestOutput attribute: the collect result of the request


class ReplicaLLM(LLM):
    """vLLM's `LLM` whose `generate` also hands back each tagged request's captured rows."""

    def __init__(self, *args, **kwargs) -> None:
        # the front end sets this for its own engines; a replica on a Ray cluster started
        # elsewhere does not inherit the front end's environment
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        super().__init__(*args, **kwargs)

    def generate(self, prompts, sampling_params=None, *args, **kwargs):
        outputs = super().generate(prompts, sampling_params, *args, **kwargs)
        config = (self.llm_engine.vllm_config.additional_config or {}).get(CONFIG_KEY)
        if not config:
            return outputs
        params = sampling_params if isinstance(sampling_params, list) else None
        wanted = []
        for i, output in enumerate(outputs):
            tag = ((params[i] if params else sampling_params).extra_args or {}).get(TAG)
            if tag is not None:  # every position fed; the front end keeps those of the answer
                fed = token_positions(
                    config["tokens"], len(output.prompt_token_ids), len(output.outputs[0].token_ids)
                )
                wanted.append((output, [tag, int(fed[0]) if len(fed) else 0, len(fed)]))
        dtype = STORAGE_DTYPES[CAPTURE_DTYPE_LABELS[config["dtype"]]]
        staging = staging_dir()
        try:
            results = self.collective_rpc(COLLECT, args=([w for _, w in wanted], staging, True))
            found = {item["tag"]: item for rank in results for item in rank}
            for output, (tag, _, _) in wanted:
                item = dict(found.get(tag, {"tag": tag, "missing": "all"}))
                if "path" in item:
                    item["rows"] = np.fromfile(item.pop("path"), dtype=dtype).reshape(item["shape"])
                setattr(output, ROWS, item)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return outputs


@contextlib.contextmanager
def replicas_capture() -> Iterator[None]:
    """Have the harness's data-parallel replicas build `ReplicaLLM` during one generate call."""
    from lm_eval.models import vllm_causallms

    original = vllm_causallms.LLM
    vllm_causallms.LLM = ReplicaLLM
    try:
        yield
    finally:
        vllm_causallms.LLM = original
