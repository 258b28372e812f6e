"""Plugin registration: lazy, complete, and working from a plain (non-editable) wheel install."""

import json
import site
import subprocess
import sys
import venv
import zipfile

import pytest
from conftest import ROOT, TEST_TASKS

PROBE = """
import json, sys
from lm_eval.api import registry
from lm_eval.tasks import TaskManager
user = sys.argv[1]
names = ("hallulens_demo", "capture_probe", "hellaswag")
out = {
    "aliases": [a for a in ("hallulens-hf", "hf", "vllm", "dummy") if a in registry.model_registry],
    "default": [t for t in names[:2] if t in TaskManager().all_tasks],
    "with_user": [t for t in names if t in TaskManager(include_path=user).all_tasks],
    "no_defaults": [
        t for t in names if t in TaskManager(include_path=user, include_defaults=False).all_tasks
    ],
    "heavy_before_model": sorted(m for m in ("torch", "transformers", "vllm") if m in sys.modules),
}
import hallulens_tasks
out["tasks_from"] = hallulens_tasks.__file__
out["model_class"] = registry.get_model("hallulens-hf").__name__
print(json.dumps(out))
"""


def probe(python, cwd):
    result = subprocess.run(
        [python, "-c", PROBE, str(TEST_TASKS)], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_registration(found):
    assert found["aliases"] == ["hallulens-hf", "hf", "vllm", "dummy"]  # built-ins kept
    assert found["heavy_before_model"] == []  # nothing heavy until a model is requested
    assert found["default"] == ["hallulens_demo"]  # our tasks without --include_path
    assert found["with_user"] == ["hallulens_demo", "capture_probe", "hellaswag"]
    assert found["no_defaults"] == ["capture_probe"]
    assert found["model_class"] == "HalluLensHFLM"


def test_editable_install_registers_lazily(tmp_path):
    found = probe(sys.executable, tmp_path)
    check_registration(found)
    assert found["tasks_from"].startswith(str(ROOT))


def test_interpreter_start_imports_only_the_hook(tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()]
    ours = [m for m in imported if m.startswith(("hallulens", "lm_eval"))]
    assert ours == ["lm_eval_hallulens_hook"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("lm_eval_hallulens-*.whl")
    return built


def test_wheel_ships_hook_tasks_prompts_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert (
            archive.read("lm_eval_hallulens.pth").decode().strip()
            == "import lm_eval_hallulens_hook"
        )
        [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    for name in (
        "hallulens_tasks/prompts/demo_question.jinja",
        "hallulens_tasks/demo/hallulens_demo.yaml",
        "hallulens_tasks/demo/demo_questions.jsonl",
        "hallulens_tasks/prompts/judge_longwiki_claims.jinja",
        "hallulens_tasks/data/longwiki/wiki_pages.jsonl",
        "hallulens_tasks/tasks/longwiki.yaml",
        "hallulens_capture/store.py",
        "hallulens_models/hf_lm.py",
        "lm_eval_hallulens_hook.py",
    ):
        assert name in names
    assert (
        "[lm_eval.models]\nhallulens-gguf = hallulens_models.gguf_lm:HalluLensGGUFLM\n"
        "hallulens-hf = hallulens_models.hf_lm:HalluLensHFLM" in text
    )
    assert "[lm_eval.tasks]\nhallulens = hallulens_tasks" in text


@pytest.mark.slow
def test_plain_wheel_install_works_with_stock_lm_eval(tmp_path, wheel):
    """Install the wheel (no editable path) into a fresh site dir next to this env's packages."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    packages = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    # this env's packages as a plain path (their .pth files, the editable one included, are not
    # processed), then the wheel's site dir, whose .pth is processed as after `pip install .`
    with open(f"{packages}/setup.pth", "w") as f:
        f.write(f"{site.getsitepackages()[0]}\nimport site; site.addsitedir({str(target)!r})\n")
    found = probe(str(python), tmp_path)
    check_registration(found)
    assert found["tasks_from"].startswith(str(target))
    run = subprocess.run(
        [
            python,
            "-m",
            "lm_eval",
            "--model",
            "hallulens-hf",
            "--model_args",
            f"pretrained=smollm2,activations={tmp_path / 'acts'}",
            "--tasks",
            "hallulens_demo",
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "hallulens_demo" in run.stdout
    verify = subprocess.run(
        [python, "-m", "hallulens_tasks.cli", "activations", "verify", str(tmp_path / "acts")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert verify.returncode == 0 and "2 of 2 records ok" in verify.stdout, (
        verify.stdout + verify.stderr
    )
