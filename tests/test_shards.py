"""Stores of shards: read as one, merged into one, conflicts reported, one writer per shard,
resume over every shard, job-array shares. Real LMDB; expectations built by hand."""

import hashlib
import json
import os
import shutil

import lmdb
import numpy as np
import pytest
from conftest import run_cli
from store_worker import sample

from hallulens_capture import open_store, record_key
from hallulens_capture.errors import CaptureConfigError, RecordConflictError, StoreError
from hallulens_capture.keys import occurrence_keys, share_of
from hallulens_capture.report import verify
from hallulens_capture.session import (
    CapturedSample,
    CaptureSession,
    SampleRequest,
    shard_name,
)
from hallulens_capture.spec import CaptureSpec
from hallulens_capture.store import ActivationStore

N = 30


def write(path, indices, shard=None, complete=True):
    with ActivationStore(path, writable=True, shard=shard) as store:
        for i in indices:
            store.put(*sample(i))
        if complete:
            store.mark_complete({"by": "test"})


def raw_values(env_dirs) -> dict[bytes, bytes]:
    """Every records value of some LMDB environments, read with plain py-lmdb."""
    values = {}
    for directory in env_dirs:
        env = lmdb.open(str(directory), readonly=True, max_dbs=8, lock=False)
        with env.begin() as txn:
            db = env.open_db(b"records", txn=txn, create=False)
            for key, value in txn.cursor(db=db):
                assert key not in values
                values[key] = value
        env.close()
    return values


@pytest.fixture
def one_and_sharded(tmp_path):
    """The same N records written into one environment, and split over a root environment and
    three shards (unequal shares, as ranks and jobs give)."""
    one, sharded = tmp_path / "one.lmdb", tmp_path / "sharded.lmdb"
    write(one, range(N))
    write(sharded, range(0, 4))
    write(sharded, range(4, 15), shard="rank0")
    write(sharded, range(15, 16), shard="rank1")
    write(sharded, range(16, N), shard="job2-rank10")
    return one, sharded


def test_a_sharded_store_reads_as_the_same_data_unsharded(one_and_sharded):
    one, sharded = one_and_sharded
    assert sorted(os.listdir(sharded / "shards")) == ["job2-rank10", "rank0", "rank1"]
    expected = {sample(i)[0]: bytes(sample(i)[1]) for i in range(N)}
    with open_store(one) as a, open_store(sharded) as b:
        assert len(a) == len(b) == N
        assert list(a) == list(b) == sorted(expected)
        assert b.environments() == [
            "the root environment",
            "shard job2-rank10",
            "shard rank0",
            "shard rank1",
        ]
        for key, value in expected.items():
            assert key in b
            assert bytes(b[key].buffer) == bytes(a[key].buffer) == value
            i = int(b[key].prompt.rsplit(" ", 1)[1])
            assert np.all(b[key].all_layers_activations == i)
        assert b.conflicts() == {}
        assert [s["name"] for s in b.shards()] == ["job2-rank10", "rank0", "rank1"]
        assert [s["records"] for s in b.shards()] == [14, 11, 1]
        assert all(s["complete"]["by"] == "test" and not s["writing"] for s in b.shards())
        assert verify(b).bad == {} and verify(b).records == N
        assert b.usage()["used_bytes"] > N * 200_000


def test_merge_writes_one_environment_equal_to_the_unsharded_one(one_and_sharded, tmp_path):
    one, sharded = one_and_sharded
    with ActivationStore(sharded, writable=True, create=False) as store:
        store.put_labels({sample(20)[0]: {"label": "hallucinated"}})  # into a root environment
    merged = tmp_path / "merged.lmdb"
    result = run_cli("hallulens", "activations", "merge", str(sharded), str(merged))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"merged {N} records and 1 labels from 4 environments of {sharded} into {merged}"
    )
    assert not (merged / "shards").exists()
    expected = {sample(i)[0].encode(): bytes(sample(i)[1]) for i in range(N)}
    assert raw_values([merged]) == raw_values([one]) == expected
    shard_dirs = [sharded, *sorted((sharded / "shards").iterdir())]
    assert raw_values(shard_dirs) == expected
    with open_store(merged) as store:
        assert store.labels() == {sample(20)[0]: {"label": "hallucinated"}}
    again = run_cli("hallulens", "activations", "merge", str(sharded), str(merged))
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"hallulens: error: {merged} exists already; merge writes a new store"
    )


