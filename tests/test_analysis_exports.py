"""Each export read back by its own reader equals `open_store` on every selected element; a
killed npy export, run again, gives the same bytes as one never interrupted."""

from __future__ import annotations

import json
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import run_cli
from synthetic import Sample, rows_for, write_store

from hallulens_analysis import ExportError, NpyExport, Selection, build_plan, export_npy, open_store

HIDDEN = 16
WORKER = Path(__file__).with_name("export_worker.py")


def make_store(path: Path, n: int = 8, hidden: int = HIDDEN, layers: int = 4) -> list[str]:
    rng = np.random.default_rng(7)
    samples = []
    for i in range(n):
        p, g = 3 + i % 3, 2 + i % 5
        acts = rng.standard_normal((layers, rows_for("all", p, g), hidden)).astype(np.float16)
        label = [None, "correct", "hallucinated", "refused"][i % 4]
        samples.append(
            Sample(f"q{i % (n - 2)}", acts, p, g, doc_id=i, label=label, task=f"t{i % 2}")
        )
    return write_store(path, samples)


def expected(record, layers: list[int], n_windows: int = 3) -> dict[str, np.ndarray]:
    """mean and window of a scope-`all` record, by hand from its raw array (float32)."""
    raw = record.all_layers_activations[[record.layer_ids.tolist().index(x) for x in layers]]
    p, g = len(record.prompt_token_ids), len(record.generated_token_ids)
    window = np.zeros((len(layers), n_windows, raw.shape[-1]), np.float32)
    window[:, : min(n_windows, g - 1)] = raw[:, p : p + min(n_windows, g - 1)]
    return {
        "mean": raw[:, p : p + g - 1].astype(np.float64).mean(axis=1),
        "window": window,
        "mask": np.arange(n_windows) < g - 1,
    }


