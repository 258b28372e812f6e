"""malloc's huge pages for large records: the setting, what glibc does with it, the advice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from hallulens_capture import hugepages, open_store, record_key
from hallulens_capture.session import CapturedSample, CaptureSession, SampleRequest
from hallulens_capture.spec import CaptureSpec

PMD_MODE = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/enabled"  # multi-size THP
HONOURED = (
    hugepages.thp_mode() == "madvise"
    and hugepages.thp_mode(PMD_MODE) in (None, "inherit", "madvise")
    and (hugepages.glibc_version() or (0, 0)) >= hugepages.FIRST_GLIBC
)

# a child process mallocs 64 MiB, touches it, and prints the huge-page KiB of the mapping it is in
HUGE_KIB = r"""
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
address = libc.malloc(size)
ctypes.memset(address, 1, size)
inside = False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        low, high = (int(x, 16) for x in head.split("-"))
        inside = low <= address < high
    elif inside and head == "AnonHugePages:":
        print(line.split()[1])
        break
"""


def test_the_setting_is_added_to_the_users_own():
    assert hugepages.configured(None) is None
    assert hugepages.configured("glibc.malloc.arena_max=2") is None
    assert hugepages.configured("glibc.malloc.hugetlb=0:glibc.malloc.hugetlb=1") == "1"  # last
    assert hugepages.with_huge_pages(None) == "glibc.malloc.hugetlb=1"
    assert hugepages.with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert (
        hugepages.with_huge_pages("glibc.malloc.arena_max=2")
        == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    # the user's own choice, either way, stays
    assert hugepages.with_huge_pages("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
    assert (
        hugepages.with_huge_pages("glibc.malloc.hugetlb=2:glibc.malloc.arena_max=2")
        == "glibc.malloc.hugetlb=2:glibc.malloc.arena_max=2"
    )
    # unless forced (a benchmark's side with huge pages)
    assert (
        hugepages.with_huge_pages("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2", force=True)
        == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )


@pytest.mark.skipif(not HONOURED, reason="needs THP mode madvise (2 MiB pages too), glibc 2.35+")
def test_a_process_started_with_the_setting_gets_huge_pages_for_a_large_malloc():
    """What the advice relies on, asked of the kernel: without the setting a 64 MiB malloc is
    all 4 KiB pages; with it, huge pages (as many as the kernel finds free)."""

    def huge_kib(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != hugepages.ENV}
        if tunables is not None:
            env[hugepages.ENV] = tunables
        done = subprocess.run(
            [sys.executable, "-c", HUGE_KIB], env=env, capture_output=True, text=True, check=True
        )
        return int(done.stdout)

    assert huge_kib(None) == 0
    assert huge_kib(hugepages.with_huge_pages(None)) > 0


def test_advice_only_where_the_setting_changes_something():
    large = hugepages.LARGE_RECORD + 1
    glibc = (2, 36)
    line = hugepages.advice(large, {}, "madvise", glibc)
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in line and "34 MB" in line
    kept = hugepages.advice(large, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", glibc)
    assert "GLIBC_TUNABLES=glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" in kept
    assert hugepages.advice(hugepages.LARGE_RECORD, {}, "madvise", glibc) is None  # reused heap
    assert hugepages.advice(large, {}, "always", glibc) is None  # huge pages anyway
    assert hugepages.advice(large, {}, "never", glibc) is None  # nothing to grant them
    assert hugepages.advice(large, {}, "madvise", (2, 34)) is None  # no such setting
    set_already = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert hugepages.advice(large, set_already, "madvise", glibc) is None


def test_thp_mode_is_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    path.write_text("garbage\n")
    assert hugepages.thp_mode(str(path)) is None
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


@pytest.fixture
def madvise_host(monkeypatch):
    """A host where the setting would help: THP mode madvise, glibc 2.36, not set."""
    monkeypatch.setattr(hugepages, "thp_mode", lambda path=hugepages.THP_MODE: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.delenv(hugepages.ENV, raising=False)


def write_records(path, tokens: dict[str, int], caplog) -> list[logging.LogRecord]:
    """Write one record per prompt (1 layer x n tokens x 1024 float16), each flushed before the
    next; the advice lines logged after each."""
    spec = CaptureSpec.from_model_args(
        str(path), capture_tokens="prompt", capture_topk=0, environ={}
    )
    session = CaptureSession(spec, [0], "m", backend="test")
    advised = []
    with caplog.at_level(logging.WARNING, logger="hallulens_capture.session"):
        for prompt, n in tokens.items():
            acts = np.full((1, n, 1024), len(prompt), dtype=np.float16)
            captured = CapturedSample(list(range(n)), [1], np.arange(n, dtype=np.int32), acts)
            session.write(record_key(prompt), SampleRequest(prompt), "r", captured)
            session.flush()
            advised.append([r for r in caplog.records if hugepages.SETTING in r.getMessage()])
    session.close()
    return advised


def test_a_session_gives_the_advice_once_at_its_first_large_record(tmp_path, madvise_host, caplog):
    # 16,383 tokens: 32 MiB of activations, over it with the record's header and ids
    tokens = {"small": 16, "just over": 16383, "large": 16400}
    advised = write_records(tmp_path / "s", tokens, caplog)
    assert [len(lines) for lines in advised] == [0, 1, 1]
    assert "34 MB" in advised[-1][0].getMessage()
    with open_store(tmp_path / "s") as store:  # the advice changes nothing written
        assert len(store) == 3
        assert np.all(store[record_key("large")].all_layers_activations == len("large"))


def test_no_advice_when_the_run_started_with_the_setting(
    tmp_path, madvise_host, monkeypatch, caplog
):
    monkeypatch.setenv(hugepages.ENV, "glibc.malloc.hugetlb=1")
    assert write_records(tmp_path / "s", {"large": 16400}, caplog) == [[]]


def test_no_advice_for_records_under_32_mib(tmp_path, madvise_host, caplog):
    assert write_records(tmp_path / "s", {"a": 16000, "b": 16000}, caplog) == [[], []]
