"""The LMDB store: round trip, map growth, no silent overwrite, readers beside a writer."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_worker import sample

from hallulens_capture import open_store
from hallulens_capture.errors import StoreError
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
spec = CaptureSpec.from_model_args({path!r}, capture_tokens="prompt", map_size_gb=1 / 1024)
session = CaptureSession(spec, [0, 1], "m", backend="test")
queued = 0
try:
    for i in range(100):
        acts = np.full((2, 48, 1024), i, dtype=np.float16)
        sample = CapturedSample(None, list(range(48)), [1], np.arange(48, dtype=np.int32), acts)
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
    assert 5 < int(written) <= int(queued) < 100
    with open_store(path) as store:
        assert len(store) == int(written)
        for key in store:
            i = int(key[1:])
            assert store[key].response == f"r{i}"
            assert np.all(store[key].all_layers_activations == i)
