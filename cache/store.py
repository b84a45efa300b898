"""One LMDB environment per project, holding image records and their dirty marks.

Layout (cache format 2): ``<cache_dir>/projects/<project_id>/`` is an LMDB environment
(``subdir=True``) with three named databases:

``records``
    Two entries per record. Its key, ``db_name + b"\\x00" + index`` (8 bytes, big-endian,
    so keys sort by ``(db, index)``), holds the array's bytes in C order and nothing else:
    they are written straight from the caller's array, with no copy before LMDB's own,
    and read back with none at all. The key followed by ``b"h"`` holds the record's
    header: shape, dtype and attrs (see ``_LAYOUT``). A header sorts right after its
    payload, so the two usually share a leaf page: writing it dirties no extra page.
``dirty``
    record keys; value = write sequence number and record size, 8 bytes big-endian
    each. A key is present while the record has not been flushed. A record's size is
    that of its :func:`encode_record` form, what a flush has to carry.
``meta``
    ``format`` (the cache format), ``state`` (last sequence number and the sum of dirty
    sizes, one value so that a write reads and writes it once), ``count:<db>`` (one past
    the highest index written, then the layout all of its records share, if they do;
    see ``_MIXED``), ``note:<name>`` (see :meth:`CacheStore.note`) and ``announced``
    (present from :meth:`CacheStore.announce` until :meth:`CacheStore.settle` finds
    nothing dirty). Integers are 8 bytes, big-endian.

Several processes of one host may write one environment at once: LMDB serialises
writers with the mutex in its lock file. Open a :class:`CacheStore` after ``fork()``,
never before: an LMDB environment must not be used across a fork, and one that was
inherited is refused. Within a process, stores of the same project share one LMDB
environment, because LMDB forbids opening an environment twice in one process
(closing the second copy would drop the first one's POSIX locks). A store is meant
for one thread at a time.

py-lmdb parses keyword arguments slowly (about 0.3 us a call, as much as a ``get``), so
the per-record paths pass ``default`` and ``db`` positionally: ``txn.get(key, None, db)``,
``txn.put(key, value, True, True, False, db)`` (dupdata, overwrite, append, db); a
reader's transaction has ``records`` as its default database.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import lmdb
import numpy as np
from numpy.typing import NDArray

from .errors import CacheCorrupt, CacheError, CacheFull, DirtyNotAnnounced
from .lmdb_file import missing_pages

__all__ = [
    "DEFAULT_MAP_SIZE",
    "CacheStore",
    "DirtyEntry",
    "Reader",
    "Record",
    "decode_record",
    "encode_record",
]

_T = TypeVar("_T")

# Where environments of leases that were lost are kept, never deleted by dbguard.
ASIDE = "aside"
DEFAULT_MAP_SIZE = 64 << 20
# Three databases are used; the headroom lets later versions add some without a
# migration (max_dbs is fixed when an environment is opened).
_MAX_DBS = 64
_PROJECTS = "projects"
_DATA_FILE = "data.mdb"

# Format 1 kept header and payload in one value, which cost a copy of every payload.
_FORMAT = 2

_RECORDS = b"records"
_DIRTY = b"dirty"
_META = b"meta"
_FORMAT_KEY = b"format"
_STATE = b"state"
_COUNT_PREFIX = b"count:"
_NOTE_PREFIX = b"note:"
_ANNOUNCED = b"announced"
# An append's caller-chosen key (a worker's request id), so that one resent appends once.
_ONCE_PREFIX = b"once:"
_ONCE_VALUE = struct.Struct(">Qd")  # the index it was given, wall time
_MAX_ONCE_KEY = 128
_HEADER_SUFFIX = b"h"

_U64 = struct.Struct(">Q")
_DIRTY_VALUE = struct.Struct(">QQ")  # sequence number, record size
_STATE_VALUE = struct.Struct(">QQ")  # last sequence number, sum of dirty sizes
_FORMAT_VALUE = _U64.pack(_FORMAT)

# A record header: the length of its layout, ndim, len(dtype); ndim u64 dimensions; the
# dtype string; then the attrs blob, to the end of the value. Everything before the attrs
# is the layout, the same bytes for every record of one dtype and shape, so readers and
# writers keep what they derive from it in a cache keyed by those bytes.
_LAYOUT = struct.Struct("<HBB")
# What follows a database's count in meta: nothing while it has no records, the layout
# of every one of its records while they share one, and _MIXED once they do not (for
# good: records are never deleted one by one). Image stacks share one shape and dtype,
# and for them a reader needs no header to read arrays: it reads this once per snapshot.
# A layout is never one byte long.
_MIXED = b"\x00"
# The self-contained form of a record (encode_record): magic, format, header length,
# payload length; then the header, zero padding up to a multiple of 16 bytes, the payload.
_MAGIC = b"DBGC"
_ENVELOPE = struct.Struct("<4sBxxxIQ")
# 16 bytes covers the alignment of every numpy scalar type up to complex128. In the store,
# a payload larger than about half a page sits on its own overflow pages, 16 bytes after a
# page boundary, so it is aligned in memory; a small one shares a leaf page and may be
# unaligned, which numpy handles (just more slowly).
_ALIGN = 16

# put_many commits every this many record bytes. LMDB mallocs a copy of every page a
# transaction writes and frees them all at commit; after a batch of megabytes glibc hands
# the top of its heap back to the OS, and the next batch faults it all in again. With 50
# images of 256 KiB per call, one transaction per call took twice append's time per image
# (1.06 times with glibc's trimming turned off, GLIBC_TUNABLES=glibc.malloc.trim_threshold),
# and transactions of at most 1 MiB took 0.83 times (256 KiB: 0.97, 4 MiB: 1.02).
_MANY_TXN_BYTES = 1 << 20

# The caches below are keyed by what callers pass or what is stored: a few entries in
# practice, but not bounded by us, so each is emptied when it reaches this size.
_CACHE_LIMIT = 1024


class _Garbled(Exception):
    """A value or key in an environment that LMDB reads fine is not one this module writes
    (the wrong length, not UTF-8): LMDB keeps no checksums, so a damaged page can read as that."""


def _garbled(what: str, value: bytes | memoryview) -> _Garbled:
    return _Garbled(f"{what} has {len(value)} bytes that this cache format never writes there")


# LMDB errors that mean the files are damaged or are not an environment we can
# read, as opposed to usage errors or full maps.
_DAMAGE_ERRORS: tuple[type[BaseException], ...] = (
    _Garbled,
    lmdb.CorruptedError,  # MDB_CORRUPTED: a page has the wrong type or contents
    lmdb.PageNotFoundError,  # MDB_PAGE_NOTFOUND: a page number points past the file
    lmdb.PanicError,  # MDB_PANIC: a previous fatal error left the environment unusable
    lmdb.InvalidError,  # MDB_INVALID: data.mdb is not an LMDB file
    lmdb.VersionMismatchError,  # MDB_VERSION_MISMATCH: written by another LMDB format
    lmdb.BadRslotError,  # MDB_BAD_RSLOT: the reader table in lock.mdb is inconsistent
    lmdb.IncompatibleError,  # MDB_INCOMPATIBLE: a database's flags do not match ours
    lmdb.BadChecksumError,  # page checksum failure (LMDB builds with checksums)
)

# A project id becomes a directory name: one safe path component.
_PROJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Record:
    """A record as stored: ``data`` is the raw payload, laid out C-contiguously.

    When it comes from :meth:`Reader.record`, ``data`` points into the LMDB map and
    is valid only inside that reader's ``with`` block.
    """

    dtype: str
    shape: tuple[int, ...]
    attrs: bytes
    data: memoryview

    def array(self) -> NDArray[Any]:
        """Return a read-only numpy view of ``data`` (same lifetime as ``data``)."""
        dtype = _dtype(self.dtype)
        if self.data.nbytes == 0 or dtype.itemsize == 0:
            return _empty(dtype, self.shape)
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


@dataclass(frozen=True)
class DirtyEntry:
    """A record written since its last flush, as of one snapshot."""

    db: str
    index: int
    seq: int
    size: int


# -- record headers -------------------------------------------------------------------


class _Layout(NamedTuple):
    """What a reader derives from a layout (see ``_LAYOUT``)."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    nbytes: int
    dtype_str: str


