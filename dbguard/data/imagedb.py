"""Image databases: the library hook for image I/O, `dbguard.open(project, name, mode)`.

Mode ``"r"`` browses: no lease is needed, records come from the newest whole generation of the
project store (plus this host's own unflushed writes when it is the writer). Modes ``"a"`` and
``"w"`` write, and need this host's writer lease: records land in the node-local cache and reach
the project store when the agent flushes. Both writing modes append or overwrite records by
index; neither truncates a database (image stacks are never emptied by opening them).

Reading: ``db[i]`` returns an array that stays valid (a read-only view of a verified local
segment copy, or a copy of a cached record). For zero-copy reads of cached records, use
``with db.reading() as view: view[i]``; those arrays are valid only inside the block.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from dbguard.agent import local as local_agent
from dbguard.agent.lease_check import WriterGuard
from dbguard.cache import CacheError, CacheStore, Reader
from dbguard.data import project as projects
from dbguard.data.flushing import LOCKS, write_announced
from dbguard.data.store import ProjectStore
from dbguard.data.view import StoreView
from dbguard.errors import (
    GuardError,
    LeaseHeld,
    LeaseLost,
    UsageError,
    cache_access,
    cache_errors_translated,
    from_cache_error,
)
from dbguard.lease.protocol import AgentOp
from dbguard.names import DATABASE_NAME_RULE, child, is_database_name
from dbguard.settings import Settings, load

if TYPE_CHECKING:
    from dbguard.data.remote import RemoteDB

MODES = ("r", "a", "w")
# Records per cache transaction in `extend`: large enough that a transaction's cost is spread.
_BATCH_BYTES = 8 << 20

_T = TypeVar("_T")


def writers_lock_path(cache_root: Path, project_id: str) -> Path:
    """Held shared by every process that has the project open for writing (see `clear`)."""
    return child(cache_root / LOCKS, project_id, ".writers")


def open(  # the documented API name, `dbguard.open`, shadows the builtin here only
    project: str | Path | None,
    name: str,
    mode: str = "r",
    *,
    remote: bool | None = None,
    settings: Settings | None = None,
) -> ImageDB | RemoteDB:
    """Open image database ``name`` of ``project`` (see the module docstring for modes).

    ``remote=True`` (default: the ``remote`` setting, ``DBGUARD_REMOTE=1``) opens it through the
    host that holds the project and serves it (`dbguard serve`), unless this host holds it:
    a cluster job's workers read and write through the one node that has the lease."""
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
    if not is_database_name(name):
        raise UsageError(f"database name {name!r} must be {DATABASE_NAME_RULE}")
    settings = settings or load()
    target = projects.open_project(project)
    if remote if remote is not None else settings.remote:
        cache_root = local_agent.cache_dir(settings)
        try:
            WriterGuard(cache_root, target).check()
        except (LeaseHeld, LeaseLost):
            from dbguard.data.remote import RemoteDB  # only workers pay for the link's imports

            return RemoteDB(target, name, mode, settings)
    return ImageDB(target, name, mode, settings)


def database_names(db: ImageDB) -> list[str]:
    """Every database of ``db``'s project that it can see: flushed ones, and this host's
    unflushed ones when it writes the project."""
    names = set(db._view.databases())
    if db._cache is not None:
        names.update(db._cache.databases())
    return sorted(names)


