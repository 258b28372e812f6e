"""kill -9 of a capturing `lm_eval` at a random point, then a resumed run on the same store."""

import os
import random
import signal
import subprocess
import time

import pytest
from conftest import BIN, ROOT, TEST_TASKS, run_cli
from reference import compare_record

from hallulens_capture import open_store
from hallulens_capture.errors import StoreError
from hallulens_capture.report import check_record

pytestmark = pytest.mark.slow
TOTAL = 8 + 24  # hallulens_demo + capture_probe


def lm_eval_args(store):
    return [
        "--model",
        "hallulens-hf",
        "--model_args",
        f"pretrained=smollm2,activations={store},dtype=float32,capture_tokens=all",
        "--tasks",
        "hallulens_demo,capture_probe",
        "--include_path",
        str(TEST_TASKS),
        "--batch_size",
        "1",
    ]


def wait_for_records(path, minimum, proc, deadline):
    while time.time() < deadline:
        assert proc.poll() is None, "lm_eval ended before it could be killed"
        try:
            with open_store(path) as store:
                if len(store) >= minimum:
                    return
        except StoreError:
            pass
        time.sleep(0.05)
    raise AssertionError("no records appeared")


def test_kill_then_resume(tmp_path, reference_model):
    store_path = tmp_path / "acts.lmdb"
    seed = int(time.time())
    rng = random.Random(seed)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [str(BIN / "lm_eval"), *lm_eval_args(store_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_records(store_path, rng.randint(1, 6), proc, time.time() + 600)
        time.sleep(rng.uniform(0.0, 3.0))
        assert proc.poll() is None, f"finished before the kill (seed {seed})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    checked = run_cli("hallulens", "activations", "verify", str(store_path))
    assert checked.returncode == 0, f"seed {seed}: {checked.stdout}"
    with open_store(store_path) as store:
        survivors = {key: store[key].timestamp for key in store}
        assert 1 <= len(survivors) < TOTAL, f"seed {seed}"
        for key in survivors:
            record = store[key]
            assert check_record(record) == []
            assert compare_record(record, reference_model).min_cosine >= 0.9999

    resumed = run_cli("lm_eval", *lm_eval_args(store_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(survivors)} of {TOTAL} generations" in resumed.stderr
    assert f"{TOTAL - len(survivors)} records written" in resumed.stderr
    with open_store(store_path) as store:
        assert len(store) == TOTAL
        assert {key: store[key].timestamp for key in survivors} == survivors  # not redone
        assert all(check_record(store[key]) == [] for key in store)