class _Form(NamedTuple):
    """How a writer stores arrays of one dtype and shape."""

    layout: bytes
    nbytes: int
    size: int  # of a record without attrs
    # numpy exports no buffer for datetime64 / timedelta64: their bytes go as uint8.
    as_bytes: bool


_DTYPES: dict[str, np.dtype[Any]] = {}
_LAYOUTS: dict[bytes, _Layout] = {}
_FORMS: dict[tuple[np.dtype[Any], tuple[int, ...]], _Form] = {}


def _remember(cache: dict[Any, Any], key: Any, value: _T) -> _T:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _dtype(name: str) -> np.dtype[Any]:
    # np.dtype(str) parses the string each time (about 1 us); the dtype object is immutable.
    dtype = _DTYPES.get(name)
    return dtype if dtype is not None else _remember(_DTYPES, name, np.dtype(name))


def _check_dtype(dtype: np.dtype[Any]) -> None:
    if dtype.hasobject or dtype.fields is not None:
        raise TypeError(
            f"cannot cache an array of dtype {dtype}: only plain numeric, boolean and "
            f"fixed-width string dtypes have a byte layout that can be stored"
        )


def _form(dtype: np.dtype[Any], shape: tuple[int, ...]) -> _Form:
    form = _FORMS.get((dtype, shape))
    if form is not None:
        return form
    _check_dtype(dtype)
    name = dtype.str.encode("ascii")
    size = _LAYOUT.size + 8 * len(shape) + len(name)
    layout = _LAYOUT.pack(size, len(shape), len(name)) + struct.pack(f"<{len(shape)}Q", *shape) + name
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    form = _Form(layout, nbytes, _envelope_size(len(layout)) + nbytes, dtype.kind in "mM")
    return _remember(_FORMS, (dtype, shape), form)


# One record as the store writes it: its layout (the start of its header), its header,
# its payload (a C-contiguous buffer, the caller's array itself when it can be) and its
# size. Plain tuples on the write path: building a NamedTuple costs half a microsecond.
_Parts = tuple[bytes, bytes, Any, int]


def _prepare(array: NDArray[Any], attrs: bytes) -> _Parts:
    """Split a record into header and payload without copying the array's bytes.

    LMDB copies the payload into the map; nothing before that needs to, unless the
    array is not C-contiguous.
    """
    arr = np.asarray(array)
    layout, nbytes, size, as_bytes = _FORMS.get((arr.dtype, arr.shape)) or _form(arr.dtype, arr.shape)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if as_bytes:
        arr = arr.reshape(-1).view(np.uint8)
    if not attrs:
        return layout, layout, arr, size
    header = layout + bytes(attrs)
    return layout, header, arr, _envelope_size(len(header)) + nbytes


