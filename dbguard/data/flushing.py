"""Flushing: moving a project's dirty cache entries into the project store under a token.

Used by the agent (periodically, on release and on takeover) and by the commands `flush` and
`clear` in the user's own process (so they can show progress). One flush at a time per project
and cache, whoever runs it: an exclusive lock file beside the cache environment serialises them.

A flush that the store refuses because a newer token has been seen (`Fenced`) moves the whole
cache environment aside: that data belongs to a lease that was lost, so it must neither be
written over the new writer's work nor deleted (invariant 5). `dbguard recover` lists it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

# zlib-ng: the CRC-32 of zlib, faster (see data.store).
from zlib_ng.zlib_ng import crc32

from dbguard.cache import CacheError, CacheStore, DirtyNotAnnounced
from dbguard.cache.store import ASIDE
from dbguard.data.project import Project
from dbguard.data.store import (
    TRAILER_SIZE,
    Entry,
    FlushResult,
    PendingRecord,
    ProjectStore,
    parse_index,
    parse_trailer,
    record_crc,
)
from dbguard.data.uncached import UncachedFile
from dbguard.data.view import SEGMENT_CACHE
from dbguard.errors import Fenced, IntegrityError, UnflushedData, cache_access
from dbguard.names import child, file_name_for, is_plain_name

_T = TypeVar("_T")

LOCKS = "locks"


@dataclass(frozen=True)
class Aside:
    """Data of a lost lease, kept in the cache for recovery."""

    project: str
    label: str
    path: Path
    dirty_bytes: int
    reason: str
    token: int = 0  # of the lease the data was written under


@contextlib.contextmanager
def flush_lock(cache_root: Path, project_id: str) -> Iterator[None]:
    directory = cache_root / LOCKS
    path = child(directory, project_id, ".flush")  # ValueError for an id that is not a plain name
    with cache_access(cache_root):
        directory.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def flush_project(
    cache_root: Path,
    project: Project,
    token: int,
    *,
    writer: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FlushResult:
    """Flush every dirty entry of ``project``; ``progress(done, total)`` counts records.

    On success the flushed entries are clean in the cache (unless rewritten meanwhile). On
    Fenced the cache environment is set aside before the error propagates.
    """
    store = ProjectStore(project.path, project.id)
    with flush_lock(cache_root, project.id):
        if CacheStore.dirty_bytes_of(cache_root, project.id) == 0:
            manifest = store.latest()
            return FlushResult(manifest.generation, manifest.token, 0, 0, None)
        try:
            with CacheStore(cache_root, project.id) as cache:
                entries = cache.dirty_entries()
                total = len(entries)
                with cache.reader() as reader:

                    def pending() -> Iterator[PendingRecord]:
                        for done, entry in enumerate(entries, 1):
                            record = reader.record(entry.db, entry.index)
                            yield PendingRecord(
                                entry.db,
                                entry.index,
                                record.dtype,
                                record.shape,
                                record.data,
                                record.attrs.decode() or "{}",
                            )
                            if progress is not None:
                                progress(done, total)

                    result = store.flush(pending(), token=token, writer=writer)
                cache.mark_flushed(entries)
                cache.note(store_generation=result.generation, store_token=token)
        except Fenced as exc:
            set_aside(cache_root, project.id, token, str(exc))
            raise
    return result


def adopt_store(cache_root: Path, project: Project, token: int, writer: dict[str, str]) -> None:
    """Make the cache fit to write under a newly granted ``token``.

    If another writer flushed since this cache last did, the cache's clean records may be
    stale versions, so they are dropped (unflushed ones are set aside: they belong to a lease
    the store has moved past). Then the store is fenced with the new token.
    """
    store = ProjectStore(project.path, project.id)
    with flush_lock(cache_root, project.id):
        latest = store.latest()
        if CacheStore.exists(cache_root, project.id):
            with CacheStore(cache_root, project.id) as cache:
                known = (cache.noted("store_generation"), cache.noted("store_token"))
                dirty = cache.dirty_bytes()
            if known != (latest.generation, latest.token):
                if dirty:
                    set_aside(
                        cache_root,
                        project.id,
                        known[1],
                        "the project store moved on while this host was away",
                    )
                else:
                    CacheStore.drop(cache_root, project.id)
        fenced = store.fence(token, writer)
        with CacheStore(cache_root, project.id) as cache:
            cache.note(store_generation=fenced.generation, store_token=fenced.token)


def set_aside(cache_root: Path, project_id: str, token: int, reason: str) -> Path | None:
    # Unique even for two refusals within one second, which a racing flusher can produce.
    label = f"{project_id}-token{token}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dirty = CacheStore.dirty_bytes_of(cache_root, project_id)
    where = CacheStore.set_aside(cache_root, project_id, label)
    if where is not None:
        note = {
            "project": project_id,
            "token": token,
            "dirty_bytes": dirty,
            "reason": reason,
            "at": time.time(),
        }
        with cache_access(cache_root):
            (where / "aside.json").write_text(json.dumps(note, indent=1) + "\n")
    return where


def list_aside(cache_root: Path) -> list[Aside]:
    """The data of lost leases kept aside in this cache, oldest label first. A note that cannot
    be read (cut short by a crash, edited by hand) does not hide the data it describes: that is
    listed from the layout `CacheStore.set_aside` gives it, ``<label>/projects/<project id>``."""
    root = cache_root / ASIDE
    try:
        labels = sorted(os.listdir(root))
    except OSError:  # none yet (or not a directory: nothing dbguard kept there)
        return []
    found = []
    for label in labels:
        where = root / label
        note = _aside_note(where / "aside.json")
        if note is not None:
            found.append(
                Aside(note["project"], label, where, note["dirty_bytes"], note["reason"], note["token"])
            )
            continue
        try:
            projects = [name for name in os.listdir(where / "projects") if is_plain_name(name)]
        except OSError:
            continue  # not an aside directory at all
        for project_id in projects:
            try:
                dirty = CacheStore.dirty_bytes_of(where, project_id)
            except (CacheError, OSError):
                dirty = 0  # unknown: damaged (`recover --export` says how)
            reason = f"kept aside, but its note {where / 'aside.json'} cannot be read (damaged or missing)"
            found.append(Aside(project_id, label, where, dirty, reason, _label_token(label)))
    return found


def _aside_note(path: Path) -> dict[str, Any] | None:
    """The note `set_aside` wrote, if it is whole and has the fields it writes."""
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(note, dict) or not is_plain_name(note.get("project")):
        return None
    dirty, token, reason = note.get("dirty_bytes"), note.get("token", 0), note.get("reason")
    if (
        type(dirty) is not int
        or type(token) is not int
        or dirty < 0
        or token < 0
        or not isinstance(reason, str)
    ):
        return None
    return {"project": note["project"], "dirty_bytes": dirty, "token": token, "reason": reason}


def _label_token(label: str) -> int:
    """The token in a label `set_aside` made (``<project>-token<N>-<time>-<random>``), or 0."""
    found = re.search(r"-token([0-9]{1,18})-", label)
    return int(found.group(1)) if found else 0


@dataclass
class ReadBack:
    """The cache's records matched against the bytes the share holds (`verify_cache_in_store`)."""

    checked: int = 0  # records whose copy on the share is byte for byte the cache's
    superseded: int = 0  # records a newer writer has replaced since: nothing of ours to compare
    segments: int = 0  # segments read back
    bytes: int = 0  # read back from the share
    method: str = ""  # how this host's page cache was kept out of it (see dbguard.data.uncached)
    # (db, index) -> what is wrong with the share's copy: a new flush of the cache's copy mends it
    damaged: dict[tuple[str, int], str] = field(default_factory=dict)
    # damage that a new flush cannot mend (an index or trailer): readers need that file restored
    unmendable: list[str] = field(default_factory=list)


