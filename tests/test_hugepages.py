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

HONOURED = hugepages.thp_mode() == "madvise" and (hugepages.glibc_version() or (0, 0)) >= (2, 35)
needs_madvise = pytest.mark.skipif(not HONOURED, reason="needs THP mode madvise and glibc 2.35+")

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


@needs_madvise
def test_a_process_started_with_the_setting_gets_huge_pages_for_a_large_malloc():
    """What the advice relies on, asked of the kernel: without the setting a 64 MiB malloc is
    4 KiB pages; with it, most of it is huge pages."""

    def huge_kib(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != hugepages.ENV}
        if tunables is not None:
            env[hugepages.ENV] = tunables
        done = subprocess.run(
            [sys.executable, "-c", HUGE_KIB], env=env, capture_output=True, text=True, check=True
        )
        return int(done.stdout)

    assert huge_kib(None) == 0
    assert huge_kib(hugepages.with_huge_pages(None)) >= 32 << 10


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


@needs_madvise
def test_a_session_gives_the_advice_once_at_its_first_large_record(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(hugepages.ENV, raising=False)
    spec = CaptureSpec.from_model_args(
        str(tmp_path / "s"), capture_tokens="prompt", capture_topk=0, environ={}
    )
    session = CaptureSession(spec, [0], "m", backend="test")
    tokens = {"small": 16, "large 1": 16400, "large 2": 16400}  # x 1 layer x 1024 float16
    with caplog.at_level(logging.WARNING, logger="hallulens_capture.session"):
        for prompt, n in tokens.items():
            acts = np.full((1, n, 1024), len(prompt), dtype=np.float16)
            captured = CapturedSample(list(range(n)), [1], np.arange(n, dtype=np.int32), acts)
            session.write(record_key(prompt), SampleRequest(prompt), "r", captured)
            advised = [r for r in caplog.records if hugepages.SETTING in r.getMessage()]
            assert len(advised) == (0 if prompt == "small" else 1)
    session.close()
    assert "34 MB" in advised[0].getMessage()
    with open_store(tmp_path / "s") as store:  # the advice changes nothing written
        assert np.all(store[record_key("large 2")].all_layers_activations == len("large 2"))


@needs_madvise
def test_no_advice_when_the_run_started_with_the_setting(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(hugepages.ENV, "glibc.malloc.hugetlb=1")
    spec = CaptureSpec.from_model_args(
        str(tmp_path / "s"), capture_tokens="prompt", capture_topk=0, environ={}
    )
    session = CaptureSession(spec, [0], "m", backend="test")
    acts = np.zeros((1, 16400, 1024), dtype=np.float16)
    captured = CapturedSample(list(range(16400)), [1], np.arange(16400, dtype=np.int32), acts)
    with caplog.at_level(logging.WARNING, logger="hallulens_capture.session"):
        session.write(record_key("p"), SampleRequest("p"), "r", captured)
        session.close()
    assert not [r for r in caplog.records if hugepages.SETTING in r.getMessage()]
