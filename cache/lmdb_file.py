"""LMDB's data file read directly, to refuse one that is shorter than its header says before LMDB
maps it.

LMDB maps ``data.mdb`` and reads its pages through the map. A page past the end of the file is no
error to LMDB but a SIGBUS to the process: a truncated ``data.mdb`` (``truncate -s 8192``, a copy
cut short, a restore gone wrong) kills every process that opens it, with no message, and kills it
again on every retry. LMDB checks only its two meta pages, which it reads with pread
(``mdb_env_read_header`` in mdb.c). So before LMDB maps the file, `missing_pages` reads the same
two meta pages: the newer one (the higher transaction id, as ``mdb_env_pick_meta`` chooses) names
the last page in use, ``mm_last_pg``. A file that holds every page up to that one is whole.

A shorter file is not necessarily damaged: LMDB's own comment on ``mm_last_pg`` says "the file may
be shorter if the freeDB lists the final pages" (a page dirtied and freed within one transaction,
a *loose* page, is never written, and it may be the last). So when pages are missing, the free
database of that meta page is walked, with pread too, and the file is whole only if every missing
page is listed free: LMDB never reads a free page (it writes a new page from memory). Any other
missing page, or a free database that itself lies past the end, is a truncation.

The layout is LMDB 0.9's (``MDB_DATA_VERSION`` 1) on a 64-bit host, in host byte order, as the
py-lmdb build this package uses writes it::

    page header (16 bytes): pgno u64, pad u16, flags u16, lower u16, upper u16 (overflow: pages u32)
    meta (at 16 in pages 0 and 1): magic u32, version u32, address u64, mapsize u64,
        two databases of 48 bytes (free, main): pad u32 (the page size, in the free one),
        flags u16, depth u16, branch/leaf/overflow pages u64 x3, entries u64, root u64;
        last_pg u64, txnid u64
    node (in branch and leaf pages, at the offsets after the header): lo u16, hi u16,
        flags u16, ksize u16, key, data; a branch node's child is lo | hi << 16 | flags << 32,
        a leaf node's data size lo | hi << 16 (F_BIGDATA: the data is a u64 overflow page number)
    free database: key a transaction id, value a page list (count u64, then count page numbers)

Anything that is not a meta page of that layout is left to LMDB, which refuses it (MDB_INVALID,
MDB_VERSION_MISMATCH) before mapping anything.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

DATA_FILE = "data.mdb"

_MAGIC = 0xBEEFC0DE
_VERSION = 1
_PAGE_HEADER = struct.Struct("=QHHHH")  # pgno, pad, flags, lower, upper
_OVERFLOW_PAGES = struct.Struct("=I")  # at offset 12 of an overflow page's header
_HEADER_SIZE = _PAGE_HEADER.size
_META = struct.Struct("=IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_META_READ = _HEADER_SIZE + _META.size  # what mdb_env_read_header reads of each meta page
_NODE = struct.Struct("=HHHH")  # lo, hi, flags, ksize
_U16 = struct.Struct("=H")
_U64 = struct.Struct("=Q")

_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
_F_BIGDATA = 0x01
_P_INVALID = (1 << 64) - 1
# mdb.c's MAX_PAGESIZE (0x8000, or 0x10000 in its development format) and the smallest page an
# OS gives it; LMDB takes the page size of an existing file from its header.
_PAGE_SIZES = frozenset(1 << n for n in range(9, 17))
# A free database of a healthy cache has a few pages; these bound a walk of a damaged one.
_MAX_DEPTH = 32
_MAX_PAGES = 1 << 20
# A writer may commit while the free database is walked here (it never rewrites a page of the
# newest snapshot, but two commits later it may): an inconsistent walk is tried again on the
# meta pages as they are then before it counts as damage.
_ATTEMPTS = 3


class _Meta(NamedTuple):
    page_size: int
    free_root: int
    last_page: int
    txnid: int


class _Inconsistent(Exception):
    """The free database does not read as one (damage, or a writer committing meanwhile)."""


class _PastTheEnd(Exception):
    """A page the free database needs lies past the end of the file."""


def missing_pages(env_dir: Path) -> str | None:
    """Why ``env_dir/data.mdb`` cannot be mapped safely (pages its header counts are not in the
    file), as a clause for a message; None if it can, and also if it is absent, empty or no LMDB
    file of this layout (LMDB then refuses it, or creates it, without mapping past the end)."""
    if struct.calcsize("P") != 8:
        return None  # a 32-bit LMDB lays its pages out otherwise; leave it to LMDB
    try:
        fd = os.open(env_dir / DATA_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "data.mdb is not a regular file"
        why: str | None = None
        for _ in range(_ATTEMPTS):
            try:
                return _check(fd)
            except _Inconsistent as exc:
                why = str(exc)
        return f"data.mdb is shorter than its header says and its free page list is damaged ({why})"
    finally:
        os.close(fd)


def _check(fd: int) -> str | None:
    first = _meta(os.pread(fd, _META_READ, 0))
    if first is None:
        return None
    if first.page_size not in _PAGE_SIZES:
        return f"data.mdb gives a page size of {first.page_size} bytes in its header, which LMDB never writes"
    second = _meta(os.pread(fd, _META_READ, first.page_size))
    if second is None:
        return None
    meta = second if second.txnid > first.txnid else first
    # Read after the meta pages: LMDB writes a transaction's pages before its meta page, so a
    # writer that committed meanwhile has only made the file longer.
    size = os.fstat(fd).st_size
    needed = (meta.last_page + 1) * first.page_size
    if size >= needed:
        return None
    whole = size // first.page_size  # pages wholly in the file
    absent = meta.last_page + 1 - whole
    what = (
        f"data.mdb has {size} bytes, but its header counts {meta.last_page + 1} pages of "
        f"{first.page_size} bytes ({needed} bytes)"
    )
    try:
        free = _free_pages(fd, whole, first.page_size, meta.free_root)
    except _PastTheEnd as exc:
        return f"{what}; {exc}: it was truncated"
    if absent > len(free) or any(page not in free for page in range(whole, meta.last_page + 1)):
        return f"{what}, and the missing pages are in use: it was truncated"
    return None


def _meta(raw: bytes) -> _Meta | None:
    if len(raw) < _META_READ:
        return None
    _, _, flags, _, _ = _PAGE_HEADER.unpack_from(raw)
    fields = _META.unpack_from(raw, _HEADER_SIZE)
    magic, version = fields[0], fields[1]
    if not flags & _P_META or magic != _MAGIC or version != _VERSION:
        return None
    free_db, last_page, txnid = fields[4:12], fields[20], fields[21]
    return _Meta(page_size=free_db[0], free_root=free_db[7], last_page=last_page, txnid=txnid)


def _free_pages(fd: int, whole: int, page_size: int, root: int) -> set[int]:
    """Every page number the free database lists. Its own pages must be in the file."""
    free: set[int] = set()
    if root == _P_INVALID:
        return free
    stack = [(root, 0)]
    visited = 0
    while stack:
        number, depth = stack.pop()
        visited += 1
        if depth > _MAX_DEPTH or visited > _MAX_PAGES:
            raise _Inconsistent("its free database is deeper or larger than any LMDB writes")
        page = _page(fd, number, whole, page_size, "a page of its free database")
        _, _, flags, lower, _ = _PAGE_HEADER.unpack_from(page)
        if flags & _P_LEAF2 or not flags & (_P_BRANCH | _P_LEAF) or not _HEADER_SIZE <= lower <= page_size:
            raise _Inconsistent(f"page {number} of its free database has flags {flags:#x}")
        for slot in range((lower - _HEADER_SIZE) // _U16.size):
            at = _U16.unpack_from(page, _HEADER_SIZE + slot * _U16.size)[0]
            if at + _NODE.size > page_size:
                raise _Inconsistent(f"page {number} of its free database points past its end")
            lo, hi, node_flags, key_size = _NODE.unpack_from(page, at)
            if flags & _P_BRANCH:
                stack.append((lo | hi << 16 | node_flags << 32, depth + 1))
                continue
            start, length = at + _NODE.size + key_size, lo | hi << 16
            if node_flags & _F_BIGDATA:
                if start + _U64.size > page_size:
                    raise _Inconsistent(f"page {number} of its free database points past its end")
                value = _overflow(fd, _U64.unpack_from(page, start)[0], length, whole, page_size)
            elif start + length > page_size:
                raise _Inconsistent(f"page {number} of its free database points past its end")
            else:
                value = page[start : start + length]
            free.update(_page_list(value, number))
    return free


def _page(fd: int, number: int, whole: int, page_size: int, what: str) -> bytes:
    if number >= whole:
        raise _PastTheEnd(f"{what} (page {number}) lies past the end")
    page = os.pread(fd, page_size, number * page_size)
    if len(page) != page_size:
        raise _PastTheEnd(f"{what} (page {number}) lies past the end")
    return page


def _overflow(fd: int, number: int, length: int, whole: int, page_size: int) -> bytes:
    head = _page(fd, number, whole, page_size, "a page of its free list")
    _, _, flags, _, _ = _PAGE_HEADER.unpack_from(head)
    pages = _OVERFLOW_PAGES.unpack_from(head, 12)[0]
    if not flags & _P_OVERFLOW or _HEADER_SIZE + length > pages * page_size:
        raise _Inconsistent(f"overflow page {number} of its free database has flags {flags:#x}")
    if number + pages > whole:
        raise _PastTheEnd(f"the free list on pages {number} to {number + pages - 1} lies past the end")
    return os.pread(fd, length, number * page_size + _HEADER_SIZE)


def _page_list(value: bytes, number: int) -> tuple[int, ...]:
    if len(value) < _U64.size:
        raise _Inconsistent(f"a free list on page {number} has {len(value)} bytes")
    count = _U64.unpack_from(value)[0]
    if len(value) < _U64.size * (count + 1):
        raise _Inconsistent(f"a free list on page {number} counts {count} pages in {len(value)} bytes")
    return struct.unpack_from(f"={count}Q", value, _U64.size)
