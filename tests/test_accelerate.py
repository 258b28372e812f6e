"""`accelerate launch` of the stock `lm_eval` with hallulens-hf: two ranks, two shards, every
prompt once; kill -9 of one rank, then the same command again: nothing lost, nothing twice."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import time

import pytest
from conftest import BIN, ROOT, TEST_TASKS, run_cli
from reference import compare_record

from hallulens_capture import open_store
from hallulens_capture.errors import StoreError
from hallulens_capture.report import check_record

pytestmark = pytest.mark.slow
PROMPTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(store, out) -> list[str]:
    """Two processes on CPUs: accelerate's torchrun launcher (`--multi_gpu`) with
    ACCELERATE_USE_CPU=1 (its `--cpu` launcher starts one process only)."""
    return [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "lm_eval",
        "--model",
        "hallulens-hf",
        "--model_args",
        f"pretrained=smollm2,activations={store},dtype=float32",
        "--tasks",
        "capture_probe",
        "--include_path",
        str(TEST_TASKS),
        "--limit",
        str(PROMPTS),
        "--batch_size",
        "1",
        "--output_path",
        str(out),
        "--log_samples",
    ]


ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"}


def shard_records(store, name) -> int:
    try:
        with open_store(store) as s:
            return next((x["records"] for x in s.shards() if x["name"] == name), 0)
    except StoreError:
        return 0


def test_two_ranks_write_two_shards_and_a_killed_rank_resumes(tmp_path, reference_model):
    store, out = tmp_path / "acts.lmdb", tmp_path / "out"
    seed = int(time.time())
    rng = random.Random(seed)
    run = subprocess.Popen(
        command(store, out),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wanted, deadline = rng.randint(1, 4), time.time() + 600
        while shard_records(store, "rank1") < wanted:
            assert run.poll() is None and time.time() < deadline, f"seed {seed}: no records"
            time.sleep(0.05)
        holder = (store / "shards" / "rank1" / "writer.lock").read_text()
        pid = int(re.match(r"pid (\d+) on ", holder).group(1))
        os.kill(pid, signal.SIGKILL)  # rank 1 only; its launcher then stops rank 0
        assert run.wait(timeout=120) != 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()

    checked = run_cli("hallulens", "activations", "verify", str(store))
    assert checked.returncode == 0, f"seed {seed}: {checked.stdout}"
    with open_store(store) as s:
        survivors = {key: s[key].timestamp for key in s}
        assert not (store / "shards" / "rank1" / "complete.json").exists()
    assert 1 <= len(survivors) < PROMPTS, f"seed {seed}"

    again = subprocess.run(
        command(store, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr
    [samples_file] = out.rglob("samples_capture_probe_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(row["doc_id"] for row in samples) == list(range(PROMPTS))
    with open_store(store) as s:
        assert [x["name"] for x in s.shards()] == ["rank0", "rank1"]
        assert all(x["complete"] is not None for x in s.shards())
        assert s.environments() == ["shard rank0", "shard rank1"]  # no root environment
        assert s.conflicts() == {}
        assert sorted(s) == sorted(row["prompt_hash"] for row in samples)  # each prompt once
        assert {key: s[key].timestamp for key in survivors} == survivors  # not captured again
        for row in samples:
            record = s[row["prompt_hash"]]
            assert (record.task, record.doc_id) == ("capture_probe", row["doc_id"])
            assert record.response == row["resps"][0][0]
            assert check_record(record) == []
            assert compare_record(record, reference_model).min_cosine >= 0.9999
        by_shard = {x["name"]: x["records"] for x in s.shards()}
    assert by_shard == {"rank0": PROMPTS // 2, "rank1": PROMPTS // 2}  # docs alternate ranks