class ImageDB:
    def __init__(self, project: projects.Project, name: str, mode: str, settings: Settings) -> None:
        self.project = project
        self.name = name
        self.mode = mode
        self._settings = settings
        self._cache_root = local_agent.cache_dir(settings)
        self._view = StoreView(ProjectStore(project.path, project.id), self._cache_root)
        self._guard = WriterGuard(self._cache_root, project)
        self._cache: CacheStore | None = None
        self._writers_fd: int | None = None
        # Marked dirty at open with no size: the first write tells the agent its size (without
        # waiting for the lease service), so that `status` can say how much a dead host strands.
        self._size_unreported = False
        if mode != "r":
            self._guard.check()
            self._open_cache(gated=True)
            self._writers_fd = self._hold_writers_lock()
            assert self._cache is not None
            self._cache.raise_count(name, self._view.count(name))
            # Opening to write is the intent to write: mark the lease dirty now, so that the first
            # append costs what the others do (no round trip to the agent and the lease service
            # inside the caller's write loop). A database opened and left unwritten is marked
            # clean again by the agent a moment later.
            if not self._announced():
                self._announce(0)
                self._size_unreported = True
        else:
            # Not GuardError: a damaged cache is an error, not a reason to show fewer records.
            with contextlib.suppress(LeaseHeld, LeaseLost):
                self._guard.check()
                self._open_cache()  # this host writes the project: show its unflushed records

    def _open_cache(self, *, gated: bool = False) -> None:
        try:
            self._cache = CacheStore(self._cache_root, self.project.id, require_announced=gated)
        except CacheError as exc:  # damaged (IntegrityError), a full disk (CacheDiskFull), ...
            raise from_cache_error(exc) from exc

    def _hold_writers_lock(self) -> int:
        path = writers_lock_path(self._cache_root, self.project.id)
        with cache_access(self._cache_root):
            path.parent.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    # ------------------------------------------------------------- reading

    @cache_errors_translated
    def __len__(self) -> int:
        count = self._view.count(self.name)
        if self._cache is not None:
            count = max(count, self._cache.count(self.name))
        return count

    def _position(self, index: int) -> int:
        index = record_index(index)
        size = len(self)
        position = index + size if index < 0 else index
        if not 0 <= position < size:
            raise IndexError(f"record {index} is out of range for {self.name!r} ({size} records)")
        return position

    @cache_errors_translated
    def __getitem__(self, index: int) -> NDArray[Any]:
        position = self._position(index)
        if self._cache is not None:
            with contextlib.suppress(KeyError):
                return self._cache.get(self.name, position)
        entry = self._view.entry(self.name, position)
        if entry is None:
            raise IndexError(f"record {position} of {self.name!r} was never written")
        return self._view.array(entry)

    @cache_errors_translated
    def attrs(self, index: int) -> dict[str, Any]:
        position = self._position(index)
        if self._cache is not None:
            with contextlib.suppress(KeyError):
                return _decode_attrs(self._cache.attrs(self.name, position))
        entry = self._view.entry(self.name, position)
        if entry is None:
            raise IndexError(f"record {position} of {self.name!r} was never written")
        return self._view.attrs(entry)

    def __iter__(self) -> Iterator[NDArray[Any]]:
        for position in range(len(self)):
            yield self[position]

    @cache_errors_translated
    def describe(self, index: int) -> dict[str, Any]:
        """Record ``index``'s dtype name, shape and attrs, without reading its payload from the
        share (`dbguard ls`)."""
        position = self._position(index)
        if self._cache is not None:
            with contextlib.suppress(KeyError):
                array = self._cache.get(self.name, position)
                attrs = _decode_attrs(self._cache.attrs(self.name, position))
                return {"dtype": array.dtype.name, "shape": list(array.shape), "attrs": attrs}
        entry = self._view.entry(self.name, position)
        if entry is None:
            raise IndexError(f"record {position} of {self.name!r} was never written")
        return {
            "dtype": np.dtype(entry.dtype).name,
            "shape": list(entry.shape),
            "attrs": self._view.attrs(entry),
        }

    @contextlib.contextmanager
    def reading(self) -> Iterator[_Snapshot]:
        """Zero-copy reads of one consistent snapshot; arrays are valid inside the block only."""
        if self._cache is None:
            yield _Snapshot(self, None)
            return
        with self._cache.reader() as reader:
            yield _Snapshot(self, reader)

    def refresh(self) -> bool:
        """Browse the newest generation of the project store; True if there was a newer one."""
        return self._view.refresh()

    @property
    def generation(self) -> int:
        return self._view.generation

    # ------------------------------------------------------------- writing

    def _writable(self) -> CacheStore:
        if self.mode == "r" or self._cache is None:
            raise UsageError(f"{self.name!r} of {self.project.path} is open read-only (mode 'r')")
        self._guard.check()
        return self._cache

    def _write(self, write: Callable[[CacheStore], _T], size: int) -> _T:
        """Run one write on the cache. The first write that would make a clean project dirty
        is refused by the cache until this host's agent has marked the lease dirty at the
        lease service (invariant 7: a host that dies right after this write returns leaves
        the project orphaned, never silently free). One round trip per clean-to-dirty
        transition, none per record."""
        cache = self._writable()
        try:
            result = write_announced(lambda: write(cache), self._announce, size)
        except CacheError as exc:  # a full disk, a damaged environment: the API raises GuardErrors
            raise from_cache_error(exc) from exc
        if self._size_unreported:
            self._size_unreported = False
            self._report_size(size)
        return result

    def _report_size(self, size: int) -> None:
        """Informational only (the lease is already dirty): a failure changes nothing."""
        lease = self._guard.check()
        agent = local_agent.running(self._settings)
        if agent is not None:
            with agent, contextlib.suppress(GuardError):
                agent.call_ok(
                    AgentOp.NOTE_UNFLUSHED, project=self.project.id, token=int(lease["token"]), unflushed=size
                )

    def _announced(self) -> bool:
        assert self._cache is not None
        try:
            return self._cache.announced()
        except CacheError as exc:
            raise from_cache_error(exc) from exc

    def _announce(self, size: int) -> None:
        lease = self._guard.check()
        # Starting the agent if it died: it reclaims this host's leases before answering.
        with local_agent.connect(self._settings) as agent:
            agent.call_ok(
                AgentOp.MARK_DIRTY, project=self.project.id, token=int(lease["token"]), unflushed=size
            )

    def append(
        self, array: NDArray[Any], attrs: dict[str, Any] | None = None, *, once: str | None = None
    ) -> int:
        """Add a record after the last one; returns its index. ``once`` (a request id, at most
        128 characters) makes the append idempotent: repeated with the same id, it returns the
        first one's index and adds nothing (how a worker's resent append lands once)."""
        array, encoded = checked_record(array), _encode_attrs(attrs)
        key = once.encode() if once is not None else None
        return self._write(lambda cache: cache.append(self.name, array, encoded, once=key), array.nbytes)

    def extend(
        self, arrays: Iterable[NDArray[Any]], attrs: Iterable[dict[str, Any] | None] | None = None
    ) -> list[int]:
        """Append every array (with the attrs at the same place, if given); their indices.
        Records go to the cache a few MiB per transaction."""
        attrs_of = iter(attrs) if attrs is not None else None
        indices: list[int] = []
        batch: list[tuple[NDArray[Any], dict[str, Any] | None, str | None]] = []
        size = 0
        for array in arrays:
            batch.append((array, next(attrs_of, None) if attrs_of else None, None))
            size += getattr(array, "nbytes", 0)
            if size >= _BATCH_BYTES:
                indices += self.append_batch(batch)
                batch, size = [], 0
        if batch:
            indices += self.append_batch(batch)
        return indices

    def append_batch(
        self, records: Sequence[tuple[NDArray[Any], dict[str, Any] | None, str | None]]
    ) -> list[int]:
        """Append ``(array, attrs, once)`` records in one cache transaction (all or none; see
        `append` for ``once``); their indices."""
        items = [
            (checked_record(array), _encode_attrs(attrs), once.encode() if once is not None else None)
            for array, attrs, once in records
        ]
        size = sum(array.nbytes for array, _, _ in items)
        return self._write(lambda cache: cache.append_many(self.name, items), size)

    def __setitem__(self, index: int, array: NDArray[Any]) -> None:
        index = record_index(index)
        position = index + len(self) if index < 0 else index
        if position < 0:
            raise IndexError(f"record {index} is out of range for {self.name!r}")
        self._writable()
        keep = b""
        with contextlib.suppress(KeyError, IndexError):
            keep = _encode_attrs(self.attrs(position))
        array = checked_record(array)
        self._write(lambda cache: cache.put(self.name, position, array, keep), array.nbytes)

    def set_attrs(self, index: int, attrs: dict[str, Any]) -> None:
        position = self._position(index)
        self._writable()
        array, encoded = np.ascontiguousarray(self[position]), _encode_attrs(attrs)
        self._write(lambda cache: cache.put(self.name, position, array, encoded), array.nbytes)

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._writers_fd is not None:
            os.close(self._writers_fd)
            self._writers_fd = None
        self._view.close()

    def __enter__(self) -> ImageDB:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dbguard ImageDB {self.name!r} of {self.project.path} mode {self.mode!r}>"