def test_a_key_in_two_shards_is_reported_by_every_reader(tmp_path):
    """Shards gathered from two nodes whose runs both captured record 3 (a writer refuses a key
    another shard holds, but a node cannot see the other node's store)."""
    path, elsewhere = tmp_path / "s.lmdb", tmp_path / "node2.lmdb"
    write(path, range(5), shard="rank0")
    write(elsewhere, [3, 7], shard="rank1")
    shutil.move(elsewhere / "shards" / "rank1", path / "shards" / "rank1")
    key = sample(3)[0]
    with open_store(path) as store:
        assert len(store) == 6 and list(store).count(key) == 1
        assert key in store
        with pytest.raises(RecordConflictError, match="written twice, into shard rank0 and shard"):
            store[key]
        assert store.conflicts() == {key: ["shard rank0", "shard rank1"]}
        assert store[sample(7)[0]].response == "r7"  # the rest reads as ever
    checked = run_cli("hallulens", "activations", "verify", str(path))
    assert checked.returncode == 1
    assert checked.stdout.splitlines() == [
        f"BAD {key}: written twice, into shard rank0 and shard rank1 (two writers made the "
        "same record; neither is read: keep the shard that should hold it)",
        "5 of 6 records ok",
    ]
    for command in ("stats", "ls"):
        result = run_cli("hallulens", "activations", command, str(path))
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"hallulens: error: record {key}: written twice")
    merged = tmp_path / "merged"
    result = run_cli("hallulens", "activations", "merge", str(path), str(merged))
    assert result.returncode == 1 and not merged.exists()
    assert result.stderr.strip() == (
        f"hallulens: error: {path}: 1 key(s) written twice, e.g. {key} in shard rank0 and shard "
        "rank1; nothing merged (keep the shard that should hold each)"
    )


def test_merge_refuses_an_unfinished_shard_and_a_damaged_record(tmp_path):
    path, merged = tmp_path / "s.lmdb", tmp_path / "merged"
    write(path, range(3), shard="rank0")
    write(path, range(3, 6), shard="rank1", complete=False)  # a killed writer leaves no marker
    result = run_cli("hallulens", "activations", "merge", str(path), str(merged))
    assert result.returncode == 1 and not merged.exists()
    assert "shard rank1 has no completion marker" in result.stderr
    result = run_cli("hallulens", "activations", "merge", str(path), str(merged), "--incomplete-ok")
    assert result.returncode == 0, result.stderr
    with open_store(merged) as store:
        assert len(store) == 6
    env = lmdb.open(str(path / "shards" / "rank1"), max_dbs=8)
    with env.begin(write=True) as txn:  # one activation byte flipped after writing
        db = env.open_db(b"records", txn=txn)
        value = bytearray(txn.get(sample(4)[0].encode(), db=db))
        value[-600] ^= 0xFF
        txn.put(sample(4)[0].encode(), bytes(value), db=db)
    env.close()
    again = tmp_path / "again"
    result = run_cli("hallulens", "activations", "merge", str(path), str(again), "--incomplete-ok")
    assert result.returncode == 1 and not again.exists()
    assert f"record {sample(4)[0]}: stored bytes do not match" in result.stderr


def test_a_shard_has_one_writer_and_a_writer_never_writes_a_key_stored_elsewhere(tmp_path):
    path = tmp_path / "s.lmdb"
    write(path, range(2))
    with ActivationStore(path, writable=True, shard="rank0") as writer:
        with pytest.raises(StoreError, match=r"shard rank0 is being written by pid \d+ on "):
            ActivationStore(path, writable=True, shard="rank0")
        with open_store(path) as reader:
            assert [s["writing"] for s in reader.shards()] == [True]
        with pytest.raises(StoreError, match="exists already in the root environment"):
            writer.put(*sample(1))
        writer.put(*sample(2))
    with open_store(path) as reader:
        assert [s["writing"] for s in reader.shards()] == [False]
        assert len(reader) == 3
    with pytest.raises(StoreError, match=r"shard name '\.\./x'"):
        ActivationStore(path, writable=True, shard="../x")


