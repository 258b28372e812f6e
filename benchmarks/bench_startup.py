"""Start-up cost of the plugin's .pth hook: `python -c pass` with and without it.

Two throwaway environments see the same installed packages as a plain path (so no .pth of this
environment runs in either); one also runs the line of `lm_eval_hallulens.pth`. They start
alternately, and the hook's own import time is read from `-X importtime`.
"""

from __future__ import annotations

import py_compile
import site
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from common import save, table

ROOT = Path(__file__).resolve().parents[1]


def environment(base: Path, with_hook: bool) -> str:
    venv.create(base, with_pip=False)
    python = base / "bin" / "python"
    packages = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = [site.getsitepackages()[0], str(ROOT)]
    if with_hook:
        lines.append((ROOT / "lm_eval_hallulens.pth").read_text().strip())
    Path(packages, "setup.pth").write_text("\n".join(lines) + "\n")
    return str(python)


def run(repeats: int = 300) -> dict[str, object]:
    # as after `pip install`, which byte-compiles what it installs
    py_compile.compile(str(ROOT / "lm_eval_hallulens_hook.py"), doraise=True)
    with tempfile.TemporaryDirectory() as tmp:
        pythons = {
            "without": environment(Path(tmp, "without"), with_hook=False),
            "with": environment(Path(tmp, "with"), with_hook=True),
        }
        probe = "import sys; print('lm_eval_hallulens_hook' in sys.modules)"
        for name, python in pythons.items():
            loaded = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout
            assert loaded.strip() == str(name == "with"), f"hook state wrong in '{name}'"
        wall: dict[str, list[float]] = {"without": [], "with": []}
        for i in range(repeats):
            for name in ("without", "with") if i % 2 else ("with", "without"):
                start = time.perf_counter()
                subprocess.run([pythons[name], "-c", "pass"], check=True)
                wall[name].append(time.perf_counter() - start)
        importtime = subprocess.run(
            [pythons["with"], "-X", "importtime", "-c", "pass"], capture_output=True, text=True
        ).stderr
    ours = ("lm_eval_hallulens_hook",)
    hook_us = sum(
        int(line.split("|")[0].split(":")[1])
        for line in importtime.splitlines()
        if line.split("|")[-1].strip() in ours
    )
    med = {k: statistics.median(v) * 1000 for k, v in wall.items()}
    return {
        "repeats": repeats,
        "median_ms_without": med["without"],
        "median_ms_with": med["with"],
        "ratio": med["with"] / med["without"],
        "hook_import_us": hook_us,
    }


if __name__ == "__main__":
    result = run(100 if "--quick" in sys.argv else 300)
    print(
        table(
            "python -c pass, with vs without the plugin's .pth hook",
            ["runs", "without ms", "with ms", "ratio", "hook import µs"],
            [
                [
                    result["repeats"],
                    result["median_ms_without"],
                    result["median_ms_with"],
                    result["ratio"],
                    result["hook_import_us"],
                ]
            ],
        )
    )
    print("wrote", save("startup", result))
