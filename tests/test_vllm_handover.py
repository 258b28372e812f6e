"""vLLM hand-over files: what the worker writes is what the front end reads, a file is reused
only once the front end holds no view of it, the pool stays bounded, a killed worker's files go."""

from __future__ import annotations

import fcntl
import gc
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from hallulens_models import vllm_handover as handover

LAYERS, HIDDEN, TOPK = 3, 8, 2
F16 = np.dtype(np.float16)


@pytest.fixture
def pool(tmp_path):
    return handover.HandoverPool(str(tmp_path))


def written(pool, capacity: int, first: int, rows: dict[int, np.ndarray], stats: np.ndarray):
    """A request's file as the worker leaves it at collect time, and the item it hands over."""
    file = pool.open([capacity, LAYERS, HIDDEN], F16, first)
    for at, block in rows.items():  # token-major runs, [k, layers, hidden]
        file.write(at, np.ascontiguousarray(block))
    file.write(capacity, stats)
    file.close()
    at = min(rows)
    count = sum(len(block) for block in rows.values())
    return file.path, {
        "tag": "t",
        "path": file.path,
        "shape": file.shape,
        "rows": [at, count],
        "stats": [file.stats_offset, len(stats)],
    }


def free_files(pool) -> list[str]:
    return sorted(e.name for e in os.scandir(pool.directory) if e.name.startswith(handover.FREE))


def test_front_end_reads_what_the_worker_wrote(pool):
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((k, LAYERS, HIDDEN)).astype(F16) for k in (5, 1, 1)]
    stats = rng.standard_normal((3, 2 + 2 * TOPK)).astype(np.float32)
    # a prefill of 5 rows from row 2 on, then two decode steps
    _, item = written(pool, 16, 100, {2: steps[0], 7: steps[1], 8: steps[2]}, stats)
    rows, got_stats = handover.read(item, F16, TOPK)
    expected = np.concatenate(steps).transpose(1, 0, 2)  # [layers, rows, hidden]
    assert rows.shape == (LAYERS, 7, HIDDEN)
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(got_stats, stats)
    assert handover.read(item, F16, 0)[1] is None  # capture_topk=0: no statistics
    assert stat.S_IMODE(os.stat(pool.directory).st_mode) == 0o700  # activations: the user's only


def test_a_file_is_reused_only_when_no_view_of_it_is_left(pool):
    block = np.ones((4, LAYERS, HIDDEN), F16)
    path, item = written(pool, 16, 0, {0: block}, np.ones((3, 2), np.float32))
    inode = os.stat(path).st_ino
    rows, _ = handover.read(item, F16, 0)
    layer = rows[1]  # a view the front end still holds (as a record being encoded would)
    del rows
    gc.collect()
    assert free_files(pool) == [] and os.path.exists(path)
    # the worker's next request gets a file of its own, not this one
    other = pool.open([4, LAYERS, HIDDEN], F16, 0)
    other_inode = os.stat(other.path).st_ino
    assert other_inode != inode
    other.discard()
    np.testing.assert_array_equal(layer, 1)
    del layer
    gc.collect()
    assert not os.path.exists(path)
    # now released, cut back to the 4 rows its request wrote (capacity 16, statistics after)
    assert len(free_files(pool)) == 2
    sizes = {e.inode(): e.stat().st_size for e in os.scandir(pool.directory)}
    assert sizes[inode] == 4 * LAYERS * HIDDEN * F16.itemsize
    reused = pool.open([2, LAYERS, HIDDEN], F16, 0)
    assert os.stat(reused.path).st_ino in {inode, other_inode}
    assert len(free_files(pool)) == 1
    reused.write(0, np.full((2, LAYERS, HIDDEN), 7, F16))
    reused.close()
    item = {**item, "path": reused.path, "shape": reused.shape, "rows": [0, 2]}
    rows, _ = handover.read(item, F16, 0)
    np.testing.assert_array_equal(rows, 7)


def test_reuse_keeps_the_pages_and_pool_stays_bounded(pool, tmp_path_factory):
    files = [pool.open([8, LAYERS, HIDDEN], F16, 0) for _ in range(4)]
    inodes = set()
    for file in files:
        file.write(0, np.ones((8, LAYERS, HIDDEN), F16))
        file.filled += 1  # as the worker's _write_rows counts them
        inodes.add(os.stat(file.path).st_ino)
        file.discard()  # the request was dropped: back into the pool
    pool.trim(in_use=4)
    assert len(free_files(pool)) == 4
    taken = pool.open([8, LAYERS, HIDDEN], F16, 0)
    assert os.stat(taken.path).st_ino in inodes  # a released file, not a new one
    assert os.stat(taken.path).st_blocks * 512 >= 8 * LAYERS * HIDDEN * 2  # its pages kept
    taken.discard()
    pool.trim(in_use=1)  # 4 were in use at once before: the pool keeps 4
    assert len(free_files(pool)) == 4
    other = handover.HandoverPool(str(tmp_path_factory.mktemp("other")))
    for _ in range(3):
        other.open([1, LAYERS, HIDDEN], F16, 0).discard()
    other.trim(in_use=1)
    assert len(free_files(other)) == 1
    # a dropped request's file is cut back to the rows written (3 of 8), its statistics none
    partial = other.open([8, LAYERS, HIDDEN], F16, 0)
    partial.write(0, np.ones((3, LAYERS, HIDDEN), F16))
    partial.filled[:3] += 1  # as the worker's _write_rows counts them
    inode = os.stat(partial.path).st_ino
    partial.discard()
    sizes = {e.inode(): e.stat().st_size for e in os.scandir(other.directory)}
    assert sizes[inode] == 3 * LAYERS * HIDDEN * F16.itemsize


def test_a_killed_workers_directory_is_removed_a_live_ones_kept(tmp_path):
    dead = tmp_path / f"{handover.PREFIX}999999"
    dead.mkdir()
    (dead / handover.LOCK).touch()
    (dead / "free-a.bin").write_bytes(b"x" * 4096)
    alive = tmp_path / f"{handover.PREFIX}999998"
    alive.mkdir()
    (alive / handover.LOCK).touch()
    held = os.open(alive / handover.LOCK, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    lockless = tmp_path / f"{handover.PREFIX}999997"  # its removal raced a release
    lockless.mkdir()
    (lockless / "free-b.bin").write_bytes(b"x")
    making = tmp_path / f".{handover.PREFIX}999996-x"  # a pool not yet locked: not its name yet
    making.mkdir()
    (making / handover.LOCK).touch()
    try:
        removed = handover.remove_stale(str(tmp_path))
    finally:
        os.close(held)
    assert sorted(removed) == sorted([str(dead), str(lockless)])
    assert alive.exists() and making.exists()
    # a pool starting up does the same
    pool = handover.HandoverPool(str(tmp_path))
    assert not alive.exists() and os.path.isdir(pool.directory)


def test_a_full_disk_is_an_error_naming_the_file(tmp_path):
    """pwrite past the process's file size limit fails as a full /dev/shm would (a map would
    have killed the worker with SIGBUS)."""
    script = f"""
import resource, signal
import numpy as np
from hallulens_capture.errors import CaptureError
from hallulens_models.vllm_handover import HandoverPool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
pool = HandoverPool({str(tmp_path)!r})
file = pool.open([64, 4, 64], np.dtype(np.float16), 0)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    file.write(0, np.ones((64, 4, 64), np.float16))
except CaptureError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "cannot write captured rows to" in out.stdout and "File too large" in out.stdout
