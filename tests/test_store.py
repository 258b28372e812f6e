"""The LMDB store: round trip, map growth, no silent overwrite, readers beside a writer; and
what a damaged store, an odd key, a huge map or a mixed store do to it."""

import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from store_worker import sample

from hallulens_capture import open_store, record_key
from hallulens_capture.errors import CaptureConfigError, RecordFormatError, StoreError
from hallulens_capture.lmdbfile import check_data_file, read_meta
from hallulens_capture.report import verify
from hallulens_capture.session import (
    ENV_QUEUE_MB,
    ENV_WRITERS,
    CapturedSample,
    CaptureSession,
    SampleRequest,
    queue_bytes,
    writer_count,
)
from hallulens_capture.spec import CaptureSpec
from hallulens_capture.store import ActivationStore

WORKER = Path(__file__).with_name("store_worker.py")


def test_round_trip_and_growth_from_a_tiny_map(tmp_path):
    path = tmp_path / "s.lmdb"
    with ActivationStore(path, writable=True, map_size_gb=1 / 1024) as store:
        start = store.map_size()
        for i in range(40):  # 40 x ~200 KB into a 1 MiB map
            store.put(*sample(i))
        grown = store.map_size()
        assert store.usage()["used_bytes"] > 40 * 200_000
    assert start == 1 << 20 and grown > 8 << 20
    with open_store(path) as store:
        assert len(store) == 40
        for i in range(40):
            key, _ = sample(i)
            assert key in store
            record = store[key]
            assert record.response == f"r{i}"
            assert np.all(record.all_layers_activations == i)


def test_existing_records_are_never_overwritten(tmp_path):
    key, value = sample(1)
    with ActivationStore(tmp_path / "s", writable=True) as store:
        store.put(key, value)
        with pytest.raises(StoreError, match="exists already"):
            store.put(key, sample(2)[1])
        assert store[key].response == "r1"


def test_reader_and_writer_share_one_environment_in_a_process(tmp_path):
    with ActivationStore(tmp_path / "s", writable=True) as writer:
        writer.put(*sample(3))
        with open_store(tmp_path / "s") as reader:
            assert len(reader) == 1
            writer.put(*sample(4))
            assert len(reader) == 1  # snapshot
            reader.refresh()
            assert len(reader) == 2


def test_opening_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no activation store at"):
        open_store(tmp_path / "missing")
    import lmdb

    lmdb.open(str(tmp_path / "plain")).close()
    with pytest.raises(StoreError, match="not an activation store"):
        open_store(tmp_path / "plain")


