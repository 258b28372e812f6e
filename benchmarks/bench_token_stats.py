"""Token statistics: activation capture with ÷ without them (capture_topk=20 vs 0), per engine.

Both sides capture the same layers (all 31, float16, generated tokens) into fresh stores; only
`capture_topk` differs, so the ratio is what the logprob, entropy and top-20 of every generated
token add on top of activation capture. The workloads are those of `bench_capture` (HF, batches
1, 4, 16), `bench_vllm` (16 prompts, 64 new tokens) and `bench_gguf` (one sequence at a time).
Runs go in pairs, back to back, in alternating order; every run uses fresh prompts (the store
resumes stored ones), the same on both sides (each side has its own store), so both generate the
same tokens. The ratio is the median of the pairs' ratios, with its 95 % interval
(`common.Pairs`): single whole runs on shared cores swing ±5–10 %, pairs far less.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import bench_capture
import bench_gguf
import bench_vllm
from common import Pairs, paired, save, span, table

TOPK = 20


def hf(tmp: str, tags, batches, new_tokens: int, repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        first = bench_capture.backend(batch, activations=f"{tmp}/hf-{batch}-0", capture_topk=0)
        lms = {
            0: first,
            TOPK: bench_capture.backend(
                batch, first, activations=f"{tmp}/hf-{batch}-{TOPK}", capture_topk=TOPK
            ),
        }

        sides = same_tags(tags)

        def call(k: int, batch=batch, lms=lms, sides=sides) -> None:
            prefix = f"t{next(sides[k])}-"
            lms[k].generate_until(bench_capture.requests(batch, new_tokens, prefix))

        pairs = paired(lambda: call(TOPK), lambda: call(0), repeats, warm=True)
        rows.append(row("hf", f"batch {batch}, {new_tokens} tokens", pairs))
        del lms
        gc.collect()
    return rows


def vllm(tmp: str, tags, repeats: int) -> list[dict]:
    from hallulens_models.vllm_lm import HalluLensVLLM

    _, new_tokens, length = bench_vllm.WORKLOADS["prompt+generated"]
    lms = {
        k: HalluLensVLLM(
            pretrained="smollm2",
            batch_size=16,
            activations=f"{tmp}/vllm-{k}.lmdb",
            capture_tokens="generated",
            capture_topk=k,
            **bench_vllm.ENGINE,
        )
        for k in (TOPK, 0)
    }

    sides = same_tags(tags)

    def call(k: int) -> None:
        lms[k].generate_until(bench_vllm.requests(new_tokens, length, f"t{next(sides[k])}"), True)

    pairs = paired(lambda: call(TOPK), lambda: call(0), repeats, warm=True)
    for lm in lms.values():
        lm.model.llm_engine.engine_core.shutdown()
    workload = f"16 prompts, {new_tokens} tokens, {bench_vllm.ENGINE['dtype']}"
    return [row("vllm", workload, pairs)]


def gguf(tmp: str, tags, lengths, repeats: int) -> list[dict]:
    from hallulens_models.gguf_lm import HalluLensGGUFLM

    lms = {
        k: HalluLensGGUFLM(
            pretrained="smollm2", n_ctx=1024, activations=f"{tmp}/gguf-{k}.lmdb", capture_topk=k
        )
        for k in (TOPK, 0)
    }
    rows = []
    for n in lengths:
        sides = same_tags(tags)
        pairs = paired(
            lambda n=n, s=sides: bench_gguf.ours(lms[TOPK], n, f"t{next(s[TOPK])}"),
            lambda n=n, s=sides: bench_gguf.ours(lms[0], n, f"t{next(s[0])}"),
            repeats,
            warm=True,
        )
        rows.append(row("gguf", f"4 prompts, {n} tokens", pairs))
    return rows


def same_tags(tags) -> dict[int, itertools.count]:
    """One tag sequence per side, both the same: the i-th call of each side gets the same
    prompts (different prompts generate different lengths, the noise this removes)."""
    first = next(tags) * 1000
    return {k: itertools.count(first) for k in (TOPK, 0)}


def row(engine: str, workload: str, pairs: Pairs) -> dict:
    """A workload's figures: median seconds of each side, the median of the per-pair ratios
    with its 95 % interval (`common.Pairs`), and every pair's ratio."""
    return {
        "engine": engine,
        "workload": workload,
        "without_s": statistics.median(pairs.b),
        "with_s": statistics.median(pairs.a),
        "ratio": pairs.ratio,
        "interval": pairs.interval(),
        "pair_ratios": pairs.ratios,
    }


def run(quick: bool, engines: list[str], repeats: int | None) -> dict[str, object]:
    repeats = repeats or (2 if quick else 9)
    tags = iter(range(10**9))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "hf" in engines:
            rows += hf(tmp, tags, (4,) if quick else (1, 4, 16), 16 if quick else 64, repeats)
        if "gguf" in engines:
            rows += gguf(tmp, tags, (32,) if quick else (32, 128), repeats)
        if "vllm" in engines:
            rows += vllm(tmp, tags, repeats)
    return {"rows": rows, "topk": TOPK, "layers": "all", "storage": "float16", "repeats": repeats}


def options() -> argparse.Namespace:
    """This benchmark's own options (`make bench` passes every benchmark the same arguments)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engines", default="hf,gguf,vllm", help="comma-separated subset")
    parser.add_argument("--repeats", type=int, help="pairs of calls (default 9, 2 with --quick)")
    return parser.parse_known_args()[0]


if __name__ == "__main__":
    start = time.perf_counter()
    args = options()
    result = run(args.quick, args.engines.split(","), args.repeats)
    print(
        table(
            f"Token statistics (SmolLM2, CPU): capture with ÷ without capture_topk={TOPK} "
            "(all layers captured on both sides)",
            ["engine", "workload", "without s", "with s", "ratio", "95 % interval"],
            [
                [
                    r["engine"],
                    r["workload"],
                    r["without_s"],
                    r["with_s"],
                    r["ratio"],
                    span(r["interval"]),
                ]
                for r in result["rows"]
            ],
        )
    )
    print(save("token_stats", result), f"({time.perf_counter() - start:.0f} s)")