def test_npy_export_equals_the_store(tmp_path):
    make_store(tmp_path / "s")
    out = tmp_path / "npy"
    done = run_cli(
        "hallulens", "activations", "export", str(tmp_path / "s"), "--format", "npy",
        "--out", str(out), "--layers", "1-3", "--reduce", "mean", "window:3", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows"] == 8 and summary["labels"]["none"] == 2
    assert "2 exported records have no label" in done.stderr  # reported, kept
    mean = np.load(out / "mean.npy", mmap_mode="r")
    window = np.load(out / "window-3.npy", mmap_mode="r")
    mask = np.load(out / "window-3.mask.npy")
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert mean.dtype == np.float16 and mean.shape == (8, 3, HIDDEN)
    assert window.shape == (8, 3, 3, HIDDEN)
    with open_store(tmp_path / "s") as store:
        labels = store.labels()
        assert [r["key"] for r in index] == sorted(store.keys())
        for row in index:
            record = store[row["key"]]
            want = expected(record, [1, 2, 3])
            i = row["row"]
            np.testing.assert_array_equal(
                mean[i], want["mean"].astype(np.float32).astype(np.float16)
            )
            np.testing.assert_array_equal(window[i], want["window"].astype(np.float16))
            np.testing.assert_array_equal(mask[i], want["mask"])
            label = labels.get(row["key"], {}).get("label", "")
            assert (row["label"], row["prompt"], row["response"]) == (
                label,
                record.prompt,
                record.response,
            )
            assert row["y"] == {"hallucinated": 1, "correct": 0}.get(label, -1)
            assert row["group"] == np.load(out / "groups.npy")[i]
        y = np.load(out / "y.npy")
        assert y.tolist() == [r["y"] for r in index]
        assert np.load(out / "lengths.npy").tolist() == [r["n_generated"] for r in index]
    # q0 and q1 are asked twice (keys -1): those rows share a group
    groups = {}
    for row in index:
        groups.setdefault(row["key"].split("-")[0], set()).add(row["group"])
    assert all(len(g) == 1 for g in groups.values()) and len(groups) == 6
    reader = NpyExport(out)
    np.testing.assert_array_equal(
        reader.read_layers("mean", [0, 2], np.array([1, 4, 5])),
        np.asarray(mean[[1, 4, 5]][:, [0, 2]], dtype=np.float32),
    )


def file_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_killed_npy_export_resumes_to_the_same_bytes(tmp_path):
    """Kill -9 a real export at a random committed row, run it again, compare every byte."""
    seed = int(time.time())
    at = random.Random(seed).randint(10, 150)
    make_store(tmp_path / "s", n=200, hidden=512, layers=6)
    args = [sys.executable, str(WORKER), str(tmp_path / "s")]
    reference = subprocess.run([*args, str(tmp_path / "ref")], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    progress = out.with_name("out.partial") / "progress.json"
    proc = subprocess.Popen([*args, str(out)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            rows = json.loads(progress.read_text())["rows"]
        except (OSError, ValueError):
            rows = 0
        if rows >= at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"ended before it could be killed (seed {seed})"
    assert at <= rows < 200 and not out.exists()  # nothing that looks finished
    with pytest.raises(ExportError, match="unfinished"):
        NpyExport(out)
    resumed = subprocess.run([*args, str(out)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the unfinished export" in resumed.stderr
    assert file_bytes(out) == file_bytes(tmp_path / "ref")
    again = subprocess.run([*args, str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_partial_export_of_other_settings_starts_over(tmp_path, caplog):
    make_store(tmp_path / "s")
    out = tmp_path / "out"
    partial = out.with_name("out.partial")
    partial.mkdir()
    (partial / "config.json").write_text('{"format": "hallulens-npy/1", "other": true}')
    with open_store(tmp_path / "s") as store:
        export_npy(store, build_plan(store, Selection.parse()), out)
        assert not partial.exists()
        export_npy(store, build_plan(store, Selection.parse("0-1")), tmp_path / "other")
        with pytest.raises(ExportError, match="holds another export"):
            export_npy(store, build_plan(store, Selection.parse("0-1")), out)
    assert "other settings: starting over" in caplog.text


def test_hf_export_loads_with_datasets_and_equals_the_store(tmp_path):
    from datasets import load_from_disk

    make_store(tmp_path / "s")
    done = run_cli(
        "hallulens", "activations", "export", str(tmp_path / "s"), "--format", "hf",
        "--out", str(tmp_path / "hf"), "--reduce", "mean", "window:3", "--label", "correct",
        "hallucinated", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    dataset = load_from_disk(str(tmp_path / "hf"))
    assert dataset.features["mean"].dtype == "float16"
    assert json.loads(dataset.info.description)["layer_ids"] == [0, 1, 2, 3]
    dataset.set_format("numpy")
    with open_store(tmp_path / "s") as store:
        labels = store.labels()
        want_keys = sorted(
            k for k in store if labels.get(k, {}).get("label") in ("correct", "hallucinated")
        )
        assert list(dataset["key"]) == want_keys
        for i, key in enumerate(want_keys):
            row = dataset[i]
            want = expected(store[key], [0, 1, 2, 3])
            np.testing.assert_array_equal(
                row["mean"], want["mean"].astype(np.float32).astype(np.float16)
            )
            np.testing.assert_array_equal(row["window_3"], want["window"].astype(np.float16))
            np.testing.assert_array_equal(row["window_3_mask"], want["mask"])
            assert row["label"] == labels[key]["label"] and row["y"] == int(
                row["label"] == "hallucinated"
            )
    assert not (tmp_path / "hf.partial").exists()


def seed_reader(path: Path, key: str) -> tuple[dict, dict]:
    """Read one entry as the seed documents its v2 layout: main env value, side env metadata."""
    values = []
    for where in (path, path.with_name(path.name + "_metadata")):
        env = lmdb.open(str(where), readonly=True, lock=False)  # as test_check_lmdb.py opens it
        with env.begin() as txn:
            values.append(pickle.loads(txn.get(key.encode("utf-8"))))
        env.close()
    return values[0], values[1]


def test_legacy_export_in_the_seed_layout(tmp_path):
    import torch

    make_store(tmp_path / "s")
    out = tmp_path / "legacy.lmdb"
    (out.with_name("legacy.lmdb.partial")).mkdir()  # a killed run's leftovers
    done = run_cli(
        "hallulens", "activations", "export", str(tmp_path / "s"), "--format", "legacy",
        "--out", str(out), "--layers", "1,3", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open_store(tmp_path / "s") as store:
        for key in store:
            record = store[key]
            value, meta = seed_reader(out, key)
            data = value["data"]
            assert value["metadata"] == {"compression": "none"}
            assert (data["prompt"], data["response"], data["model"]) == (
                record.prompt,
                record.response,
                record.model,
            )
            assert data["input_length"] == len(record.prompt_token_ids)
            layers = data["all_layers_activations"]
            assert len(layers) == 4 and layers[0] is None and layers[2] is None
            for layer in (1, 3):
                assert layers[layer].dtype == torch.float16
                np.testing.assert_array_equal(
                    layers[layer].numpy(), record.all_layers_activations[layer][None]
                )
            # the v0 fields the seed's test_check_lmdb.py prints
            assert value["prompt"] == record.prompt and value["response"] == record.response
            assert tuple(value["activations"].shape) == (1, record.shape[1], HIDDEN)
            assert meta["logging_config"] == {"target_layers": [1, 3], "sequence_mode": "all"}
            assert meta["has_activations"] is True and "all_layers_activations" not in meta
            assert meta["label"] == store.labels().get(key, {}).get("label")
    again = run_cli(
        "hallulens", "activations", "export", str(tmp_path / "s"), "--format", "legacy",
        "--out", str(out), "--reduce", "mean",
    )  # fmt: skip
    assert again.returncode == 1
    assert again.stderr.strip() == (
        "hallulens: error: legacy exports hold whole token sequences: --reduce does not apply"
    )


def test_values_beyond_float16_are_refused(tmp_path):
    big = np.full((1, rows_for("all", 2, 3), 4), 1.0e6, np.float32)
    write_store(tmp_path / "s", [Sample("q", big, 2, 3, dtype="float32", label="correct")])
    bad = run_cli(
        "hallulens", "activations", "export", str(tmp_path / "s"), "--format", "npy",
        "--out", str(tmp_path / "x"), "--quiet",
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "values up to 1e+06 do not fit float16: export with --dtype float32" in bad.stderr
    good = run_cli(
        "hallulens", "activations", "export", str(tmp_path / "s"), "--format", "npy",
        "--out", str(tmp_path / "y"), "--dtype", "float32", "--quiet",
    )  # fmt: skip
    assert good.returncode == 0
    assert np.load(tmp_path / "y" / "mean.npy")[0, 0, 0] == 1.0e6
