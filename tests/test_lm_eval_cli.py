"""The stock `lm_eval` command with our plugin installed: models, tasks, capture, errors."""

import json

import pytest
from conftest import TEST_TASKS, run_cli
from reference import compare_record

from hallulens_capture import open_store
from hallulens_capture.report import verify

pytestmark = pytest.mark.slow


def test_capture_through_stock_cli_with_user_tasks(tmp_path, reference_model):
    store_path, out = tmp_path / "acts.lmdb", tmp_path / "out"
    result = run_cli(
        "lm_eval",
        "--model",
        "hallulens-hf",
        "--model_args",
        f"pretrained=smollm2,activations={store_path},dtype=float32,map_size_gb=0.001,"
        'capture_layers="0,15,30"',  # a 1 MB map: the store grows it as records come
        "--tasks",
        "hallulens_demo,capture_probe,capture_choice",
        "--include_path",
        str(TEST_TASKS),
        "--batch_size",
        "4",
        "--output_path",
        str(out),
        "--log_samples",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["capture_choice"]["acc,none"] >= 0.5  # loglikelihood path works
    assert "answer_mentioned,none" in results["results"]["hallulens_demo"]
    assert results["config"]["activations"] == str(store_path)
    assert results["config"]["capture_layers"] == [0, 15, 30]

    generated = []
    for task in ("hallulens_demo", "capture_probe"):
        [samples] = out.rglob(f"samples_{task}_*.jsonl")
        generated += [(task, json.loads(line)) for line in samples.read_text().splitlines()]
    with open_store(store_path) as store:
        assert len(store) == len(generated) == 8 + 24
        checked = verify(store)
        assert checked.bad == {} and checked.no_checksum == 0
        for task, sample in generated:
            record = store[sample["prompt_hash"]]  # the harness's own hash is our key
            assert (record.task, record.doc_id) == (task, sample["doc_id"])
            assert record.response == sample["resps"][0][0]
            assert list(record.layer_ids) == [0, 15, 30]
        for _, sample in generated[:3] + generated[-3:]:
            assert (
                compare_record(store[sample["prompt_hash"]], reference_model).min_cosine >= 0.9999
            )


def test_builtin_models_and_tasks_are_still_there(tmp_path):
    listing = run_cli("lm_eval", "ls", "tasks", "--include_path", str(TEST_TASKS))
    assert listing.returncode == 0, listing.stderr[-2000:]
    for name in ("hellaswag", "gsm8k", "hallulens_demo", "capture_probe"):
        assert f"|{name} " in listing.stdout
    dummy = run_cli("lm_eval", "--model", "dummy", "--tasks", "hallulens_demo", "--limit", "2")
    assert dummy.returncode == 0, dummy.stderr[-2000:]
    assert "hallulens_demo" in dummy.stdout


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        (
            "pretrained=smollm2,activations={s},capture_layers=31",
            "lm-eval-hallulens: error: capture_layers: layer 31 is out of range for a model "
            "with 30 decoder layers",
        ),
        (
            "pretrained=smollm2,activations={s},capture_dtype=int8",
            "lm-eval-hallulens: error: capture_dtype='int8': expected one of float16, "
            "bfloat16, float32",
        ),
        (
            "pretrained={s}/no-such-model,activations={s}",
            "lm-eval-hallulens: error: pretrained={s}/no-such-model: cannot read the model config",
        ),
    ],
)
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, model_args, message):
    result = run_cli(
        "lm_eval",
        "--model",
        "hallulens-hf",
        "--model_args",
        model_args.format(s=tmp_path),
        "--tasks",
        "hallulens_demo",
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(s=tmp_path)), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Loading weights" not in result.stderr  # failed before the model loaded
