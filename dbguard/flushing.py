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
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache import CacheStore
from dbguard.errors import Fenced, IntegrityError
from dbguard.project import Project
from dbguard.project_store import FlushResult, PendingRecord, ProjectStore, record_crc
from dbguard.store_view import SEGMENT_CACHE

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
    directory.mkdir(exist_ok=True, mode=0o700)
    fd = os.open(directory / f"{project_id}.flush", os.O_RDWR | os.O_CREAT, 0o600)
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
        (where / "aside.json").write_text(json.dumps(note, indent=1) + "\n")
    return where


def list_aside(cache_root: Path) -> list[Aside]:
    found = []
    for note_path in sorted((cache_root / "aside").glob("*/aside.json")):
        try:
            note = json.loads(note_path.read_text())
        except (OSError, ValueError):
            continue
        found.append(
            Aside(
                note["project"],
                note_path.parent.name,
                note_path.parent,
                int(note["dirty_bytes"]),
                note["reason"],
                int(note.get("token") or 0),
            )
        )
    return found


def verify_cache_in_store(cache_root: Path, project: Project) -> int:
    """Check that every record of the cache is in the store's newest generation, byte for byte
    (by checksum); return how many were checked. Raise IntegrityError naming the first that is
    not: dropping the cache then would lose it."""
    if not CacheStore.exists(cache_root, project.id):
        return 0
    store = ProjectStore(project.path, project.id)
    live = store.live_entries(store.latest())
    checked = 0
    with CacheStore(cache_root, project.id) as cache, cache.reader() as reader:
        if reader.dirty_entries():
            raise IntegrityError(
                f"the cache of {project.path} still has unflushed records; nothing was dropped. "
                "Run `dbguard flush` and try again",
                path=str(cache_root),
            )
        for db in reader.databases():
            for index in range(reader.count(db)):
                try:
                    record = reader.record(db, index)
                except KeyError:
                    continue
                entry = live.get((db, index))
                if entry is None or entry.crc != record_crc(record.data, record.attrs.decode() or "{}"):
                    raise IntegrityError(
                        f"record {index} of {db!r} in this host's cache differs from the project store; "
                        "the cache was kept. Run `dbguard verify` on the project",
                        path=str(store.root),
                    )
                checked += 1
    return checked


def drop_cache(cache_root: Path, project_id: str) -> int:
    """Remove the project's cache environment and local segment copies; return bytes freed."""
    freed = 0
    with flush_lock(cache_root, project_id):
        if CacheStore.dirty_bytes_of(cache_root, project_id):
            raise IntegrityError(
                f"the cache of project {project_id} has unflushed records; it was not dropped",
                path=str(cache_root),
            )
        for path in (cache_root / "projects" / project_id, cache_root / SEGMENT_CACHE / project_id):
            if path.exists():
                freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        CacheStore.drop(cache_root, project_id)
        shutil.rmtree(cache_root / SEGMENT_CACHE / project_id, ignore_errors=True)
    return freed


def export_aside(aside: Aside, target: Path) -> int:
    """Write every record kept aside as ``<db>/<index>.npy`` (+ ``.json`` attrs); return the count."""
    exported = 0
    with CacheStore(aside.path, aside.project) as cache, cache.reader() as reader:
        for db in reader.databases():
            folder = target / db.replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
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