def _envelope_size(header_len: int) -> int:
    """Bytes before the payload in the encode_record form: a multiple of ``_ALIGN``."""
    return -(-(_ENVELOPE.size + header_len) // _ALIGN) * _ALIGN


def _layout(header: bytes) -> tuple[_Layout, int]:
    """Decode a record header: its layout, and where its attrs start.

    Raises ValueError when the header is malformed.
    """
    layout = _LAYOUTS.get(header)
    if layout is not None:  # the common case: no attrs, the header is its layout
        return layout, len(header)
    if len(header) < _LAYOUT.size:
        raise ValueError(f"record header of {len(header)} bytes is shorter than {_LAYOUT.size}")
    size, ndim, dtype_len = _LAYOUT.unpack_from(header)
    if size != _LAYOUT.size + 8 * ndim + dtype_len or size > len(header):
        raise ValueError(f"record header of {len(header)} bytes has a layout of {size} bytes")
    key = header[:size]
    layout = _LAYOUTS.get(key)
    if layout is None:
        shape = tuple(int(n) for n in struct.unpack_from(f"<{ndim}Q", header, _LAYOUT.size))
        try:
            name = key[size - dtype_len :].decode("ascii")
            dtype = _dtype(name)
            _check_dtype(dtype)  # numpy must not be handed object pointers from a file
        except (UnicodeDecodeError, TypeError) as exc:
            raise ValueError(f"record header names a dtype that cannot be read: {exc}") from exc
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        layout = _remember(_LAYOUTS, key, _Layout(dtype, shape, nbytes, name))
    return layout, size


def _empty(dtype: np.dtype[Any], shape: tuple[int, ...]) -> NDArray[Any]:
    # frombuffer refuses zero-sized items; there is nothing to share anyway.
    empty = np.empty(shape, dtype=dtype)
    empty.flags.writeable = False
    return empty


def encode_record(array: NDArray[Any], attrs: bytes = b"") -> bytes:
    """Encode ``array`` and the opaque ``attrs`` blob as one self-contained value.

    The store itself keeps header and payload apart (see the module docstring); this form
    is what a record's size counts. The payload starts at a multiple of 16 bytes from the
    start of the value, so ``numpy.frombuffer`` over it can be aligned for every dtype.
    """
    _, header, payload, size = _prepare(array, attrs)
    offset = _envelope_size(len(header))
    envelope = _ENVELOPE.pack(_MAGIC, _FORMAT, len(header), size - offset)
    padding = bytes(offset - _ENVELOPE.size - len(header))
    return b"".join((envelope, header, padding, memoryview(payload).cast("B")))


def decode_record(value: bytes | memoryview) -> Record:
    """Decode a value made by :func:`encode_record` without copying its payload.

    Raises ValueError when the value is not a record of a format this code knows.
    """
    buf = memoryview(value)
    try:
        magic, fmt, header_len, length = _ENVELOPE.unpack_from(buf)
    except struct.error as exc:
        raise ValueError(f"record of {buf.nbytes} bytes is shorter than its envelope") from exc
    if magic != _MAGIC or fmt != _FORMAT:
        raise ValueError(f"record has magic {magic!r} format {fmt}, not {_MAGIC!r} {_FORMAT}")
    offset = _envelope_size(header_len)
    if offset + length != buf.nbytes:
        raise ValueError(f"record lengths do not add up to its {buf.nbytes} bytes")
    header = bytes(buf[_ENVELOPE.size : _ENVELOPE.size + header_len])
    layout, attrs_at = _layout(header)
    if layout.nbytes != length:
        raise ValueError(f"record payload of {length} bytes does not hold {layout.shape} {layout.dtype_str}")
    return Record(layout.dtype_str, layout.shape, header[attrs_at:], buf[offset:])


# -- keys -------------------------------------------------------------------------------


class _Names(NamedTuple):
    prefix: bytes  # of the database's record keys
    count_key: bytes  # of its count in meta


_NAMES: dict[str, _Names] = {}


def _names(db: str) -> _Names:
    names = _NAMES.get(db)
    if names is not None:
        return names
    name = db.encode("utf-8")
    if not name or b"\x00" in name:
        raise ValueError(f"database name {db!r} must be non-empty and contain no NUL")
    return _remember(_NAMES, db, _Names(name + b"\x00", _COUNT_PREFIX + name))


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1 << 64:
        raise ValueError(f"record index {index!r} must be an int in [0, 2**64)")
    return index


def _record_key(db: str, index: int) -> bytes:
    prefix = _names(db).prefix
    if type(index) is int:  # not bool, nor numpy integers: refused as before
        try:
            return prefix + _U64.pack(index)
        except struct.error:
            pass  # out of range: _check_index says so
    return prefix + _U64.pack(_check_index(index))


def _split_key(key: bytes) -> tuple[str, int]:
    try:
        return key[:-9].decode("utf-8"), _U64.unpack(key[-8:])[0]
    except (UnicodeDecodeError, struct.error) as exc:
        raise _garbled("a record key", key) from exc


def _check_project_id(project_id: str) -> str:
    if not _PROJECT_ID.fullmatch(project_id):
        raise ValueError(
            f"project id {project_id!r} must be letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )
    return project_id


def _project_path(root: Path | str, project_id: str) -> Path:
    return Path(root) / _PROJECTS / _check_project_id(project_id)


# -- environments -------------------------------------------------------------------


def _damaged(path: Path, exc: BaseException) -> CacheCorrupt:
    return CacheCorrupt(str(path), f"{type(exc).__name__}: {exc}")


@contextmanager
def _translate(path: Path) -> Iterator[None]:
    # For the paths that run once per call; the per-record ones catch _DAMAGE_ERRORS
    # themselves, a generator-based context manager costing about a microsecond.
    try:
        yield
    except _DAMAGE_ERRORS as exc:
        raise _damaged(path, exc) from exc
    except (lmdb.Error, OSError) as exc:
        _raise_if_no_room(path, exc)
        raise


# A full disk, as LMDB reports it; py-lmdb keeps no errno, only the class or the text.
_NO_ROOM = (
    errno.ENOSPC,  # the disk is full (lmdb.DiskError)
    errno.EDQUOT,  # this user's quota on it is used up
)
# LMDB turns a short write (pwrite wrote fewer bytes than asked, which is how a filesystem
# that fills up in the middle of a write answers) into EIO: "mdb_txn_commit: Input/output
# error". A failing disk says EIO as well, so EIO means a full disk only when less than this
# much room is left (after the short write, next to none is). A quota that runs out mid-write
# does not show in statvfs: that EIO is re-raised as it is.
_NEARLY_FULL = 1 << 20


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, lmdb.DiskError):
        return errno.ENOSPC
    if isinstance(exc, lmdb.Error):
        text = str(exc)
        return next((code for code in (*_NO_ROOM, errno.EIO) if text.endswith(os.strerror(code))), None)
    return None


def _room_left(path: Path) -> int:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    st = os.statvfs(existing)
    return st.f_bavail * st.f_frsize


def _refuse_new_lock_file_on_full_disk(env_path: Path) -> None:
    """LMDB makes a new lock.mdb by extending it and writing through a shared map: on a full
    disk the kernel can find no page for that write and kills the process with SIGBUS (seen on
    a full tmpfs), so no exception could say why. Refuse first."""
    if not (env_path / "lock.mdb").exists() and _room_left(env_path) < _NEARLY_FULL:
        _raise_if_no_room(env_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def _raise_if_no_room(env_path: Path, exc: BaseException) -> None:
    """Raise CacheFull if ``exc`` says the disk of the environment at ``env_path`` is full."""
    code = _errno_of(exc)
    if code is None or (
        code not in _NO_ROOM and not (code == errno.EIO and _room_left(env_path) < _NEARLY_FULL)
    ):
        return
    # <cache directory>/projects/<project id>: the message names the cache directory.
    raise CacheFull(str(env_path.parent.parent), code, f"writing {env_path}: {os.strerror(code)}") from exc


# Opening an environment that another process is writing right then: see _open_env.
_OPEN_ATTEMPTS = 10


def _open_env(path: Path, map_size: int, *, readonly: bool = False) -> Any:
    # lmdb.open begins a transaction at once, which LMDB refuses (MDB_MAP_RESIZED) if another
    # process has written past this process's map in between: a writer appending grows the
    # file all the time. A map twice the file's size leaves it room to grow meanwhile; a retry
    # (the refused environment is already closed) covers a writer faster than that.
    with suppress(FileNotFoundError):  # not written yet
        map_size = max(map_size, 2 * (path / _DATA_FILE).stat().st_size)
    _refuse_new_lock_file_on_full_disk(path)
    # A data.mdb shorter than its header says kills the process with SIGBUS once LMDB reads a
    # missing page through its map, with no message, and on every later open again (an agent
    # would die in a loop): refused here, before LMDB maps it.
    with _translate(path):
        truncated = missing_pages(path)
    if truncated is not None:
        raise CacheCorrupt(str(path), truncated)
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            with _translate(path):
                # sync/metasync off: a commit is not fsynced. A crashed process loses
                # nothing (the page cache keeps its writes); a crashed host may lose or
                # damage the last commits, which the durable copy in the project store
                # (written by flush) exists to cover. Call CacheStore.sync() to force it.
                return lmdb.open(
                    str(path),
                    subdir=True,
                    map_size=map_size,
                    max_dbs=_MAX_DBS,
                    sync=False,
                    metasync=False,
                    readonly=readonly,
                    create=False,
                )
        except lmdb.MapResizedError:
            if attempt == _OPEN_ATTEMPTS - 1:
                raise
            map_size *= 2
    raise AssertionError("unreachable")


def _begin_fresh(env: Any, **kwargs: Any) -> Any:
    """Begin the first transaction on an environment this process has just opened.

    Another process may write past the end of this process's map at any moment (a writer
    appending grows the file, and the map, over and over); LMDB then refuses new transactions
    with MDB_MAP_RESIZED until this process adopts the new size. Here that is safe: no
    transaction of this process uses the environment yet, so nothing can dangle.
    """
    while True:
        try:
            return env.begin(**kwargs)
        except lmdb.MapResizedError:
            env.set_mapsize(0)  # 0: the size the other process recorded


def _adopt_map_size(path: Path, shared: _Shared) -> None:
    """Take the size another process grew the map to, unless a reader of this process could
    still hold views into the current map, which a remap would leave dangling."""
    if shared.readers:
        raise CacheError(
            f"cache environment {path} must grow its map while a reader() is "
            f"open in this process; finish reading before writing more"
        )
    with _translate(path):
        shared.env.set_mapsize(0)


def _begin_shared(path: Path, shared: _Shared, **kwargs: Any) -> Any:
    """Begin a transaction on an environment this process shares between its stores."""
    while True:
        try:
            with _translate(path):
                return shared.env.begin(**kwargs)
        except lmdb.MapResizedError:
            _adopt_map_size(path, shared)


def _check_format(path: Path, txn: Any, meta: Any, *, write: bool) -> bool:
    """Whether the environment holds cache format ``_FORMAT``; False if it holds nothing yet.

    An empty environment gets the format recorded when ``write``. Raises CacheCorrupt
    for any other format: its records cannot be read.
    """
    value = txn.get(_FORMAT_KEY, None, meta)
    if value == _FORMAT_VALUE:
        return True
    if value is not None:
        found = f"cache format {_U64.unpack(value)[0]}" if len(value) == _U64.size else "an unknown format"
    elif txn.stat(meta)["entries"]:
        found = "cache format 1, by an earlier dbguard"  # format 1 recorded no format
    else:
        if write:
            txn.put(_FORMAT_KEY, _FORMAT_VALUE, db=meta)
        return False
    raise CacheCorrupt(str(path), f"written in {found}; this dbguard reads cache format {_FORMAT} only")


@dataclass
class _Shared:
    """An environment opened once per process and shared by its stores."""

    env: Any
    records: Any
    dirty: Any
    meta: Any
    users: int = 0
    readers: int = 0
    path: str = ""  # the environment's directory, for messages


class _Registry:
    """The environments this process has open, by path."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._pid = os.getpid()
        self._open: dict[str, _Shared] = {}

    def _current(self) -> dict[str, _Shared]:
        if self._pid != os.getpid():
            # Forked: the parent's environments must not be used (nor closed) here.
            self._pid = os.getpid()
            self._open = {}
        return self._open

    def get(self, path: Path) -> _Shared | None:
        with self.lock:
            return self._current().get(str(path))

    def acquire(self, path: Path, map_size: int) -> _Shared:
        with self.lock:
            shared = self._current().get(str(path))
            if shared is None:
                shared = _open_shared(path, map_size)
                self._open[str(path)] = shared
            shared.users += 1
            return shared

    def release(self, path: Path, shared: _Shared) -> None:
        with self.lock:
            if self._current().get(str(path)) is not shared:
                return
            shared.users -= 1
            if shared.users == 0:
                del self._open[str(path)]
                shared.env.close()


_REGISTRY = _Registry()


def _open_shared(path: Path, map_size: int) -> _Shared:
    env = _open_env(path, map_size)
    try:
        # One write transaction creates the databases and records the format.
        with _translate(path), _begin_fresh(env, write=True) as txn:
            records, dirty, meta = (env.open_db(name, txn=txn) for name in (_RECORDS, _DIRTY, _META))
            _check_format(path, txn, meta, write=True)
    except BaseException:
        env.close()
        raise
    return _Shared(env, records, dirty, meta, path=str(path))


def _get_u64(txn: Any, db: Any, key: bytes) -> int:
    value = txn.get(key, None, db)
    if value is None:
        return 0
    try:
        return int(_U64.unpack(value)[0])
    except struct.error as exc:
        raise _garbled(f"meta {key!r}", value) from exc


def _put_u64(txn: Any, db: Any, key: bytes, value: int) -> None:
    txn.put(key, _U64.pack(value), True, True, False, db)


def _read_count(txn: Any, meta: Any, key: bytes) -> tuple[int, bytes]:
    """A database's count, and what its records' layouts have in common (see ``_MIXED``)."""
    value = txn.get(key, None, meta)
    if value is None:
        return 0, b""
    try:
        return int(_U64.unpack_from(value)[0]), bytes(value[_U64.size :])
    except struct.error as exc:
        raise _garbled(f"meta {bytes(key)!r}", value) from exc


def _dirty_bytes(txn: Any, meta: Any) -> int:
    value = txn.get(_STATE, None, meta)
    return 0 if value is None else int(_state(value)[1])


def _state(value: bytes | memoryview) -> tuple[int, int]:
    """The last sequence number and the sum of dirty sizes, from meta ``state``."""
    try:
        seq, dirty = _STATE_VALUE.unpack(value)
    except struct.error as exc:
        raise _garbled("meta state", value) from exc
    return int(seq), int(dirty)


def _dirty_value(value: bytes | memoryview) -> tuple[int, int]:
    """A dirty mark's sequence number and record size."""
    try:
        seq, size = _DIRTY_VALUE.unpack(value)
    except struct.error as exc:
        raise _garbled("a dirty mark", value) from exc
    return int(seq), int(size)


# -- writing ------------------------------------------------------------------------


# One record ready to be written: its index, its key and its parts.
_Item = tuple[int, bytes, _Parts]


def _item(db: str, index: int, array: NDArray[Any], attrs: bytes) -> _Item:
    key = _record_key(db, index)  # validated before anything is done with a large array
    return index, key, _prepare(array, attrs)


def _store(
    txn: Any,
    s: _Shared,
    names: _Names,
    items: Sequence[_Item],
    counted: tuple[int, bytes] | None = None,
    *,
    gated: bool = False,
) -> None:
    """Write ``items`` and their dirty marks, and keep ``state`` and the count in step.

    ``counted`` is what `_read_count` returned when the caller has read it in this
    transaction. ``gated`` refuses the write unless the environment is announced; the
    check is in the writing transaction itself, so a `settle` cannot slip between the
    check and the write (LMDB serialises write transactions).
    """
    records, meta = s.records, s.meta
    if gated and txn.get(_ANNOUNCED, None, meta) is None:
        raise DirtyNotAnnounced(str(s.path))
    count, common = counted or _read_count(txn, meta, names.count_key)
    state = txn.get(_STATE, None, meta)
    seq, dirty = (0, 0) if state is None else _state(state)
    top, shared_layout = count, common
    for position, key, (layout, header, payload, size) in items:
        seq += 1
        old = txn.replace(key, _DIRTY_VALUE.pack(seq, size), s.dirty)
        if old is not None:
            dirty -= _dirty_value(old)[1]
        dirty += size
        txn.put(key, payload, True, True, False, records)
        txn.put(key + _HEADER_SUFFIX, header, True, True, False, records)
        if position >= top:
            top = position + 1
        if layout != shared_layout:
            shared_layout = layout if not shared_layout else _MIXED
    txn.put(_STATE, _STATE_VALUE.pack(seq, dirty), True, True, False, meta)
    if top != count or shared_layout != common:
        txn.put(names.count_key, _U64.pack(top) + shared_layout, True, True, False, meta)


def _append(txn: Any, s: _Shared, names: _Names, parts: _Parts, gated: bool, once: bytes | None) -> int:
    if once is not None:
        done = txn.get(_ONCE_PREFIX + once, None, s.meta)
        if done is not None:
            return int(_ONCE_VALUE.unpack(done)[0])
    counted = _read_count(txn, s.meta, names.count_key)
    index = counted[0]
    _store(txn, s, names, [(index, names.prefix + _U64.pack(index), parts)], counted, gated=gated)
    if once is not None:
        txn.put(_ONCE_PREFIX + once, _ONCE_VALUE.pack(index, time.time()), True, True, False, s.meta)
    return index


def _clean(txn: Any, s: _Shared, entries: list[tuple[bytes, int]]) -> int:
    cleaned = 0
    for key, seq in entries:
        current = txn.get(key, None, s.dirty)
        if current is None:
            continue
        current_seq, size = _dirty_value(current)
        # A record re-written after the snapshot has a newer seq: the flush
        # did not carry that version, so it stays dirty.
        if current_seq == seq:
            txn.delete(key, db=s.dirty)
            cleaned += int(size)
    if cleaned:
        last, dirty = _state(txn.get(_STATE, None, s.meta) or b"")
        txn.put(_STATE, _STATE_VALUE.pack(last, dirty - cleaned), True, True, False, s.meta)
    return cleaned


def _batches(items: list[_Item], limit: int) -> Iterator[list[_Item]]:
    """Consecutive runs of ``items`` whose payloads add up to at most ``limit`` bytes (or
    one item, if it alone is larger)."""
    batch: list[_Item] = []
    total = 0
    for item in items:
        size = item[2][3]
        if batch and total + size > limit:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size
    if batch:
        yield batch


# -- reading ------------------------------------------------------------------------


class Reader:
    """Zero-copy access to records inside one read transaction.

    Arrays and memoryviews it returns point into the LMDB map: they are read-only and
    valid only until the ``with store.reader()`` block ends. Copy what must outlive it.
    """

    def __init__(self, txn: Any, shared: _Shared, path: Path) -> None:
        self._txn = txn
        # Gets from records: the transaction's default database (see _begin_read), as a
        # get that names its database costs a tenth of a microsecond more.
        self._get = txn.get
        self._s = shared
        self._path = path
        # Per database, the layout its records share in this snapshot (None: they do not).
        self._common: dict[str, _Layout | None] = {}

    def _missing(self, db: str, index: int) -> KeyError:
        return KeyError(f"no record {index} in database {db!r} of cache {self._path}")

    def _corrupt(self, db: str, index: int, detail: str) -> CacheCorrupt:
        return CacheCorrupt(str(self._path), f"record {db}[{index}]: {detail}")

    def _header(self, db: str, index: int, key: bytes) -> tuple[_Layout, bytes, int]:
        """The record's layout, header and where its attrs start; KeyError if absent."""
        value = self._get(key + _HEADER_SUFFIX)
        if value is None:
            raise self._missing(db, index)
        header = bytes(value)
        layout = _LAYOUTS.get(header)
        if layout is not None:
            return layout, header, len(header)
        try:
            layout, attrs_at = _layout(header)
        except ValueError as exc:
            raise self._corrupt(db, index, str(exc)) from exc
        return layout, header, attrs_at

    def _payload(self, db: str, index: int, key: bytes, layout: _Layout) -> memoryview:
        data: memoryview | None = self._get(key)
        if data is None or len(data) != layout.nbytes:
            raise self._bad_payload(db, index, data, layout)
        return data

    def _bad_payload(self, db: str, index: int, data: memoryview | None, layout: _Layout) -> CacheCorrupt:
        found = "no payload" if data is None else f"a payload of {len(data)} bytes"
        return self._corrupt(db, index, f"has {found}, not the {layout.nbytes} bytes of {layout.shape}")

    def record(self, db: str, index: int) -> Record:
        """Return the record ``index`` of ``db``; KeyError if there is none."""
        key = _record_key(db, index)
        layout, header, attrs_at = self._header(db, index, key)
        data = self._payload(db, index, key, layout)
        return Record(layout.dtype_str, layout.shape, header[attrs_at:], data)

    def _common_layout(self, db: str) -> _Layout | None:
        """The layout every record of ``db`` has in this snapshot, if they share one."""
        _, common = _read_count(self._txn, self._s.meta, _names(db).count_key)
        layout = None
        if len(common) > len(_MIXED):
            try:
                layout = _layout(common)[0]
            except ValueError as exc:
                raise CacheCorrupt(str(self._path), f"count of database {db!r}: {exc}") from exc
        self._common[db] = layout
        return layout

    def array(self, db: str, index: int) -> NDArray[Any]:
        """Return a read-only view of the array of record ``index`` of ``db``."""
        # The hot path of zero-copy reads, as lean as a bare get: _record_key and _payload
        # inlined (a call costs a tenth of a microsecond), no header read when the records
        # of the database share their layout, no Record built.
        names = _NAMES.get(db)
        if names is None or type(index) is not int:
            key = _record_key(db, index)
        else:
            try:
                key = names.prefix + _U64.pack(index)
            except struct.error:
                key = _record_key(db, index)  # out of range: raises ValueError
        try:
            common = self._common[db]
        except KeyError:
            common = self._common_layout(db)
        layout = common if common is not None else self._header(db, index, key)[0]
        data = self._get(key)
        if data is None or len(data) != layout.nbytes:
            if data is None and common is not None:
                raise self._missing(db, index)  # no header was read to say it exists
            raise self._bad_payload(db, index, data, layout)
        if layout.nbytes:
            # One call where frombuffer().reshape() makes two (0.3 us instead of 0.55);
            # read-only, as data is.
            return np.ndarray(layout.shape, layout.dtype, data)
        return _empty(layout.dtype, layout.shape)

    def attrs(self, db: str, index: int) -> bytes:
        """Return the attrs blob of record ``index`` of ``db``."""
        _, header, attrs_at = self._header(db, index, _record_key(db, index))
        return header[attrs_at:]

    def count(self, db: str) -> int:
        """Return one past the highest index written in ``db`` (0 if none)."""
        return _read_count(self._txn, self._s.meta, _names(db).count_key)[0]

    def databases(self) -> list[str]:
        """Return the names of the databases that hold records, sorted."""
        names: list[str] = []
        with self._txn.cursor(db=self._s.meta) as cursor:
            if not cursor.set_range(_COUNT_PREFIX):
                return names
            for key in cursor.iternext(keys=True, values=False):
                raw = bytes(key)
                if not raw.startswith(_COUNT_PREFIX):
                    break
                try:
                    names.append(raw[len(_COUNT_PREFIX) :].decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise _garbled("a database name", raw) from exc
        return names

    def dirty_bytes(self) -> int:
        """Return the total size of records not flushed yet."""
        return _dirty_bytes(self._txn, self._s.meta)

    def dirty_entries(self) -> list[DirtyEntry]:
        """Return the dirty records, sorted by ``(db, index)``.

        Key order is already ``(db, index)``: UTF-8 bytes sort like code points, the
        NUL separator sorts a name before its extensions, and indexes are big-endian.
        """
        entries: list[DirtyEntry] = []
        with self._txn.cursor(db=self._s.dirty) as cursor:
            for key, value in cursor:
                db, index = _split_key(bytes(key))
                seq, size = _dirty_value(value)
                entries.append(DirtyEntry(db, index, int(seq), int(size)))
        return entries


class CacheStore:
    """The cached records of one project, in an LMDB environment under ``root``.

    ``root`` is a cache directory already vetted by ``prepare_cache_dir``. The store
    knows nothing of leases: it keeps records, marks them dirty when written, hands
    dirty entries to a flush and forgets the marks the flush reports done.
    """

    def __init__(
        self,
        root: Path,
        project_id: str,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        create: bool = True,
        require_announced: bool = False,
    ) -> None:
        """``require_announced`` makes every write raise `DirtyNotAnnounced` until the owner
        has called :meth:`announce` (and again after :meth:`settle` found it clean)."""
        self.path = _project_path(root, project_id)
        self.project_id = project_id
        self._gated = require_announced
        if create:
            with _translate(self.path):
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not (self.path / _DATA_FILE).is_file():
            raise FileNotFoundError(f"no cache environment for project {project_id} at {self.path}")
        self._pid = os.getpid()
        self._shared: _Shared | None = _REGISTRY.acquire(self.path, map_size)

    # -- plumbing -------------------------------------------------------------

    def _live(self) -> _Shared:
        if self._shared is None:
            raise CacheError(f"cache store {self.path} is closed")
        if self._pid != os.getpid():
            raise CacheError(
                f"cache store {self.path} was opened before fork(): an LMDB environment "
                f"cannot be used across a fork; open a new CacheStore in this process"
            )
        return self._shared

    def _resize(self, shared: _Shared, size: int) -> None:
        # Resizing remaps the file: views held by an open reader would dangle.
        if shared.readers:
            raise CacheError(
                f"cache environment {self.path} must grow its map while a reader() is "
                f"open in this process; finish reading before writing more"
            )
        with _translate(self.path):
            shared.env.set_mapsize(size)

    def _grow(self, shared: _Shared) -> None:
        before = int(shared.env.info()["map_size"])
        # Another process may already have grown the map; size 0 adopts its size.
        self._resize(shared, 0)
        if int(shared.env.info()["map_size"]) <= before:
            self._resize(shared, before * 2)

    def _write(self, fn: Callable[[Any, _Shared], _T]) -> _T:
        shared = self._live()
        try:
            while True:
                try:
                    with shared.env.begin(None, None, True) as txn:  # write=True
                        return fn(txn, shared)
                except lmdb.MapFullError:
                    # The aborted transaction is gone; growing happens outside any.
                    self._grow(shared)
                except lmdb.MapResizedError:
                    self._resize(shared, 0)
        except _DAMAGE_ERRORS as exc:
            raise _damaged(self.path, exc) from exc
        except lmdb.Error as exc:
            _raise_if_no_room(self.path, exc)
            raise

    def _begin_read(self, shared: _Shared) -> Any:
        # records by default: Reader gets from it without naming it.
        return _begin_shared(self.path, shared, db=shared.records, buffers=True)

    @contextmanager
    def reader(self) -> Iterator[Reader]:
        """Yield a :class:`Reader` over one consistent snapshot, for zero-copy reads."""
        shared = self._live()
        txn = self._begin_read(shared)
        shared.readers += 1
        try:
            with _translate(self.path), txn:
                yield Reader(txn, shared, self.path)
        finally:
            shared.readers -= 1

    # -- writing --------------------------------------------------------------

    def put(self, db: str, index: int, array: NDArray[Any], attrs: bytes = b"") -> None:
        """Store ``array`` as record ``index`` of ``db`` and mark it dirty."""
        names = _names(db)
        items = [_item(db, index, array, attrs)]
        self._write(lambda txn, s: _store(txn, s, names, items, gated=self._gated))

    def put_many(self, db: str, items: Iterable[tuple[int, NDArray[Any], bytes]]) -> None:
        """Store several ``(index, array, attrs)`` records, marked dirty like :meth:`put`.

        They are written in order, in transactions of about a MiB each (one per record for
        larger ones): a batch is not atomic as a whole, and a crash part way through leaves
        the records before some point written. Every item is checked before any is written.
        """
        names = _names(db)
        # Prepared up front: a retry after growing the map must not re-read a consumed
        # iterator, and a bad item must stop the batch before anything is written.
        prepared = [_item(db, index, array, attrs) for index, array, attrs in items]
        for batch in _batches(prepared, _MANY_TXN_BYTES):
            self._write(functools.partial(_store, names=names, items=batch, gated=self._gated))

    def append(self, db: str, array: NDArray[Any], attrs: bytes = b"", *, once: bytes | None = None) -> int:
        """Store ``array`` at index ``count(db)``, decided inside the transaction.

        ``once`` (at most 128 bytes) makes the append idempotent: an append with a key already
        used returns the index the first one was given and writes nothing. The key is kept in
        the same transaction as the record, so a crash keeps both or neither."""
        if once is not None and not 0 < len(once) <= _MAX_ONCE_KEY:
            raise ValueError(f"an append's once key must be 1 to {_MAX_ONCE_KEY} bytes")
        names = _names(db)
        parts = _prepare(array, attrs)
        return self._write(lambda txn, s: _append(txn, s, names, parts, self._gated, once))

    def append_many(self, db: str, items: Sequence[tuple[NDArray[Any], bytes, bytes | None]]) -> list[int]:
        """`append` each ``(array, attrs, once)`` in order, all in one transaction: the records
        and their once keys are all kept, or none. Their indices."""
        names = _names(db)
        for _, _, once in items:
            if once is not None and not 0 < len(once) <= _MAX_ONCE_KEY:
                raise ValueError(f"an append's once key must be 1 to {_MAX_ONCE_KEY} bytes")
        prepared = [(_prepare(array, attrs), once) for array, attrs, once in items]

        def run(txn: Any, s: _Shared) -> list[int]:
            return [_append(txn, s, names, parts, self._gated, once) for parts, once in prepared]

        return self._write(run)

    def forget_once(self, older_than: float) -> int:
        """Drop the once keys of appends made before the wall time ``older_than`` (nobody
        resends a request that old); returns how many were dropped."""

        def run(txn: Any, s: _Shared) -> int:
            stale = []
            cursor = txn.cursor(s.meta)
            if cursor.set_range(_ONCE_PREFIX):
                for key, value in cursor:
                    if not bytes(key).startswith(_ONCE_PREFIX):
                        break
                    if _ONCE_VALUE.unpack(value)[1] < older_than:
                        stale.append(bytes(key))
            for key in stale:
                txn.delete(key, db=s.meta)
            return len(stale)

        return self._write(run)

    def raise_count(self, db: str, floor: int) -> int:
        """Make `append` number records from at least ``floor`` on: records the cache does
        not hold (already in a durable copy elsewhere) must not be overwritten by appends."""
        key = _names(db).count_key

        def run(txn: Any, s: _Shared) -> int:
            count, common = _read_count(txn, s.meta, key)
            if floor > count:
                count = floor
                txn.put(key, _U64.pack(count) + common, True, True, False, s.meta)
            return count

        return self._write(run)

    def mark_flushed(self, entries: Iterable[DirtyEntry]) -> int:
        """Clear the dirty marks of flushed entries; return the bytes cleaned.

        An entry is cleared only if its record still has the sequence number of the
        snapshot: a record re-written since then stays dirty.
        """
        keys = [(_record_key(e.db, e.index), e.seq) for e in entries]
        return self._write(lambda txn, s: _clean(txn, s, keys))

    def announce(self) -> None:
        """Record that the owner has been told this environment may hold dirty records:
        writes of a store with ``require_announced`` go through until `settle`."""

        def run(txn: Any, s: _Shared) -> None:
            txn.put(_ANNOUNCED, b"\x01", True, True, False, s.meta)

        self._write(run)

    def announced(self) -> bool:
        """Whether the environment is announced (see :meth:`announce`)."""
        shared = self._live()
        with _begin_shared(self.path, shared) as txn, _translate(self.path):
            return txn.get(_ANNOUNCED, None, shared.meta) is not None

    def settle(self) -> bool:
        """Withdraw the announcement if nothing is dirty, in one transaction; return whether
        the environment is now clean and unannounced. After True, the owner may say that
        this host holds nothing unflushed: the next gated write must announce first."""

        def run(txn: Any, s: _Shared) -> bool:
            if _dirty_bytes(txn, s.meta):
                return False
            txn.delete(_ANNOUNCED, db=s.meta)
            return True

        shared = self._live()
        with _begin_shared(self.path, shared) as txn, _translate(self.path):
            if _dirty_bytes(txn, shared.meta):
                return False
            if txn.get(_ANNOUNCED, None, shared.meta) is None:
                return True
        return self._write(run)

    def note(self, **values: int) -> None:
        """Remember small counters about this cache for its owner (the cache gives them no
        meaning), such as the generation of the durable copy it was last flushed to."""

        def run(txn: Any, s: _Shared) -> None:
            for name, value in values.items():
                _put_u64(txn, s.meta, _NOTE_PREFIX + name.encode(), value)

        self._write(run)

    def noted(self, name: str) -> int:
        """A counter stored with `note`, or 0."""
        shared = self._live()
        with _begin_shared(self.path, shared) as txn, _translate(self.path):
            return _get_u64(txn, shared.meta, _NOTE_PREFIX + name.encode())

    def sync(self) -> None:
        """Force committed data to disk (commits are not synced one by one)."""
        with _translate(self.path):
            self._live().env.sync(True)

    # -- reading --------------------------------------------------------------

    def get(self, db: str, index: int) -> NDArray[Any]:
        """Return a writable copy of record ``index`` of ``db``; KeyError if absent.

        Use :meth:`reader` to read without copying.
        """
        with self.reader() as r:
            return r.array(db, index).copy()

    def attrs(self, db: str, index: int) -> bytes:
        """Return the attrs blob of record ``index`` of ``db``; KeyError if absent."""
        with self.reader() as r:
            return r.attrs(db, index)

    def count(self, db: str) -> int:
        """Return one past the highest index written in ``db``.

        Like ``len()`` of an image database: writing index 9 of an empty database
        makes its count 10, so :meth:`append` never overwrites.
        """
        with self.reader() as r:
            return r.count(db)

    def databases(self) -> list[str]:
        """Return the names of the databases that hold records, sorted."""
        with self.reader() as r:
            return r.databases()

    def dirty_bytes(self) -> int:
        """Return the total size of records not flushed yet."""
        with self.reader() as r:
            return r.dirty_bytes()

    def dirty_entries(self) -> list[DirtyEntry]:
        """Return a snapshot of the dirty records, sorted by ``(db, index)``."""
        with self.reader() as r:
            return r.dirty_entries()

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Release the environment (closed when the process's last store closes)."""
        shared, self._shared = self._shared, None
        if shared is not None and self._pid == os.getpid():
            _REGISTRY.release(self.path, shared)

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def drop(root: Path, project_id: str) -> None:
        """Remove the project's environment, dirty records included.

        Refused while this process has a store of the project open. Other processes
        must have closed theirs (``dbguard clear`` checks that): LMDB would keep
        writing to the unlinked files.
        """
        path = _project_path(root, project_id)
        with _REGISTRY.lock:
            _refuse_if_open(path, project_id, "drop")
            if not path.exists():
                return
            # Renamed first so that a concurrent open sees the whole environment or
            # none of it, never a half-deleted one.
            doomed = path.with_name(f".drop-{project_id}-{uuid.uuid4().hex}")
            os.rename(path, doomed)
        shutil.rmtree(doomed)

    @staticmethod
    def set_aside(root: Path, project_id: str, label: str) -> Path | None:
        """Move the project's environment, dirty records and all, out of the way.

        It lands in ``root/aside/<label>/projects/<project_id>``, so that
        ``CacheStore(root / "aside" / label, project_id)`` opens it again for recovery,
        while the project starts afresh here. Returns the aside root, or None if there
        was nothing to move. Refused, like `drop`, while this process has it open.
        """
        path = _project_path(root, project_id)
        aside_root = Path(root) / ASIDE / label
        with _REGISTRY.lock:
            _refuse_if_open(path, project_id, "set aside")
            if not path.exists():
                return None
            target = _project_path(aside_root, project_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        return aside_root

    @staticmethod
    def exists(root: Path, project_id: str) -> bool:
        """Whether the project has a cache environment here."""
        return (_project_path(root, project_id) / _DATA_FILE).is_file()

    @staticmethod
    def dirty_bytes_of(root: Path, project_id: str) -> int:
        """Return the project's dirty bytes; 0, creating nothing, if it has no cache."""
        path = _project_path(root, project_id)
        with _REGISTRY.lock:
            shared = _REGISTRY.get(path)
            if shared is not None:
                with _begin_shared(path, shared) as txn, _translate(path):
                    return _dirty_bytes(txn, shared.meta)
            if not (path / _DATA_FILE).is_file():
                return 0
            # Held under the registry lock so that no store of this process opens
            # the environment while this second handle exists.
            return _read_dirty_bytes(path)


def _refuse_if_open(path: Path, project_id: str, verb: str) -> None:
    """Moving or deleting an environment this process has open would leave its stores
    writing to unlinked files; call with the registry lock held."""
    if _REGISTRY.get(path) is not None:
        raise CacheError(
            f"cannot {verb} cache environment {path}: this process still has it "
            f"open; close every CacheStore of project {project_id} first"
        )


def _read_dirty_bytes(path: Path) -> int:
    if (path / _DATA_FILE).stat().st_size == 0:
        # Its creator died before LMDB wrote the first pages: nothing was ever committed.
        return 0
    try:
        env = _open_env(path, DEFAULT_MAP_SIZE, readonly=True)
    except lmdb.Error as exc:
        raise CacheCorrupt(str(path), f"cannot open read-only: {exc}") from exc
    try:
        with _translate(path), _begin_fresh(env) as txn:
            try:
                meta = env.open_db(_META, txn=txn, create=False)
            except lmdb.NotFoundError:
                return 0
            # An environment of another format must not pass for one with nothing
            # dirty: a caller would then drop it.
            _check_format(path, txn, meta, write=False)
            return _dirty_bytes(txn, meta)
    finally:
        env.close()