def verify_cache_in_store(
    cache_root: Path, project: Project, only: Collection[tuple[str, int]] | None = None
) -> ReadBack:
    """Match every record of the cache (or those in ``only``) against its copy on the share, as
    the share holds it: each segment the records live in is read once, in order, past this host's
    page cache, its index and trailer as well as the records' payloads. Nothing is changed.

    Raise UnflushedData if the cache has unflushed records: they have no copy to match yet.
    """
    result = ReadBack()
    if not CacheStore.exists(cache_root, project.id):
        return result
    store = ProjectStore(project.path, project.id)
    manifest = store.latest()

    def index_of(name: str) -> list[Entry]:
        try:
            return store.read_index(name)
        except (IntegrityError, OSError) as exc:
            result.unmendable.append(_described(exc, store.segment_path(name)))
            return []

    live = store.live_entries(manifest, index_of)
    if result.unmendable:
        return result  # which records an unreadable index replaces is unknown
    wanted: dict[str, list[Entry]] = {}
    with CacheStore(cache_root, project.id) as cache:
        # Records flushed under a later token than the cache's last one were written by another
        # host since: they replace ours by right, and are theirs to check.
        ours = cache.noted("store_token")
        with cache.reader() as reader:
            if reader.dirty_entries():
                raise UnflushedData(
                    f"the cache of {project.path} still has unflushed records (written since the flush "
                    "began); nothing was dropped or lost. Run `dbguard flush` and try again",
                    project=project.id,
                    unflushed=reader.dirty_bytes(),
                )
            for db in reader.databases():
                for index in range(reader.count(db)):
                    if only is not None and (db, index) not in only:
                        continue
                    try:
                        record = reader.record(db, index)
                    except KeyError:
                        continue
                    entry = live.get((db, index))
                    if entry is None:
                        result.damaged[(db, index)] = (
                            f"record {index} of {db!r} is missing from generation {manifest.generation}"
                        )
                        continue
                    if ours and _segment_token(entry.segment) > ours:
                        result.superseded += 1
                        continue
                    crc = record_crc(record.data, record.attrs.decode() or "{}")
                    if entry.crc != crc or entry.length != record.data.nbytes:
                        result.damaged[(db, index)] = (
                            f"record {index} of {db!r} in segment {store.segment_path(entry.segment)} is "
                            "indexed with other bytes than this host's cache holds"
                        )
                        continue
                    wanted.setdefault(entry.segment, []).append(entry)
    for name, entries in wanted.items():
        _read_back(store, name, manifest.segments[name], entries, result)
    return result