def session(path, shard=None, job=None):
    spec = CaptureSpec.from_model_args(
        str(path),
        capture_tokens="prompt",
        capture_shard=None if job is None else f"{job[0]}/{job[1]}",
        capture_topk=0,
        environ={},
    )
    return CaptureSession(spec, [0, 1], "m", backend="test", shard=shard)


def capture(s: CaptureSession, prompts):
    keys, stored = s.plan([SampleRequest(p) for p in prompts])
    for key, prompt, text in zip(keys, prompts, stored, strict=True):
        if text is None:
            acts = np.full((2, 1, 8), len(prompt), dtype=np.float16)
            captured = CapturedSample([1], [2], np.arange(1, dtype=np.int32), acts)
            s.write(key, SampleRequest(prompt), f"answer to {prompt}", captured)
    s.finish()
    return keys, stored


def test_resume_sees_every_shard_also_with_another_number_of_processes(tmp_path):
    path = tmp_path / "s.lmdb"
    prompts = [f"question {i}" for i in range(12)] + ["question 0"]  # a repeated prompt
    for rank in range(2):  # a run of two processes, each with its half; the second was killed
        s = session(path, shard_name(None, rank, 2))
        capture(s, prompts[rank::2] if rank == 0 else prompts[1:6:2])
        s.close()
    with open_store(path) as store:
        assert [(x["name"], x["records"]) for x in store.shards()] == [("rank0", 7), ("rank1", 3)]
    s = session(path, shard_name(None, 2, 3))  # run again with three processes: rank 2 of 3
    keys, stored = capture(s, prompts)
    s.close()
    assert keys == [record_key(p) for p in prompts[:12]] + [record_key("question 0", 1)]
    captured_before = {record_key(p) for p in prompts[0:12:2] + prompts[1:6:2]}
    captured_before.add(record_key("question 0", 1))  # rank 0's own second "question 0"
    assert {k for k, text in zip(keys, stored, strict=True) if text is not None} == (
        captured_before
    )
    with open_store(path) as store:
        assert store.conflicts() == {}
        assert len(store) == 13
        assert [(x["name"], x["records"]) for x in store.shards()] == [
            ("rank0", 7),
            ("rank1", 3),
            ("rank2", 3),
        ]
        assert json.loads((path / "shards" / "rank2" / "complete.json").read_text())["records"] == 3


def test_job_shares_are_a_partition_every_job_computes_alike(tmp_path):
    prompts = [f"prompt {i % 40}" for i in range(100)]  # repeats: suffixed keys
    keys = occurrence_keys(prompts)
    assert len(set(keys)) == 100
    by_hand = [int(hashlib.sha256(k.encode()).hexdigest()[:16], 16) % 3 for k in keys]
    assert [share_of(k, 3) for k in keys] == by_hand
    assert all(by_hand.count(j) > 20 for j in range(3))  # roughly even
    assert shard_name((2, 3), 0, 1) == "job2" and shard_name((2, 3), 1, 4) == "job2-rank1"
    assert shard_name(None, 0, 1) is None and shard_name(None, 3, 4) == "rank3"
    for bad in ("3/3", "1", "-1/2", "a/b"):
        with pytest.raises(CaptureConfigError, match="capture_shard="):
            CaptureSpec.from_model_args("p", capture_shard=bad, environ={})
    spec = CaptureSpec.from_model_args("p", environ={"HALLULENS_CAPTURE_SHARD": "1/4"})
    assert spec.shard == (1, 4)


