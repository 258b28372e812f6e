"""`hallulens activations audit` on a store with planted faults, counted by hand; and the torch
Dataset over an npy export."""

from __future__ import annotations

import json

import lmdb
import numpy as np
from conftest import run_cli
from synthetic import Sample, rows_for, write_store

from hallulens_analysis import ExportDataset, Selection, build_plan, export_npy, open_store


def acts(seed: int, p: int = 3, g: int = 4) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .standard_normal((2, rows_for("all", p, g), 8))
        .astype(np.float16)
    )


def test_audit_counts_every_planted_fault(tmp_path):
    nan_row, zero_rows = acts(1), acts(2)
    nan_row[1, 2, 5] = np.nan  # one (layer, token) row with NaN
    zero_rows[0, 0] = 0.0  # two all-zero rows
    zero_rows[1, 4] = 0.0
    samples = [
        Sample("a", acts(0), 3, 4, label="correct", doc_id=0),
        Sample("b", nan_row, 3, 4, label="hallucinated", doc_id=1),
        Sample("c", zero_rows, 3, 4, doc_id=2),  # no label
        Sample(
            "d", acts(3, g=8), 3, 8, label="refused", doc_id=3, gen_kwargs='{"max_gen_toks": 8}'
        ),
        Sample("a", acts(4), 3, 4, label="correct", doc_id=0),  # same prompt and doc again
        Sample("e", acts(5), 3, 4, label="correct", doc_id=5, response="  "),
    ]
    keys = write_store(tmp_path / "s", samples)
    done = run_cli("hallulens", "activations", "audit", str(tmp_path / "s"), "--json")
    assert done.returncode == 1  # bad rows are problems
    found = json.loads(done.stdout)
    problems, notes = found["problems"], found["notes"]
    assert (problems["nonfinite_rows"], problems["zero_rows"]) == (1, 2)
    assert problems["records_with_nonfinite_rows"]["examples"] == [keys[1]]
    assert problems["records_with_zero_rows"]["examples"] == [keys[2]]
    assert problems["bad_records"]["count"] == problems["labels_without_record"]["count"] == 0
    assert notes["records_without_label"]["examples"] == [keys[2]]
    assert notes["responses_at_max_gen_toks"]["examples"] == [keys[3]]
    assert notes["empty_responses"]["examples"] == [keys[5]]
    assert notes["prompts_with_several_records"] == {"count": 1, "records": 2}
    assert notes["task_doc_with_several_records"]["examples"] == ["synthetic_task doc 0"]
    assert found["generated_tokens"]["max"] == 8 and found["generated_tokens"]["min"] == 4
    assert found["labels_by_task"] == {
        "synthetic_task": {"correct": 3, "hallucinated": 1, "none": 1, "refused": 1}
    }
    text = run_cli("hallulens", "activations", "audit", str(tmp_path / "s"), "--max-gen-toks", "4")
    assert "PROBLEMS found" in text.stdout and "responses_at_max_gen_toks      6" in text.stdout


def test_audit_of_a_clean_store_and_labels_without_records(tmp_path):
    keys = write_store(tmp_path / "s", [Sample("a", acts(0), 3, 4, label="correct")])
    assert run_cli("hallulens", "activations", "audit", str(tmp_path / "s")).returncode == 0
    env = lmdb.open(str(tmp_path / "s"), max_dbs=8)  # a label with no record, put by hand
    with env.begin(write=True, db=env.open_db(b"labels")) as txn:
        txn.put(b"f" * 64, b'{"label": "correct"}')
    env.close()
    done = run_cli("hallulens", "activations", "audit", str(tmp_path / "s"), "--json")
    found = json.loads(done.stdout)
    assert done.returncode == 1 and found["problems"]["labels_without_record"]["examples"] == [
        "f" * 64
    ]
    assert found["records"] == 1 and keys


def test_torch_dataset_over_an_npy_export(tmp_path):
    import torch

    samples = [
        Sample(f"q{i}", acts(i), 3, 4, label=["correct", "refused"][i % 2], doc_id=i)
        for i in range(6)
    ]
    write_store(tmp_path / "s", samples)
    with open_store(tmp_path / "s") as store:
        export_npy(
            store, build_plan(store, Selection.parse("all", ["window:2", "mean"])), tmp_path / "x"
        )
    window = np.load(tmp_path / "x" / "window-2.npy")
    mask = np.load(tmp_path / "x" / "window-2.mask.npy")
    dataset = ExportDataset(tmp_path / "x", "window:2", layers="1", target="refusal")
    assert len(dataset) == 6 and dataset.layer_ids == [1]
    labels = [json.loads(line)["label"] for line in (tmp_path / "x" / "index.jsonl").open()]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    x = torch.cat([b["x"] for b in batches]).numpy()
    np.testing.assert_array_equal(x, window[:, [1]])
    np.testing.assert_array_equal(torch.cat([b["mask"] for b in batches]).numpy(), mask)
    assert torch.cat([b["y"] for b in batches]).tolist() == [int(x == "refused") for x in labels]
    only = ExportDataset(tmp_path / "x", "mean")  # the export's own target: correct vs hallucinated
    assert [int(only[i]["y"]) for i in range(len(only))] == [
        0 if x == "correct" else -1 for x in labels
    ]
