"""One LMDB environment per project, holding image records and their dirty marks.

Layout: ``<cache_dir>/projects/<project_id>/`` is an LMDB environment (``subdir=True``)
with three named databases:

``records``
    key ``db_name + b"\\x00" + index`` (8 bytes, big-endian, so keys sort by
    ``(db, index)``); value = header + attrs + padding + raw array bytes (see
    :func:`encode_record`).
``dirty``
    same keys; value = write sequence number and record size, 8 bytes big-endian
    each. A key is present while the record has not been flushed.
``meta``
    ``seq`` (last sequence number), ``dirty_bytes`` (sum of dirty sizes) and
    ``count:<db>`` (one past the highest index written), 8 bytes big-endian each.

Several processes of one host may write one environment at once: LMDB serialises
writers with the mutex in its lock file. Open a :class:`CacheStore` after ``fork()``,
never before: an LMDB environment must not be used across a fork, and one that was
inherited is refused. Within a process, stores of the same project share one LMDB
environment, because LMDB forbids opening an environment twice in one process
(closing the second copy would drop the first one's POSIX locks). A store is meant
for one thread at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import lmdb
import numpy as np
from numpy.typing import NDArray

from cache.errors import CacheCorrupt, CacheError

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

_RECORDS = b"records"
_DIRTY = b"dirty"
_META = b"meta"
_SEQ = b"seq"
_DIRTY_BYTES = b"dirty_bytes"
_COUNT_PREFIX = b"count:"
_NOTE_PREFIX = b"note:"

_U64 = struct.Struct(">Q")
_DIRTY_VALUE = struct.Struct(">QQ")  # sequence number, record size

# Record header: magic, format version, ndim, len(dtype), len(attrs), payload offset,
# payload length. Followed by ndim u64 dimensions, the dtype string, the attrs blob,
# zero padding up to the payload offset, and the payload.
_MAGIC = b"DBGC"
_FORMAT = 1
_HEADER = struct.Struct("<4sBBHIIQ")
# 16 bytes covers the alignment of every numpy scalar type up to complex128. LMDB
# places values larger than about half a page on their own overflow pages, 16 bytes
# after a page boundary, so there the payload is aligned in memory too; small values
# share a leaf page and may be unaligned, which numpy handles (just more slowly).
_ALIGN = 16

# LMDB errors that mean the files are damaged or are not an environment we can
# read, as opposed to usage errors or full maps.
_DAMAGE_ERRORS: tuple[type[BaseException], ...] = (
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
        dtype = np.dtype(self.dtype)
        if self.data.nbytes == 0 or dtype.itemsize == 0:
            # frombuffer refuses zero-sized items; there is nothing to share anyway.
            empty = np.empty(self.shape, dtype=dtype)
            empty.flags.writeable = False
            return empty
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


@dataclass(frozen=True)
class DirtyEntry:
    """A record written since its last flush, as of one snapshot."""

    db: str
    index: int
    seq: int
    size: int


def _check_dtype(dtype: np.dtype[Any]) -> None:
    if dtype.hasobject or dtype.fields is not None:
        raise TypeError(
            f"cannot cache an array of dtype {dtype}: only plain numeric, boolean and "
            f"fixed-width string dtypes have a byte layout that can be stored"
        )


def encode_record(array: NDArray[Any], attrs: bytes = b"") -> bytes:
    """Encode ``array`` and the opaque ``attrs`` blob as one record value.

    The payload starts at a multiple of 16 bytes from the start of the value, so
    ``numpy.frombuffer`` over it can be aligned for every dtype.
    """
    arr = np.asarray(array)
    _check_dtype(arr.dtype)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    dtype = arr.dtype.str.encode("ascii")
    attrs = bytes(attrs)
    header_len = _HEADER.size + 8 * arr.ndim + len(dtype) + len(attrs)
    offset = -(-header_len // _ALIGN) * _ALIGN
    header = _HEADER.pack(_MAGIC, _FORMAT, arr.ndim, len(dtype), len(attrs), offset, arr.nbytes)
    dims = struct.pack(f"<{arr.ndim}Q", *arr.shape)
    # reshape(-1) also turns a 0-d array into something that can be viewed as bytes.
    payload = arr.reshape(-1).view(np.uint8).data
    return b"".join((header, dims, dtype, attrs, bytes(offset - header_len), payload))


def decode_record(value: bytes | memoryview) -> Record:
    """Decode a record value without copying its payload.

    Raises ValueError when the value is not a record of a format this code knows.
    """
    buf = memoryview(value)
    try:
        magic, fmt, ndim, dtype_len, attrs_len, offset, length = _HEADER.unpack_from(buf)
        if magic != _MAGIC or fmt != _FORMAT:
            raise ValueError(f"record has magic {magic!r} format {fmt}, not {_MAGIC!r} {_FORMAT}")
        pos = _HEADER.size
        shape = struct.unpack_from(f"<{ndim}Q", buf, pos)
    except struct.error as exc:
        raise ValueError(f"record of {buf.nbytes} bytes is shorter than its header") from exc
    pos += 8 * ndim
    dtype = bytes(buf[pos : pos + dtype_len]).decode("ascii")
    pos += dtype_len
    attrs = bytes(buf[pos : pos + attrs_len])
    pos += attrs_len
    if pos > offset or offset + length != buf.nbytes:
        raise ValueError(f"record lengths do not add up to its {buf.nbytes} bytes")
    return Record(dtype=dtype, shape=tuple(shape), attrs=attrs, data=buf[offset:])


def _check_db(db: str) -> bytes:
    name = db.encode("utf-8")
    if not name or b"\x00" in name:
        raise ValueError(f"database name {db!r} must be non-empty and contain no NUL")
    return name


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1 << 64:
        raise ValueError(f"record index {index!r} must be an int in [0, 2**64)")
    return index


def _record_key(db: str, index: int) -> bytes:
    return _check_db(db) + b"\x00" + _U64.pack(_check_index(index))


def _split_key(key: bytes) -> tuple[str, int]:
    return key[:-9].decode("utf-8"), _U64.unpack(key[-8:])[0]


def _count_key(db: str) -> bytes:
    return _COUNT_PREFIX + _check_db(db)


def _check_project_id(project_id: str) -> str:
    if not _PROJECT_ID.fullmatch(project_id):
        raise ValueError(
            f"project id {project_id!r} must be letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit"
        )
    return project_id


def _project_path(root: Path | str, project_id: str) -> Path:
    return Path(root) / _PROJECTS / _check_project_id(project_id)


@contextmanager
def _translate(path: Path) -> Iterator[None]:
    try:
        yield
    except _DAMAGE_ERRORS as exc:
        raise CacheCorrupt(str(path), f"{type(exc).__name__}: {exc}") from exc


def _open_env(path: Path, map_size: int, *, readonly: bool = False) -> Any:
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


@dataclass
class _Shared:
    """An environment opened once per process and shared by its stores."""

    env: Any
    records: Any
    dirty: Any
    meta: Any
    users: int = 0
    readers: int = 0


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
        with _translate(path):
            dbs = [env.open_db(name, create=True) for name in (_RECORDS, _DIRTY, _META)]
    except BaseException:
        env.close()
        raise
    return _Shared(env, *dbs)


def _get_u64(txn: Any, db: Any, key: bytes) -> int:
    value = txn.get(key, db=db)
    return 0 if value is None else int(_U64.unpack(value)[0])


def _put_u64(txn: Any, db: Any, key: bytes, value: int) -> None:
    txn.put(key, _U64.pack(value), db=db)


class _WriteTxn:
    """The record and counter updates of one write transaction."""

    def __init__(self, txn: Any, shared: _Shared) -> None:
        self._txn = txn
        self._s = shared

    def put(self, db: str, index: int, value: bytes) -> None:
        s, txn = self._s, self._txn
        key = _record_key(db, index)
        seq = _get_u64(txn, s.meta, _SEQ) + 1
        old = txn.get(key, db=s.dirty)
        old_size = 0 if old is None else int(_DIRTY_VALUE.unpack(old)[1])
        txn.put(key, value, db=s.records)
        txn.put(key, _DIRTY_VALUE.pack(seq, len(value)), db=s.dirty)
        _put_u64(txn, s.meta, _SEQ, seq)
        dirty = _get_u64(txn, s.meta, _DIRTY_BYTES) + len(value) - old_size
        _put_u64(txn, s.meta, _DIRTY_BYTES, dirty)
        count_key = _count_key(db)
        if index >= _get_u64(txn, s.meta, count_key):
            _put_u64(txn, s.meta, count_key, index + 1)

    def append(self, db: str, value: bytes) -> int:
        index = _get_u64(self._txn, self._s.meta, _count_key(db))
        self.put(db, index, value)
        return index

    def raise_count(self, db: str, floor: int) -> int:
        key = _count_key(db)
        count = max(_get_u64(self._txn, self._s.meta, key), floor)
        _put_u64(self._txn, self._s.meta, key, count)
        return count

    def clean(self, entries: list[tuple[bytes, int]]) -> int:
        s, txn = self._s, self._txn
        cleaned = 0
        for key, seq in entries:
            current = txn.get(key, db=s.dirty)
            if current is None:
                continue
            current_seq, size = _DIRTY_VALUE.unpack(current)
            # A record re-written after the snapshot has a newer seq: the flush
            # did not carry that version, so it stays dirty.
            if current_seq == seq:
                txn.delete(key, db=s.dirty)
                cleaned += int(size)
        if cleaned:
            dirty = _get_u64(txn, s.meta, _DIRTY_BYTES) - cleaned
            _put_u64(txn, s.meta, _DIRTY_BYTES, dirty)
        return cleaned


class Reader:
    """Zero-copy access to records inside one read transaction.

    Arrays and memoryviews it returns point into the LMDB map: they are read-only and
    valid only until the ``with store.reader()`` block ends. Copy what must outlive it.
    """

    def __init__(self, txn: Any, shared: _Shared, path: Path) -> None:
        self._txn = txn
        self._s = shared
        self._path = path

    def record(self, db: str, index: int) -> Record:
        """Return the record ``index`` of ``db``; KeyError if there is none."""
        value = self._txn.get(_record_key(db, index), db=self._s.records)
        if value is None:
            raise KeyError(f"no record {index} in database {db!r} of cache {self._path}")
        try:
            return decode_record(value)
        except ValueError as exc:
            raise CacheCorrupt(str(self._path), f"record {db}[{index}]: {exc}") from exc

    def array(self, db: str, index: int) -> NDArray[Any]:
        """Return a read-only view of the array of record ``index`` of ``db``."""
        return self.record(db, index).array()

    def attrs(self, db: str, index: int) -> bytes:
        """Return the attrs blob of record ``index`` of ``db``."""
        return self.record(db, index).attrs

    def count(self, db: str) -> int:
        """Return one past the highest index written in ``db`` (0 if none)."""
        return _get_u64(self._txn, self._s.meta, _count_key(db))

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
                names.append(raw[len(_COUNT_PREFIX) :].decode("utf-8"))
        return names

    def dirty_bytes(self) -> int:
        """Return the total size of records not flushed yet."""
        return _get_u64(self._txn, self._s.meta, _DIRTY_BYTES)

    def dirty_entries(self) -> list[DirtyEntry]:
        """Return the dirty records, sorted by ``(db, index)``.

        Key order is already ``(db, index)``: UTF-8 bytes sort like code points, the
        NUL separator sorts a name before its extensions, and indexes are big-endian.
        """
        entries: list[DirtyEntry] = []
        with self._txn.cursor(db=self._s.dirty) as cursor:
            for key, value in cursor:
                db, index = _split_key(bytes(key))
                seq, size = _DIRTY_VALUE.unpack(value)
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
    ) -> None:
        self.path = _project_path(root, project_id)
        self.project_id = project_id
        if create:
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

    def _write(self, fn: Callable[[_WriteTxn], _T]) -> _T:
        shared = self._live()
        while True:
            try:
                with _translate(self.path), shared.env.begin(write=True) as txn:
                    return fn(_WriteTxn(txn, shared))
            except lmdb.MapFullError:
                # The aborted transaction is gone; growing happens outside any.
                self._grow(shared)
            except lmdb.MapResizedError:
                self._resize(shared, 0)

    def _begin_read(self, shared: _Shared) -> Any:
        while True:
            try:
                with _translate(self.path):
                    return shared.env.begin(buffers=True)
            except lmdb.MapResizedError:
                self._resize(shared, 0)

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
        _record_key(db, index)  # validate before encoding a large array
        value = encode_record(array, attrs)
        self._write(lambda w: w.put(db, index, value))

    def put_many(self, db: str, items: Iterable[tuple[int, NDArray[Any], bytes]]) -> None:
        """Store several ``(index, array, attrs)`` records in one transaction."""
        # Encoded up front: a retry after growing the map must not re-read a
        # consumed iterator, and the writer lock is held for less time.
        values = [(index, encode_record(array, attrs)) for index, array, attrs in items]
        for index, _ in values:
            _record_key(db, index)

        def run(w: _WriteTxn) -> None:
            for index, value in values:
                w.put(db, index, value)

        self._write(run)

    def append(self, db: str, array: NDArray[Any], attrs: bytes = b"") -> int:
        """Store ``array`` at index ``count(db)``, decided inside the transaction."""
        _check_db(db)
        value = encode_record(array, attrs)
        return self._write(lambda w: w.append(db, value))

    def raise_count(self, db: str, floor: int) -> int:
        """Make `append` number records from at least ``floor`` on: records the cache does
        not hold (already in a durable copy elsewhere) must not be overwritten by appends."""
        _check_db(db)
        return self._write(lambda w: w.raise_count(db, floor))

    def mark_flushed(self, entries: Iterable[DirtyEntry]) -> int:
        """Clear the dirty marks of flushed entries; return the bytes cleaned.

        An entry is cleared only if its record still has the sequence number of the
        snapshot: a record re-written since then stays dirty.
        """
        keys = [(_record_key(e.db, e.index), e.seq) for e in entries]
        return self._write(lambda w: w.clean(keys))

    def note(self, **values: int) -> None:
        """Remember small counters about this cache for its owner (the cache gives them no
        meaning), such as the generation of the durable copy it was last flushed to."""

        def run(w: _WriteTxn) -> None:
            for name, value in values.items():
                _put_u64(w._txn, w._s.meta, _NOTE_PREFIX + name.encode(), value)

        self._write(run)

    def noted(self, name: str) -> int:
        """A counter stored with `note`, or 0."""
        shared = self._live()
        with _translate(self.path), shared.env.begin() as txn:
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
            if _REGISTRY.get(path) is not None:
                raise CacheError(
                    f"cannot drop cache environment {path}: this process still has it "
                    f"open; close every CacheStore of project {project_id} first"
                )
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
            if _REGISTRY.get(path) is not None:
                raise CacheError(
                    f"cannot set aside cache environment {path}: this process still has it "
                    f"open; close every CacheStore of project {project_id} first"
                )
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
                with _translate(path), shared.env.begin() as txn:
                    return _get_u64(txn, shared.meta, _DIRTY_BYTES)
            if not (path / _DATA_FILE).is_file():
                return 0
            # Held under the registry lock so that no store of this process opens
            # the environment while this second handle exists.
            return _read_dirty_bytes(path)


def _read_dirty_bytes(path: Path) -> int:
    if (path / _DATA_FILE).stat().st_size == 0:
        # Its creator died before LMDB wrote the first pages: nothing was ever committed.
        return 0
    try:
        env = _open_env(path, DEFAULT_MAP_SIZE, readonly=True)
    except lmdb.Error as exc:
        raise CacheCorrupt(str(path), f"cannot open read-only: {exc}") from exc
    try:
        with _translate(path):
            try:
                meta = env.open_db(_META, create=False)
            except lmdb.NotFoundError:
                return 0
            while True:
                try:
                    txn = env.begin()
                    break
                except lmdb.MapResizedError:
                    env.set_mapsize(0)  # a writer grew the map since we opened
            with txn:
                return _get_u64(txn, meta, _DIRTY_BYTES)
    finally:
        env.close()