def test_labels_of_a_store_of_shards_go_to_its_root_environment(tmp_path):
    path = tmp_path / "s.lmdb"
    write(path, range(3), shard="rank0")
    write(path, range(3, 5), shard="rank1")
    with ActivationStore(path, writable=True, create=False) as store:
        store.put_labels({sample(4)[0]: {"label": "correct"}})
        with pytest.raises(StoreError, match="no record nope to label"):
            store.put_labels({"nope": {"label": "correct"}})
    assert (path / "data.mdb").is_file()
    with open_store(path) as store:
        assert store.labels() == {sample(4)[0]: {"label": "correct"}}
        assert len(store) == 5


def _keys_on_rank(rank: int, world: int, init: str, requests: list, out: str) -> None:
    """One rank of `test_keys_are_numbered_over_every_rank` (a spawned process)."""
    import torch.distributed as dist

    from hallulens_models.capture_mixin import _keys_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        keys = _keys_over_ranks(requests[rank])
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(keys, f)


def test_keys_are_numbered_over_every_rank_as_one_process_would(tmp_path):
    """A prompt in documents of two ranks gets the -1, -2 suffixes one process would give it
    (numbering per rank would give both the bare key: a conflict across shards)."""
    import torch.multiprocessing as mp
    from lm_eval.api.instance import Instance

    prompts = {"t1": ["a", "b", "a", "c", "b", "a"], "t2": ["b", "d", "a"]}
    repeats = {("t1", 1): 2}  # doc 1 of t1 sampled twice
    order, by_rank = [], [[], []]  # ((task, doc, sample), prompt) as one process has them
    for task, docs in prompts.items():
        for doc_id, prompt in enumerate(docs):
            n = repeats.get((task, doc_id), 1)
            request = Instance("generate_until", {}, (prompt, {}), 0, (task, doc_id, n))
            order += [((task, doc_id, k), prompt) for k in range(n)]
            by_rank[doc_id % 2] += [request] * n  # the harness's split: doc i on rank i % 2
    keys = occurrence_keys(p for _, p in order)
    expected = dict(zip([place for place, _ in order], keys, strict=True))
    assert expected[("t2", 2, 0)] == record_key("a", 3)  # fourth "a" of the run, on rank 0
    mp.spawn(
        _keys_on_rank,
        args=(2, str(tmp_path / "init"), by_rank, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        seen: dict = {}
        wanted = []
        for request in by_rank[rank]:
            place = (request.task_name, request.doc_id)
            seen[place] = seen.get(place, -1) + 1
            wanted.append(expected[(*place, seen[place])])
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == wanted


def test_the_harness_padding_copies_are_answered_not_captured():
    """Under several ranks the harness evens out request counts by repeating the last
    Instance (`repeats` times per copy); those copies get the originals' answers."""
    from lm_eval.api.instance import Instance

    from hallulens_models.capture_mixin import _without_padding

    a = Instance("generate_until", {}, ("a", {}), 0, ("t", 0, 1))
    b = Instance("generate_until", {}, ("b", {}), 0, ("t", 1, 2))
    real, copies = _without_padding([a, b, b, b, b, b, b])  # b's 2 samples, then 2 pads of 2
    assert real == [0, 1, 2]
    assert copies == {3: 1, 4: 2, 5: 1, 6: 2}


def test_a_writer_sees_a_shard_once_it_is_ready_and_a_reader_refuses_a_broken_one(tmp_path):
    """Another process may be creating its shard (its data file there, the store's databases not
    yet committed) while a writer refreshes: the writer leaves it for a later refresh; a reader
    opening the store names it."""
    path = tmp_path / "s"
    with ActivationStore(path, writable=True) as store:
        key, value = sample(0)
        store.put(key, value)
        half = path / "shards" / "rank1"
        half.mkdir(parents=True)
        lmdb.open(str(half)).close()  # an LMDB environment without the store's databases
        store.refresh()
        assert [s["name"] for s in store.shards()] == []
        assert key in store
        with pytest.raises(StoreError, match="rank1 is an LMDB environment but not an activation"):
            open_store(path)
        shutil.rmtree(half)
        with ActivationStore(path, writable=True, shard="rank1") as other:
            other.put(*sample(1))
        store.refresh()
        assert [s["name"] for s in store.shards()] == ["rank1"]
        assert sample(1)[0] in store
