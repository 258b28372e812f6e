"""Shared fixtures: the real SmolLM2 (converted once), an independent reference, CLI runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEST_TASKS = ROOT / "tests" / "tasks"

# One record-writer thread, the default on these 2-core machines, also on a bigger host (the
# default there is one per 4 cores): tests that count shards or name the root environment in
# an error assume it; tests of several writers set their own (monkeypatch, inherited by the
# processes they start).
os.environ["HALLULENS_CAPTURE_WRITERS"] = "1"

# accuracy figures reported at the end of the run (name -> text)
FIGURES: dict[str, str] = {}


def report(name: str, text: str) -> None:
    FIGURES[name] = text


# Test modules whose engines share the machine badly (vLLM reserves RAM, binds its threads to
# cores and opens ports): under `pytest -n` (make test) they run one after another on one worker,
# first, since together they are the longest lane; every other module runs whole on one worker
# (its module-scoped fixtures are built once), beside them.
SERIAL_LANE = ("test_vllm", "test_vllm_dp", "test_vllm_serve", "test_judge_vllm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.stem not in SERIAL_LANE)  # stable: order kept within


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling with one scope per module but one for the whole serial lane,
    handed out in collection order (the lane first)."""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "serial lane" if Path(path).stem in SERIAL_LANE else path

    config.option.loadscopereorder = False
    return Lanes(config, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A worker of `pytest -n` hands its figures to the controller, which prints them."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["figures"] = json.dumps(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    FIGURES.update(json.loads(getattr(node, "workeroutput", {}).get("figures", "{}")))


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured figures")
        for name, text in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {text}")


def printed_steps(stderr: str) -> list[tuple[dict[str, str], list[str]]]:
    """The steps `hallulens pipeline` printed (`+ NAME=value ... command`): each step's settings
    and its command's words."""
    steps = []
    for line in stderr.splitlines():
        if line.startswith("+ "):
            words = shlex.split(line[2:])
            n = next((i for i, w in enumerate(words) if not re.match(r"[A-Z_]+=", w)), len(words))
            steps.append((dict(w.split("=", 1) for w in words[:n]), words[n:]))
    return steps


def step_names(stderr: str) -> list[str]:
    """What each printed step runs: `lm_eval`, or the `hallulens` subcommand."""
    return [c[3] if c[2] == "hallulens_tasks.cli" else c[2] for _, c in printed_steps(stderr)]


def run_cli(tool: str, *args: str, env: dict | None = None, timeout: int = 900, cwd=None):
    """Run a console script of this environment (`lm_eval`, `hallulens`) and capture its output."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [str(BIN / tool), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


# What a native thread pool prints when the interpreter tears it down with a worker still alive
# (std::terminate from a joinable std::thread's destructor): seen once in many runs, after lm_eval
# had written its results and samples (README: Troubleshooting).
EXIT_ABORT = "terminate called without an active exception"


def aborted_at_exit(result: subprocess.CompletedProcess) -> bool:
    """A SIGABRT whose last words are EXIT_ABORT, after the run said it saved its samples: the
    run's work is done and checked by the caller; the abort is reported, not hidden."""
    lines = result.stderr.strip().splitlines()
    if result.returncode != -6 or not lines or lines[-1].strip() != EXIT_ABORT:
        return False
    if "Saving per-task samples" not in result.stderr:
        return False
    report("lm_eval aborted at interpreter exit after saving its results", EXIT_ABORT)
    return True


def lm_eval_run(
    model: str, model_args: str, tasks: str, out: Path, *more: str, env: dict | None = None
) -> tuple[dict, dict[str, list[dict]]]:
    """A stock `lm_eval` run on the test tasks with --log_samples that must succeed: its results
    JSON and the samples rows of each task."""
    result = run_cli(
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(TEST_TASKS),
        "--output_path",
        str(out),
        "--log_samples",
        *more,
        env=env,
    )
    assert result.returncode == 0 or aborted_at_exit(result), result.stderr[-4000:]
    [results] = out.rglob("results_*.json")
    samples = {}
    for task in tasks.split(","):
        [path] = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(results.read_text()), samples


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from hallulens_models.embedded import smollm2_hf

    return smollm2_hf()


@pytest.fixture(scope="session")
def reference_model(smollm2_dir):
    """A plain transformers model, loaded independently of the backend under test."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
