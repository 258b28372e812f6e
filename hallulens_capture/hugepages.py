"""Huge pages for LMDB's buffer of a large record: one glibc setting, read when a process starts.

LMDB copies each value into a buffer it mallocs for the transaction and frees after the commit.
glibc serves an allocation over 32 MiB (the most its mmap threshold grows to) from a fresh
mapping, unless the arena's free top happens to hold it, so each 4 KiB of a large record is
usually a page fault before LMDB's copy: 69 MB records (256 tokens of an 8B model's 33 layers)
were stored at 0.40-0.44 x a plain file's speed on the project machine. With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35+) malloc asks for transparent huge pages
on its mappings and heap, which the kernel grants where its THP mode is `madvise` (`always`
grants them anyway, `never` not at all): 0.60-0.77 x. glibc reads the setting once, when the
process starts, so a running process can only be told (`advice`); `hallulens pipeline` sets it
for the harness it starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

LARGE_RECORD = 32 << 20  # glibc's largest mmap threshold: bigger allocations are mapped afresh
SETTING = "glibc.malloc.hugetlb"
ENV = "GLIBC_TUNABLES"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
FIRST_GLIBC = (2, 35)  # the first glibc with the setting


def _named(part: str) -> str:
    return part.partition("=")[0]


def configured(tunables: str | None) -> str | None:
    """The huge-page value `GLIBC_TUNABLES` sets (the last one, as glibc takes), None if none."""
    values = [p.partition("=")[2] for p in (tunables or "").split(":") if _named(p) == SETTING]
    return values[-1] if values else None


def with_huge_pages(tunables: str | None, force: bool = False) -> str:
    """`GLIBC_TUNABLES` asking for malloc's huge pages, the user's other settings kept; a value
    that sets them already (on or off) is kept unless `force`."""
    parts = [part for part in (tunables or "").split(":") if part]
    if not force and configured(tunables) is not None:
        return ":".join(parts)
    return ":".join([*(p for p in parts if _named(p) != SETTING), f"{SETTING}=1"])


def thp_mode(path: str = THP_MODE) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), None if unknown."""
    try:
        with open(path, encoding="ascii") as file:
            chosen = re.search(r"\[(\w+)\]", file.read())
    except (OSError, ValueError):
        return None
    return chosen.group(1) if chosen else None


def glibc_version() -> tuple[int, int] | None:
    """This process's glibc version, None under another C library."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return None
    found = re.fullmatch(r"glibc (\d+)\.(\d+).*", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def advice(
    record_bytes: int,
    environ: Mapping[str, str] = os.environ,
    mode: str | None = None,
    glibc: tuple[int, int] | None = None,
) -> str | None:
    """A line telling how to store records of `record_bytes` faster, None where the setting would
    change nothing (small records, THP `always` or `never`, another C library, already set)."""
    if record_bytes <= LARGE_RECORD or configured(environ.get(ENV)) is not None:
        return None
    if (mode or thp_mode()) != "madvise" or (glibc or glibc_version() or (0, 0)) < FIRST_GLIBC:
        return None
    return (
        f"records of {record_bytes / 1e6:.0f} MB: each is copied into a fresh 4 KiB-paged buffer; "
        f"start the run with {ENV}={with_huge_pages(environ.get(ENV))} to store them "
        "1.5-1.8x faster (README, Troubleshooting)"
    )