class _Snapshot:
    def __init__(self, db: ImageDB, reader: Reader | None) -> None:
        self._db = db
        self._reader = reader
        # One snapshot, one length: asking the cache per record would cost a transaction each.
        self._length = len(db)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> NDArray[Any]:
        position = index + self._length if index < 0 else index
        if not 0 <= position < self._length:
            raise IndexError(f"record {index} is out of range ({self._length} records)")
        if self._reader is not None:
            # try/except, not contextlib.suppress: this is the zero-copy hot path, and the
            # context manager alone costs a third of a cached read.
            try:
                return self._reader.array(self._db.name, position)
            except KeyError:
                pass
        return self._db[position]


def record_index(index: Any) -> int:
    """A record index as an int (numpy integers too); a slice or a name is a usage error."""
    if isinstance(index, bool):
        raise UsageError(f"a record index is an integer, not {index!r}")
    try:
        return operator.index(index)
    except TypeError:
        raise UsageError(f"a record index is an integer, not {type(index).__name__} {index!r}") from None


def checked_record(array: NDArray[Any]) -> NDArray[Any]:
    if not isinstance(array, np.ndarray):
        raise UsageError(f"records must be numpy arrays, not {type(array).__name__}")
    if array.dtype.hasobject:
        raise UsageError(f"records must have a plain numeric dtype, not {array.dtype}")
    return array


def _encode_attrs(attrs: dict[str, Any] | None) -> bytes:
    if not attrs:
        return b""
    if not isinstance(attrs, dict):
        raise UsageError(f"attrs must be a dict, not {type(attrs).__name__}")
    try:
        return json.dumps(attrs, separators=(",", ":"), allow_nan=True).encode()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"attrs must be JSON-serialisable (numbers, strings, lists, dicts): {exc}") from exc


def _decode_attrs(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}
