"""`make bench`: every benchmark, each printing its table and writing results/<name>.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "bench_startup.py",
    "bench_store.py",
    "bench_capture.py",
    "bench_gguf.py",
    "bench_vllm.py",
    "bench_token_stats.py",
    "bench_judge.py",
    "bench_retrieval.py",
    "bench_analysis.py",
]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name), *sys.argv[1:]], cwd=HERE).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