def test_readers_in_other_processes_while_one_writes(tmp_path):
    path, n = str(tmp_path / "shared.lmdb"), 60
    run = [sys.executable, str(WORKER)]
    readers = [
        subprocess.Popen([*run, "read", path, str(n)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    writer = subprocess.run(
        [*run, "write", path, str(n)], capture_output=True, text=True, timeout=300
    )
    assert writer.returncode == 0, writer.stderr
    for reader in readers:
        out, _ = reader.communicate(timeout=300)
        assert reader.returncode == 0
        report = json.loads(out)
        assert report["problems"] == []
        assert report["checked"] == n
        assert report["counts"][-1] == n
        assert any(0 < c < n for c in report["counts"]), "reader never saw the store mid-write"


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from store_worker import sample
from hallulens_capture.store import ActivationStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
with ActivationStore({path!r}, writable=True, map_size_gb=1 / 1024) as store:
    for i in range(100):
        store.put(*sample(i))
"""


def test_a_full_disk_stops_with_one_line_and_keeps_what_was_written(tmp_path):
    path = str(tmp_path / "s.lmdb")
    code = FULL_DISK.format(tests=str(Path(__file__).parent), path=path)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hallulens_capture.errors.StoreError: {path}: could not write record")
    assert last.endswith("records written before are intact")
    with open_store(path) as store:
        assert 5 < len(store) < 100
        for key in store:
            i = int(store[key].prompt.rsplit(" ", 1)[1])
            assert key == sample(i)[0] and np.all(store[key].all_layers_activations == i)


FULL_DISK_SESSION = """
import resource, signal, sys
import numpy as np
from hallulens_capture.errors import StoreError
from hallulens_capture.session import CapturedSample, CaptureSession, SampleRequest
from hallulens_capture.spec import CaptureSpec
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))
spec = CaptureSpec.from_model_args(
    {path!r}, capture_tokens="prompt", map_size_gb=1 / 1024, capture_topk=0
)
session = CaptureSession(spec, [0, 1], "m", backend="test")
queued = 0
try:
    for i in range(100):
        acts = np.full((2, 48, 1024), i, dtype=np.float16)
        sample = CapturedSample(list(range(48)), [1], np.arange(48, dtype=np.int32), acts)
        session.write(f"k{{i:03d}}", SampleRequest(f"prompt {{i}}"), f"r{{i}}", sample)
        queued += 1
    session.flush()
except StoreError as exc:
    print(queued, session.written, exc, file=sys.stderr)
    sys.exit(3)
"""


def test_a_full_disk_reaches_the_caller_of_the_background_writer(tmp_path):
    """The session writes on its own thread; the failure still stops the run with the store's
    one-line error (at the next write or at flush), and the records before it are intact."""
    path = str(tmp_path / "s.lmdb")
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SESSION.format(path=path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    queued, written, message = result.stderr.strip().splitlines()[-1].split(" ", 2)
    assert message.startswith(f"{path}: could not write record")
    # the writer runs behind the producer: the error reaches it at a later write or at flush
    assert 5 < int(written) <= int(queued) <= 100
    with open_store(path) as store:
        assert len(store) == int(written)
        for key in store:
            i = int(key[1:])
            assert store[key].response == f"r{i}"
            assert np.all(store[key].all_layers_activations == i)


def lmdb_facts(path) -> dict:
    """What py-lmdb itself says about an environment (opened raw, read-only)."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8)
    try:
        info, psize = env.info(), env.stat()["psize"]
    finally:
        env.close()
    return {"txnid": info["last_txnid"], "last_pgno": info["last_pgno"], "page_size": psize}


def test_meta_pages_read_by_hand_agree_with_lmdb(tmp_path):
    """Stores written by py-lmdb: through the store (map grown several times) and raw, after an
    odd and an even number of commits (so each of the two meta pages is the current one)."""
    import lmdb

    written = tmp_path / "store"
    with ActivationStore(written, writable=True, map_size_gb=1 / 1024) as store:
        for i in range(12):
            store.put(*sample(i))
    raw = tmp_path / "raw"
    txnids = []
    for commits in (5, 1):
        env = lmdb.open(str(raw), map_size=1 << 24)
        for i in range(commits):
            with env.begin(write=True) as txn:
                txn.put(f"k{i}-{commits}".encode(), bytes(5000 * (i + 1)))
        env.close()
        facts = lmdb_facts(raw)
        assert vars(read_meta(str(raw / "data.mdb"))) == facts
        txnids.append(facts["txnid"])
    assert txnids == [5, 6]  # meta page 1, then meta page 0 is the current one
    facts = lmdb_facts(written)
    meta = read_meta(str(written / "data.mdb"))
    assert vars(meta) == facts and facts["txnid"] > 12
    size = (written / "data.mdb").stat().st_size
    assert meta.needed_bytes == (facts["last_pgno"] + 1) * facts["page_size"] <= size
    check_data_file(str(written / "data.mdb"))


OPEN_TRUNCATED = """
import sys
from hallulens_capture.errors import StoreError
from hallulens_capture.store import ActivationStore
try:
    with ActivationStore(sys.argv[1], writable=sys.argv[2] == "write") as store:
        print(sum(store[key].nbytes for key in store))
except StoreError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.parametrize("keep", ["half", 5000, 4200, 100])
def test_a_truncated_store_is_refused_by_readers_and_the_writer(tmp_path, keep):
    """Before: SIGBUS ("Bus error", exit 135) in `verify` and in the resuming writer. Each
    open runs in its own process, so a bus error would show as a signal, not kill pytest."""
    path = tmp_path / "s.lmdb"
    with ActivationStore(path, writable=True) as store:
        for i in range(20):
            store.put(*sample(i))
    facts = lmdb_facts(path)
    data = path / "data.mdb"
    size = data.stat().st_size // 2 if keep == "half" else keep
    os.truncate(data, size)
    before = data.read_bytes()
    needed = (facts["last_pgno"] + 1) * facts["page_size"]
    for mode in ("read", "write"):
        result = subprocess.run(
            [sys.executable, "-c", OPEN_TRUNCATED, str(path), mode],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
        message = result.stderr.strip()
        assert "\n" not in message and message.startswith(f"{data} is {size} bytes")
        if keep in ("half", 5000):
            assert f"needs {needed} bytes: the store was truncated" in message
        else:  # not even both meta pages are left
            assert "too short for LMDB's" in message
    verify = run_cli("hallulens", "activations", "verify", str(path), timeout=120)
    assert verify.returncode == 1 and verify.stderr.startswith("hallulens: error: ")
    assert len(verify.stderr.strip().splitlines()) == 1 and str(data) in verify.stderr
    assert data.read_bytes() == before  # nothing was written to the damaged file


def filled_store(path, n):
    with ActivationStore(path, writable=True) as store:
        for i in range(n):
            store.put(*sample(i))
    return path


def test_a_huge_map_is_refused_naming_the_option_and_leaves_nothing(tmp_path):
    new = tmp_path / "runs" / "a" / "s.lmdb"
    with pytest.raises(StoreError) as info:
        ActivationStore(new, writable=True, map_size_gb=1e9)
    assert "map_size_gb=1e+09" in str(info.value) and "smaller map_size_gb" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    existing = filled_store(tmp_path / "kept.lmdb", 2)
    data = (existing / "data.mdb").read_bytes()
    with pytest.raises(StoreError, match="map_size_gb=1e\\+09"):
        ActivationStore(existing, writable=True, map_size_gb=1e9)
    assert sorted(p.name for p in existing.iterdir()) == ["data.mdb", "lock.mdb"]
    assert (existing / "data.mdb").read_bytes() == data
    with open_store(existing) as store:
        assert len(store) == 2


def test_keys_lmdb_cannot_hold_are_absent_and_undecodable_keys_are_bad_records(tmp_path):
    import lmdb

    path = filled_store(tmp_path / "s.lmdb", 1)
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"\xff\xfe" + b"0" * 62, bytes(sample(5)[1]), db=env.open_db(b"records", txn=txn))
    env.close()
    with open_store(path) as store:
        for key in ("", "x" * 600):
            assert key not in store
            with pytest.raises(KeyError):
                store[key]
        keys = list(store)
        assert len(keys) == 2
        odd = next(k for k in keys if k != sample(0)[0])
        assert odd in store
        with pytest.raises(RecordFormatError, match=r"^record b'\\xff\\xfe0+': key is not UTF-8$"):
            store[odd]
        bad = verify(store).bad
    assert list(bad.values()) == [["key is not UTF-8"]]


def test_writing_labels_needs_an_existing_store(tmp_path):
    """`hallulens activations label --store TYPO` used to create an empty store, print
    {"labelled": 0, "unmatched": N} and exit 0."""
    samples = tmp_path / "samples_precise_wikiqa_2026-01-01T00-00-00.000000.jsonl"
    rows = [
        {
            "doc_id": i,
            "doc": {"prompt": f"q{i}"},
            "arguments": {"gen_args_0": {"arg_0": f"q{i}", "arg_1": {}}},
            "resps": [["a"]],
            "filtered_resps": [json.dumps({"label": "correct"})],
        }
        for i in range(3)
    ]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    typo = tmp_path / "runs" / "activatons.lmdb"
    result = run_cli(
        "hallulens", "activations", "label", "--samples", str(samples), "--store", str(typo)
    )
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == f"hallulens: error: no activation store at {typo} (no data.mdb)"
    assert not (tmp_path / "runs").exists()
    import lmdb

    plain = tmp_path / "plain"
    env = lmdb.open(str(plain))
    with env.begin(write=True) as txn:
        txn.put(b"other", b"data")
    env.close()
    result = run_cli(
        "hallulens", "activations", "label", "--samples", str(samples), "--store", str(plain)
    )
    assert result.returncode == 1 and "not an activation store" in result.stderr
    env = lmdb.open(str(plain), readonly=True)
    with env.begin() as txn:
        assert [bytes(k) for k in txn.cursor().iternext(values=False)] == [b"other"]
    env.close()


def session_write(path, model, backend, n, caplog, run=0):
    """Capture run `run` of `n` one-token prompts; returns the warnings it logged."""
    spec = CaptureSpec.from_model_args(
        str(path), capture_tokens="prompt", capture_topk=0, environ={}
    )
    session = CaptureSession(spec, [0, 1], model, backend=backend)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hallulens_capture.session"):
        for i in range(n):
            acts = np.full((2, 1, 8), i, dtype=np.float16)
            captured = CapturedSample([i], [1], np.arange(1, dtype=np.int32), acts)
            request = SampleRequest(f"{model} run {run} prompt {i}")
            session.write(record_key(request.prompt), request, "r", captured)
        session.close()
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


HOLD_WRITE_LOCK = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=8)
with env.begin(write=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_the_writer_queue_holds_at_most_its_bytes(tmp_path, monkeypatch):
    """Records wait for the writer thread in a queue bounded in bytes: with the writer stopped
    (another process holds the store's write lock), a producer gets no further than the bound."""
    monkeypatch.setenv(ENV_QUEUE_MB, "1")
    spec = CaptureSpec.from_model_args(
        str(tmp_path / "s"), capture_tokens="prompt", capture_topk=0, environ={}
    )
    session = CaptureSession(spec, [0, 1], "m", backend="test")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(tmp_path / "s")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    queued = []

    def produce() -> None:
        for i in range(5):
            acts = np.full((2, 100, 1024), i, dtype=np.float16)  # 400 KiB: two fit in 1 MiB
            captured = CapturedSample([i] * 100, [1], np.arange(100, dtype=np.int32), acts)
            request = SampleRequest(f"prompt {i}")
            session.write(record_key(request.prompt), request, "r", captured)
            queued.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    for _ in range(300):
        if len(queued) >= 2:
            break
        time.sleep(0.1)
    time.sleep(0.5)  # time enough for a third write, were there room
    assert queued == [0, 1]
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    producer.join(timeout=60)
    session.close()
    assert queued == [0, 1, 2, 3, 4]
    with open_store(tmp_path / "s") as store:
        assert sorted(store) == sorted(record_key(f"prompt {i}") for i in range(5))
        assert np.all(store[record_key("prompt 4")].all_layers_activations == 4)


def test_several_writer_threads_each_write_a_shard_and_every_record_is_found(tmp_path, monkeypatch):
    """HALLULENS_CAPTURE_WRITERS=3: records spread over the root environment and shards w1, w2
    (each key in one), read back as one store, seen by a later plan of the same session (a
    second task) and by a later run with one writer."""
    monkeypatch.setenv(ENV_WRITERS, "3")
    spec = CaptureSpec.from_model_args(
        str(tmp_path / "s"), capture_tokens="prompt", capture_topk=0, environ={}
    )
    session = CaptureSession(spec, [0, 1], "m", backend="test")
    assert session.info()["capture_writers"] == 3  # in the harness results' config and log
    requests = [SampleRequest(f"prompt {i}") for i in range(24)]
    keys, stored = session.plan(requests)
    assert stored == [None] * 24
    for i, (key, request) in enumerate(zip(keys, requests, strict=True)):
        acts = np.full((2, 3, 8), i, dtype=np.float16)
        captured = CapturedSample([i, i, i], [1], np.arange(3, dtype=np.int32), acts)
        session.write(key, request, f"r{i}", captured)
    session.flush()
    assert session.plan(requests)[1] == [f"r{i}" for i in range(24)]
    session.finish()
    session.close()
    assert session.written == 24
    with open_store(tmp_path / "s") as store:
        shards = store.shards()
        assert [shard["name"] for shard in shards] == ["w1", "w2"]
        assert all(shard["records"] > 0 for shard in shards)
        assert all(s["complete"]["written_by_last_run"] == s["records"] for s in shards)
        assert sum(shard["records"] for shard in shards) < 24  # the root holds the rest
        assert sorted(store) == sorted(keys) and store.conflicts() == {}
        for i, key in enumerate(keys):
            assert store[key].response == f"r{i}"
            assert np.all(store[key].all_layers_activations == i)
    for writers in ("3", "1"):  # a later run, with as many writers or one
        monkeypatch.setenv(ENV_WRITERS, writers)
        again = CaptureSession(spec, [0, 1], "m", backend="test")
        assert again.plan(requests)[1] == [f"r{i}" for i in range(24)]
        again.close()
    for bad in ("0", "x", "17"):
        monkeypatch.setenv(ENV_WRITERS, bad)
        with pytest.raises(CaptureConfigError, match=f"HALLULENS_CAPTURE_WRITERS='{bad}'"):
            CaptureSession(spec, [0, 1], "m", backend="test")


def test_writers_start_the_write_out_as_records_come(tmp_path, monkeypatch):
    """Every record starts the kernel's write-out of its writer's file (WRITEBACK_BYTES=1),
    the root environment's and the shards': the records stay whole and the call is accepted."""
    from hallulens_capture import store as store_module

    monkeypatch.setattr(store_module, "WRITEBACK_BYTES", 1)
    monkeypatch.setenv(ENV_WRITERS, "2")
    spec = CaptureSpec.from_model_args(
        str(tmp_path / "s"), capture_tokens="prompt", capture_topk=0, environ={}
    )
    session = CaptureSession(spec, [0, 1], "m", backend="test")
    requests = [SampleRequest(f"prompt {i}") for i in range(8)]
    keys, _ = session.plan(requests)
    for i, (key, request) in enumerate(zip(keys, requests, strict=True)):
        acts = np.full((2, 3, 8), i, dtype=np.float16)
        session.write(key, request, f"r{i}", CapturedSample([i, i, i], [1], np.arange(3), acts))
    session.flush()
    assert [writer.store.start_writeback() for writer in session._writers] == [True, True]
    assert all(writer.store._writer().unwritten_bytes == 0 for writer in session._writers)
    session.close()
    with open_store(tmp_path / "s") as store:
        assert len(store.shards()) == 1  # w1, beside the root environment
        for i, key in enumerate(keys):
            assert store[key].response == f"r{i}"
            assert np.all(store[key].all_layers_activations == i)


def test_a_second_session_of_the_process_passes_over_the_writer_shards_of_the_first(
    tmp_path, monkeypatch
):
    """An earlier session on the same store still open in this process (a notebook's rerun)
    holds shards w1, w2: a second one with three writers takes w3, w4, and every record of
    both is found."""
    monkeypatch.setenv(ENV_WRITERS, "3")
    spec = CaptureSpec.from_model_args(
        str(tmp_path / "s"), capture_tokens="prompt", capture_topk=0, environ={}
    )
    sessions = [CaptureSession(spec, [0, 1], "m", backend="test") for _ in range(2)]
    assert sessions[1].info()["capture_writers"] == 3
    requests = [SampleRequest(f"prompt {i}") for i in range(12)]
    for n, session in enumerate(sessions):
        part = requests[n * 6 : n * 6 + 6]
        keys, stored = session.plan(part)
        assert stored == [None] * 6
        for key, request in zip(keys, part, strict=True):
            acts = np.full((2, 3, 8), int(request.prompt.split()[1]), dtype=np.float16)
            session.write(key, request, "r", CapturedSample([1, 2, 3], [1], np.arange(3), acts))
        session.finish()
    for session in sessions:
        session.close()
    with open_store(tmp_path / "s") as store:
        assert sorted(s["name"] for s in store.shards()) == ["w1", "w2", "w3", "w4"]
        assert len(store) == 12
        for request in requests:
            record = store[record_key(request.prompt)]
            assert np.all(record.all_layers_activations == int(request.prompt.split()[1]))


def test_writer_shards_another_process_holds_are_not_passed_over(tmp_path, monkeypatch):
    """Two processes writing one store's writer shards is two runs on one store at once: the
    second is stopped, as before, naming the holder."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from hallulens_capture.store import ActivationStore; "
            f"s = ActivationStore({str(tmp_path / 's')!r}, writable=True, shard='w1'); "
            "print('ready', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        monkeypatch.setenv(ENV_WRITERS, "3")
        spec = CaptureSpec.from_model_args(
            str(tmp_path / "s"), capture_tokens="prompt", capture_topk=0, environ={}
        )
        with pytest.raises(StoreError, match=rf"shard w1 is being written by pid {holder.pid} "):
            CaptureSession(spec, [0, 1], "m", backend="test")
    finally:
        holder.communicate("")


def test_a_failed_write_out_hint_never_fails_the_record_it_follows(tmp_path, monkeypatch):
    """No descriptor left for the hint's file (RLIMIT_NOFILE at the lowest free one): the
    records are written and stored whole."""
    from hallulens_capture import store as store_module

    monkeypatch.setattr(store_module, "WRITEBACK_BYTES", 1)
    written = random_records(4)
    with ActivationStore(tmp_path / "s", writable=True) as store:
        lowest_free = os.open(os.devnull, os.O_RDONLY)  # POSIX: the lowest free number
        os.close(lowest_free)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            with pytest.raises(OSError):
                os.open(os.devnull, os.O_RDONLY)  # the limit bites
            for key, (_, value) in written.items():
                store.put(key, value)
            assert not store.start_writeback()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert store.start_writeback()  # with descriptors again
    with open_store(tmp_path / "s") as store:
        for key, (acts, _) in written.items():
            np.testing.assert_array_equal(store[key].all_layers_activations, acts)


def test_the_default_writer_count_follows_the_cores(monkeypatch):
    monkeypatch.delenv(ENV_WRITERS, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, expected in ((1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (64, 4)):
        assert writer_count(cpus) == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on a 16-core node: 2 writers each
    assert writer_count(16) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert writer_count(16) == 1
    monkeypatch.setenv(ENV_WRITERS, "3")  # the setting wins
    assert writer_count(64) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv(ENV_WRITERS)
    with open("/proc/self/status") as f:  # this process's own cores, read independently
        allowed = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
    count = sum(
        int(b) - int(a) + 1 if "-" in part else 1
        for part in allowed.split(",")
        for a, _, b in [part.partition("-")]
    )
    assert writer_count() == min(max(count // 4, 1), 4)


def test_the_writer_queue_size_setting(monkeypatch):
    monkeypatch.delenv(ENV_QUEUE_MB, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024  # MemTotal
    assert queue_bytes() == min(max(total // 8, 256 << 20), 8 << 30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes of one node share the eighth
    assert queue_bytes() == min(max(total // 64, 256 << 20), 8 << 30)
    monkeypatch.setenv(ENV_QUEUE_MB, "64")
    assert queue_bytes() == 64 << 20
    for bad in ("0", "lots", "1.5"):
        monkeypatch.setenv(ENV_QUEUE_MB, bad)
        with pytest.raises(CaptureConfigError, match=f"HALLULENS_CAPTURE_QUEUE_MB='{bad}'"):
            queue_bytes()


def test_a_run_adding_a_second_kind_of_record_warns_once(tmp_path, caplog):
    path = tmp_path / "s.lmdb"
    assert session_write(path, "model-a", "hf", 2, caplog) == []
    assert session_write(path, "model-a", "hf", 2, caplog, run=1) == []  # same kind: silent
    warnings = session_write(path, "model-b", "gguf", 3, caplog)
    assert len(warnings) == 1
    assert "holds records made with model='model-a' (now 'model-b'); backend='hf'" in warnings[0]
    assert "second kind of record" in warnings[0]
    with open_store(path) as store:
        assert len(store) == 7


def random_records(n: int, dtype: str = "F16", layers=(0, 4, 9), tokens=(5, 9)):
    """n records of random activations (token counts between `tokens`), kept for comparison."""
    from hallulens_capture.record import STORAGE_DTYPES, encode_record

    rng = np.random.default_rng(7)
    out = {}
    for i in range(n):
        count = int(rng.integers(*tokens))
        acts = rng.standard_normal((len(layers), count, 16)).astype(np.float32)
        if dtype == "BF16":
            acts = (acts.view(np.uint32) >> 16).astype(np.uint16)
        else:
            acts = acts.astype(STORAGE_DTYPES[dtype])
        index = {
            "layer_ids": list(layers),
            "token_positions": np.arange(count),
            "prompt_token_ids": np.arange(count),
            "generated_token_ids": [1],
        }
        meta = {"prompt": f"p{i} " + "é" * i, "response": "r", "capture_tokens": "prompt"}
        out[record_key(meta["prompt"])] = (acts, encode_record(acts, dtype, index, meta).tobytes())
    return out


def test_read_many_equals_slicing_the_arrays_that_were_written(tmp_path):
    written = random_records(40)
    keys = list(written)[::-1]
    with ActivationStore(tmp_path / "s", writable=True) as store:
        for key, (_, value) in written.items():
            store.put(key, value)
        by_writer = store.read_many(keys, layers=9, tokens=slice(0, 5))  # from each record
    with open_store(tmp_path / "s") as store:
        got = store.read_many(keys, layers=9, tokens=slice(0, 5))
        assert got.shape == (40, 1, 5, 16) and got.dtype == np.float16
        for i, key in enumerate(keys):
            np.testing.assert_array_equal(got[i, 0], written[key][0][2, :5])
        np.testing.assert_array_equal(got, by_writer)
        last = store.read_many(keys, layers=[9, 0], tokens=[-1])  # again: layouts kept
        for i, key in enumerate(keys):
            np.testing.assert_array_equal(last[i], written[key][0][[2, 0]][:, [-1]])
        with pytest.raises(
            StoreError, match=r"another number of tokens in the selection, unlike the first"
        ):
            store.read_many(keys, layers=0)  # all tokens: counts differ between records
        with pytest.raises(KeyError, match=r"has no layer\(s\) \[5\]"):
            store.read_many(keys, layers=5, tokens=[0])
        with pytest.raises(KeyError):
            store.read_many(["nope"], layers=0)


def test_read_many_of_records_lying_an_equal_step_apart(tmp_path):
    """Records of one size written in sequence lie an equal step apart in LMDB's file (read in
    strided runs): any order, a key twice, several layers and tokens, two shards."""
    written = random_records(36, layers=(0, 4, 9, 12), tokens=(80, 81))  # 10 KB: own pages
    keys = list(written)
    for r in range(2):
        with ActivationStore(tmp_path / "s", writable=True, shard=f"rank{r}") as store:
            for key in keys[r::2]:
                store.put(key, written[key][1])
    order = [*np.random.default_rng(3).permutation(keys).tolist(), keys[5]]
    with open_store(tmp_path / "s") as store:
        got = store.read_many(order, layers=[12, 4], tokens=slice(3, 70))
        picked = store.read_many(order, layers=0, tokens=[79, 0, 40])
    for i, key in enumerate(order):
        np.testing.assert_array_equal(got[i], written[key][0][[3, 1], 3:70])
        np.testing.assert_array_equal(picked[i, 0], written[key][0][0, [79, 0, 40]])


def test_read_many_of_bfloat16_returns_float32(tmp_path):
    written = random_records(5, "BF16")
    with ActivationStore(tmp_path / "s", writable=True) as store:
        for key, (_, value) in written.items():
            store.put(key, value)
    with open_store(tmp_path / "s") as store:
        got = store.read_many(list(written), layers=4, tokens=slice(1, 3))
    assert got.dtype == np.float32
    for i, (bits, _) in enumerate(written.values()):
        expected = (bits[1, 1:3].astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(got[i, 0], expected)


def test_record_places_found_in_the_file_equal_what_lmdb_returns(tmp_path):
    """Readers find each record's bytes in data.mdb themselves (py-lmdb would touch every page
    of a value it returns); the places must hold exactly what LMDB itself returns."""
    import lmdb

    from hallulens_capture.lmdbfile import value_spans
    from hallulens_capture.record import Record, _writer_layout, activation_layout

    written = random_records(60, tokens=(0, 4))  # records of zero tokens are small, in-page
    path = tmp_path / "s"
    with ActivationStore(path, writable=True) as store:
        for key, (_, value) in written.items():
            store.put(key, value)
        store.put(*sample(1))  # a large record too
    env = lmdb.open(str(path), readonly=True, max_dbs=8)
    with env.begin() as txn, open(path / "data.mdb", "rb") as f:
        import mmap

        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        spans = value_spans(data, txn.id(), b"records")
        db = env.open_db(b"records", txn=txn, create=False)
        expected = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
        assert {k: bytes(data[a : a + n]) for k, (a, n) in spans.items()} == expected
    env.close()
    for key, value in expected.items():
        record = Record(key.decode(), value)
        fast = _writer_layout(memoryview(value))
        assert fast is not None and fast == activation_layout(key.decode(), memoryview(value))
        assert fast.shape == record.shape and fast.label == record.storage_dtype
        assert fast.layer_ids == record.layer_ids.tobytes()


def test_a_header_with_tensor_entries_nested_elsewhere_is_parsed_in_full():
    """The quick header read takes only the tensor entries that end the header; a crafted header
    with entries nested in another object after them is parsed in full (and refused)."""
    import crafted

    from hallulens_capture.record import _writer_layout, activation_layout

    entry = {"dtype": "F16", "shape": [1, 1, 1], "data_offsets": [0, 2]}
    nested = {"a": entry, "all_layers_activations": entry, "layer_ids": entry}
    fake = crafted.edited(crafted.set_path(("zzz",), nested))  # after the real entries
    assert _writer_layout(memoryview(fake)) is None
    with pytest.raises(RecordFormatError):
        activation_layout(crafted.key_of("crafted prompt"), memoryview(fake))
