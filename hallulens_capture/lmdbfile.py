"""LMDB's meta pages, read with plain file reads, so a truncated data.mdb is refused, not mapped.

LMDB maps data.mdb and touches its pages without comparing them with the file's length: a page
past the end of a truncated file kills the process with SIGBUS ("Bus error", exit 135) instead of
raising. So every open of a store first reads the two meta pages and checks the file's length.

Layout (LMDB 0.9, mdb.c): meta page 0 at offset 0 and meta page 1 at offset psize, each a page
header (`MDB_page`: pgno, pad, flags, lower/upper) followed by `MDB_meta` (magic, version,
address, mapsize, two `MDB_db`, last_pg, txnid); the page size is `mm_dbs[0].md_pad`. The meta
page with the larger txnid is the current one, and its pages 0..last_pg must all be in the file.
Words (pgno_t, txnid_t, size_t, pointers) are the machine's, in its byte order.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from hallulens_capture.errors import StoreError

MAGIC = 0xBEEFC0DE
DATA_VERSION = 1  # MDB_DATA_VERSION of LMDB 0.9; other versions are left to LMDB to judge
P_META = 0x08
_WORD = struct.calcsize("N")
_WORD_FORMAT = {4: "=I", 8: "=Q"}[_WORD]
_FLAGS = _WORD + 2  # MDB_page.mp_flags, after mp_pgno and mp_pad
_HEADER = _WORD + 8  # PAGEHDRSZ
_DB = 8 + 5 * _WORD  # sizeof(MDB_db)
_PSIZE = _HEADER + 8 + 2 * _WORD  # mm_dbs[FREE_DBI].md_pad, after magic, version, address, mapsize
_LAST_PG = _PSIZE + 2 * _DB
_TXNID = _LAST_PG + _WORD
_META_PAGE = _TXNID + _WORD  # bytes of a meta page this module reads


@dataclass(frozen=True)
class MetaPage:
    """What the current meta page says about the data file."""

    txnid: int
    last_pgno: int
    page_size: int

    @property
    def needed_bytes(self) -> int:
        """Length of the file LMDB will read from: pages 0..last_pgno."""
        return (self.last_pgno + 1) * self.page_size


def _parse(file: str, page: bytes, number: int) -> tuple[int, int, int, int]:
    """(version, page size, last_pgno, txnid) of one meta page; StoreError if it is none."""
    (flags,) = struct.unpack_from("=H", page, _FLAGS)
    magic, version = struct.unpack_from("=II", page, _HEADER)
    if not flags & P_META or magic != MAGIC:
        raise StoreError(f"{file} is not an LMDB data file (meta page {number} is not one)")
    (psize,) = struct.unpack_from("=I", page, _PSIZE)
    (last_pgno,) = struct.unpack_from(_WORD_FORMAT, page, _LAST_PG)
    (txnid,) = struct.unpack_from(_WORD_FORMAT, page, _TXNID)
    return version, psize, last_pgno, txnid


def read_meta(file: str) -> MetaPage | None:
    """The current meta page of LMDB data file `file`; None when there is nothing to check (an
    empty file, which LMDB initialises, or a data version this module does not know)."""
    with open(file, "rb") as f:
        first = f.read(_META_PAGE)
        if not first:
            return None
        if len(first) < _META_PAGE:
            raise StoreError(
                f"{file} is {len(first)} bytes, too short for LMDB's meta page "
                f"({_META_PAGE} bytes): the store was truncated; restore it from a copy"
            )
        version, psize, last_pgno, txnid = _parse(file, first, 0)
        if version != DATA_VERSION:
            return None
        if psize < _META_PAGE or psize & (psize - 1):
            raise StoreError(f"{file} is not an LMDB data file (page size {psize})")
        f.seek(psize)
        second = f.read(_META_PAGE)
        size = os.fstat(f.fileno()).st_size
    if len(second) < _META_PAGE:
        raise StoreError(
            f"{file} is {size} bytes, too short for LMDB's two meta pages ({2 * psize} bytes): "
            "the store was truncated; restore it from a copy"
        )
    other = _parse(file, second, 1)
    if other[3] > txnid:  # LMDB's rule: the larger txnid is current (page 0 on a tie)
        _, psize, last_pgno, txnid = other
    return MetaPage(txnid=txnid, last_pgno=last_pgno, page_size=psize)


def check_data_file(file: str) -> None:
    """Raise StoreError when `file` is shorter than its current meta page says (mapping it would
    end in SIGBUS). The length is taken after the meta page is read: a
    writer writes a commit's pages before its meta page, so a live store always passes."""
    meta = read_meta(file)
    if meta is None:
        return
    size = os.stat(file).st_size
    if size < meta.needed_bytes:
        raise StoreError(
            f"{file} is {size} bytes but its LMDB meta page (txn {meta.txnid}) needs "
            f"{meta.needed_bytes} bytes: the store was truncated (copied while written? a full "
            "disk?); restore data.mdb from a copy; opening it as it is would crash with a bus error"
        )