def _read_back(
    store: ProjectStore, name: str, info: dict[str, int], entries: list[Entry], result: ReadBack
) -> None:
    """Match ``entries`` (whose index matches the cache) against segment ``name`` as stored."""
    path = store.segment_path(name)
    entries.sort(key=lambda e: e.offset)
    try:
        with UncachedFile(path) as segment:
            result.segments += 1
            result.method = segment.method
            try:
                # The index as stored, not as this host cached it: readers elsewhere need it whole.
                offset, length, crc = parse_trailer(
                    path, segment.size, segment.read(max(0, segment.size - TRAILER_SIZE), TRAILER_SIZE)
                )
                if segment.size != info.get("size", segment.size) or crc != info.get("index_crc", crc):
                    raise IntegrityError(f"segment {path} is not the one its manifest names", path=str(path))
                ranges = [(e.offset, e.length) for e in entries] + [(offset, length)]
                crcs = [0] * len(ranges)
                sizes = [0] * len(ranges)
                raw = bytearray()
                for k, piece in segment.pieces(ranges):
                    if k == len(entries):
                        raw += piece
                    else:
                        crcs[k] = crc32(piece, crcs[k])
                        sizes[k] += len(piece)
                parse_index(path, name, bytes(raw), crc)
            finally:
                result.bytes += segment.bytes_read
    except IntegrityError as exc:
        result.unmendable.append(str(exc))
        return
    except OSError as exc:  # missing or unreadable: the records need a copy elsewhere
        for entry in entries:
            result.damaged[(entry.db, entry.index)] = (
                f"record {entry.index} of {entry.db!r}: {_described(exc, path)}"
            )
        return
    for entry, value, size in zip(entries, crcs, sizes, strict=False):
        if size != entry.length or crc32(entry.attrs.encode(), value) != entry.crc:
            result.damaged[(entry.db, entry.index)] = (
                f"record {entry.index} of {entry.db!r} in segment {path} differs from this host's cache"
            )
        else:
            result.checked += 1


def _described(exc: BaseException, path: Path) -> str:
    if isinstance(exc, OSError):
        return f"segment {path} cannot be read ({exc.strerror or exc})"
    return str(exc)


def _segment_token(name: str) -> int:
    """The token a segment was flushed under, from its name (`ProjectStore.flush` names it
    ``<generation>-<token>-<random>``); 0 if the name does not say."""
    try:
        return int(name.split("-")[1])
    except (IndexError, ValueError):
        return 0


