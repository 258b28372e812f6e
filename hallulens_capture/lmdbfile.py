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
import sys
from dataclasses import dataclass

import numpy as np

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


# --- where values lie: a read-only walk of one named database's B-tree --------------------
# Why: py-lmdb touches every page of a value it returns (its "preload"), so reading one layer
# of a 17 MB record through it reads all 17 MB; a slice read must know the value's place in the
# file instead. Layout (mdb.c, LMDB 0.9, 64-bit little-endian only): a page starts with its
# header (pgno, pad, flags, lower, upper) and an array of node offsets; a node is (lo, hi, flags,
# ksize) then the key, then the data: in a branch page lo | hi << 16 | flags << 32 is the child
# page; in a leaf page lo | hi << 16 is the data size and F_BIGDATA means the data is the number
# of an overflow page whose bytes follow that page's header. Named databases are leaves of the
# main database (F_SUBDATA) whose data is an MDB_db, its root page at md_root.
P_BRANCH, P_LEAF = 0x01, 0x02
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
_NODE = 8
_LOWER = _WORD + 4  # MDB_page.mp_lower
_MAIN_ROOT = _PSIZE + _DB + 8 + 4 * _WORD  # mm_dbs[MAIN_DBI].md_root
_DB_ROOT = 8 + 4 * _WORD  # MDB_db.md_root
_NO_PAGE = (1 << 64) - 1  # P_INVALID: the root of an empty database


class LayoutError(Exception):
    """The data file is not laid out as the walk reads it: read through LMDB itself."""


def value_spans(data: memoryview, txnid: int, db_name: bytes) -> dict[bytes, tuple[int, int]]:
    """key -> (offset, length) in the data file of every value of named database `db_name`, as of
    the read snapshot `txnid` (which the caller holds open, so no page of it is reused).

    `data` is the whole data file, mapped. LayoutError when the file is not one this walk reads
    or the snapshot's meta page was overwritten since (the caller begins a new snapshot)."""
    if _WORD != 8 or sys.byteorder != "little":
        raise LayoutError("only 64-bit little-endian data files are walked")
    size = len(data)
    if size < _META_PAGE:
        raise LayoutError("no meta page")
    (psize,) = struct.unpack_from("=I", data, _PSIZE)
    if psize < _META_PAGE or psize & (psize - 1) or size < 2 * psize:
        raise LayoutError(f"page size {psize}")
    meta = next(
        (m for m in (0, psize) if struct.unpack_from("=Q", data, m + _TXNID)[0] == txnid), None
    )
    if meta is None:
        raise LayoutError(f"the meta page of transaction {txnid} was overwritten")
    (last,) = struct.unpack_from("=Q", data, meta + _LAST_PG)
    if (last + 1) * psize > size:
        raise LayoutError("the file is shorter than the snapshot")
    (main,) = struct.unpack_from("=Q", data, meta + _MAIN_ROOT)
    named = _walk(data, psize, last, main, True).get(db_name)
    if named is None:
        raise LayoutError(f"no database {db_name!r}")
    offset, length = named
    if length < _DB_ROOT + 8:
        raise LayoutError("a database record too short")
    (root,) = struct.unpack_from("=Q", data, offset + _DB_ROOT)
    return {} if root == _NO_PAGE else _walk(data, psize, last, root, False)


def _walk(
    data: memoryview, psize: int, last: int, root: int, main: bool
) -> dict[bytes, tuple[int, int]]:
    """Every leaf value of the B-tree at `root` (of the main database: the named databases),
    a page at a time: a page's nodes are read as arrays, not one by one."""
    file = np.frombuffer(data, dtype=np.uint8)
    spans: dict[bytes, tuple[int, int]] = {}
    pending, visited = [root], 0
    while pending:
        pgno = pending.pop()
        visited += 1
        if pgno > last or visited > last + 1:
            raise LayoutError(f"page {pgno} is outside the snapshot")
        page = pgno * psize
        flags, lower = struct.unpack_from("=HH", data, page + _FLAGS)
        count = (lower - _HEADER) >> 1
        if not flags & (P_BRANCH | P_LEAF) or lower < _HEADER or _HEADER + 2 * count > psize:
            raise LayoutError(f"page {pgno} is not a branch or leaf page (flags {flags:#x})")
        at = np.frombuffer(data, "<u2", count, page + _HEADER).astype(np.int64)
        if count and int(at.max()) + _NODE > psize:
            raise LayoutError(f"page {pgno} has a node outside it")
        nodes = page + at
        lo, hi, node_flags, ksize = file[nodes[:, None] + np.arange(_NODE)].view("<u2").T
        if flags & P_BRANCH:
            pending += (lo | hi.astype(np.int64) << 16 | node_flags.astype(np.int64) << 32).tolist()
            continue
        bad = (node_flags & F_DUPDATA != 0) | ((node_flags & F_SUBDATA != 0) != main)
        if bad.any():
            raise LayoutError(f"node flags {int(node_flags[bad][0]):#x}")
        length = lo | hi.astype(np.int64) << 16
        for k in np.unique(ksize).tolist():
            mine = ksize == k
            keys = file[nodes[mine, None] + _NODE + np.arange(k)]
            start = nodes[mine] + _NODE + k
            big = node_flags[mine] & F_BIGDATA != 0
            overflow = file[start[big, None] + np.arange(8)].view("<u8")[:, 0].astype(np.int64)
            if big.any() and int(overflow.max()) > last:
                raise LayoutError(f"a value on page {pgno} is outside the snapshot")
            start[big] = overflow * psize + _HEADER
            end = start + length[mine]
            limit = np.where(big, (last + 1) * psize, page + psize)
            if (end > limit).any():
                raise LayoutError(f"a value on page {pgno} is outside its pages")
            spans.update(
                zip(
                    map(bytes, keys),
                    zip(start.tolist(), length[mine].tolist(), strict=True),
                    strict=True,
                )
            )
    return spans