_ANNOUNCE_ATTEMPTS = 5


def write_announced(write: Callable[[], _T], announce: Callable[[int], None], size: int) -> _T:
    """Run one gated cache write (`CacheStore(require_announced=True)`); when the cache refuses
    it as the first dirty write after a clean state, ``announce(size)`` (the agent marks the
    lease dirty at the lease service) and write again.

    Retried a few times: the agent withdraws the announcement of a cache it finds clean, and
    may do so between its answer and the write (it waits a second after a mark before it looks
    again, so one retry nearly always suffices)."""
    for attempt in range(_ANNOUNCE_ATTEMPTS):
        try:
            return write()
        except DirtyNotAnnounced:
            if attempt == _ANNOUNCE_ATTEMPTS - 1:
                raise
            announce(size)
    raise AssertionError("unreachable")


def mark_unflushed(
    cache_root: Path,
    project: Project,
    records: Iterable[tuple[str, int]],
    announce: Callable[[int], None] | None = None,
) -> int:
    """Mark records of the cache unflushed again, unchanged, so that the next flush writes them
    anew (their copy on the share is damaged); return their bytes. With ``announce``, a clean
    cache is announced dirty first (`CacheStore.announce`), through ``announce(bytes)``."""
    total = 0
    with CacheStore(cache_root, project.id, require_announced=announce is not None) as cache:
        for db, index in sorted(records):
            with cache.reader() as reader:
                record = reader.record(db, index)
                array, attrs = record.array().copy(), bytes(record.attrs)
            if announce is None:
                cache.put(db, index, array, attrs)
            else:
                write_announced(lambda: cache.put(db, index, array, attrs), announce, array.nbytes)  # noqa: B023
            total += array.nbytes
    return total


def drop_cache(cache_root: Path, project_id: str) -> int:
    """Remove the project's cache environment and local segment copies; return bytes freed."""
    freed = 0
    with flush_lock(cache_root, project_id):
        unflushed = CacheStore.dirty_bytes_of(cache_root, project_id)
        if unflushed:
            raise UnflushedData(
                f"the cache of project {project_id} has unflushed records (written since the flush "
                "began); it was not dropped and nothing was lost. Run `dbguard flush` and try again",
                project=project_id,
                unflushed=unflushed,
            )
        copies = child(cache_root / SEGMENT_CACHE, project_id)
        for path in (child(cache_root / "projects", project_id), copies):
            if path.exists():
                freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        CacheStore.drop(cache_root, project_id)
        shutil.rmtree(copies, ignore_errors=True)
    return freed


def export_aside(aside: Aside, target: Path) -> int:
    """Write every record kept aside as ``<db>/<index>.npy`` (+ ``.json`` attrs); return the count."""
    exported = 0
    target.mkdir(parents=True, exist_ok=True)
    with CacheStore(aside.path, aside.project, create=False) as cache, cache.reader() as reader:
        for db in reader.databases():
            # A database name is any text (`dbguard.open`): a folder gets a plain name for it.
            folder = child(target, file_name_for(db))
            folder.mkdir(exist_ok=True)
            for index in range(reader.count(db)):
                try:
                    record = reader.record(db, index)
                except KeyError:
                    continue
                np.save(folder / f"{index:08d}.npy", record.array())
                if record.attrs:
                    (folder / f"{index:08d}.json").write_bytes(bytes(record.attrs))
                exported += 1
    return exported


# A store with more segments than this is compacted into one by the writer after a flush:
# readers load every segment's index, so their number, not their size, is what costs.
COMPACT_AFTER_SEGMENTS = 32


def maintain_store(project: Project, token: int, writer: dict[str, str], retire_delay: float) -> bool:
    """Compact the store when it has many segments, and delete segments retired long enough
    ago; True if it compacted. Only the writer does this, under its token."""
    store = ProjectStore(project.path, project.id)
    manifest = store.latest()
    if len(manifest.segments) > COMPACT_AFTER_SEGMENTS:
        store.compact(token=token, retire_delay=retire_delay, writer=writer)
        return True
    if manifest.retired:
        store.delete_retired(manifest, retire_delay)
    return False
