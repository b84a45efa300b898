"""The project store: the durable copy of a project's image databases on the shared filesystem.

Layout, inside ``<project>/.dbguard/store/``::

    segments/<name>.seg        immutable: record payloads, then an index, then a trailer
    manifests/<generation>.json  one file per generation, never rewritten

A flush writes a new segment and fsyncs it, then publishes the next generation's manifest.
Publishing uses link(2), which fails if the name exists, atomically even over NFS: two hosts
can never both publish generation N, so a flush is a compare-and-swap on the generation
number. A flusher that loses the race re-reads the newest manifest and, if that carries a
newer fencing token than its own, is refused (`Fenced`): a paused or expired holder cannot
overwrite its successor's work (invariant 2). The new writer publishes a *fence* generation
when it is granted the lease, so the refusal holds even before it first flushes.

Readers take the newest manifest that parses and checks out, so they see one whole generation
or the one before, whatever a client cache does (invariant 4): segments are immutable and
uniquely named, so no client cache can hold a stale version of one.

Payloads are 64-byte aligned and stored raw, so with a manifest entry in hand plain numpy reads
a record: ``numpy.memmap(segment, dtype, "r", offset, shape)``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

# zlib-ng computes the same CRC-32 as zlib (the format is unchanged) about four times faster;
# checksumming was a fifth of a flush's time.
from zlib_ng.zlib_ng import crc32

from dbguard.durable import fsync_dir, write_synced
from dbguard.errors import Fenced, GuardError, IntegrityError

STORE_DIR = "store"
SEGMENTS = "segments"
MANIFESTS = "manifests"
FORMAT = 1
ALIGN = 64

# Trailer: magic, format, index offset, index length, index crc32.
_TRAILER = struct.Struct("<8sIQQI")
_MAGIC = b"DBGSEG01"

# What to do about a damaged segment: it is immutable, so a backup's copy is as good as the original.
_RESTORE = "; restore that file from a backup (`dbguard verify` lists every damaged file and record)"

# Disk-full and quota errors: the flush fails cleanly, the cache keeps the data, retry later.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Entry:
    """Where one record lives, and what it should look like."""

    db: str
    index: int
    segment: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    crc: int  # crc32 of payload then attrs
    attrs: str  # JSON text

    def to_json(self) -> dict[str, Any]:
        return {
            "db": self.db,
            "i": self.index,
            "off": self.offset,
            "len": self.length,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "crc": self.crc,
            "attrs": self.attrs,
        }

    @classmethod
    def from_json(cls, segment: str, item: dict[str, Any]) -> Entry:
        return cls(
            db=str(item["db"]),
            index=int(item["i"]),
            segment=segment,
            offset=int(item["off"]),
            length=int(item["len"]),
            dtype=str(item["dtype"]),
            shape=tuple(int(n) for n in item["shape"]),
            crc=int(item["crc"]),
            attrs=str(item["attrs"]),
        )


@dataclass(frozen=True)
class PendingRecord:
    """A record to flush: the payload bytes and how to read them back."""

    db: str
    index: int
    dtype: str
    shape: tuple[int, ...]
    payload: memoryview | bytes
    attrs: str = "{}"


@dataclass
class Manifest:
    generation: int = 0
    token: int = 0
    project: str = ""
    created: float = 0.0
    writer: dict[str, str] = field(default_factory=dict)
    # name -> {"size": bytes, "index_crc": crc32, "records": n, "added": generation}
    segments: dict[str, dict[str, int]] = field(default_factory=dict)
    # db name -> {"count": one past the highest index}
    databases: dict[str, dict[str, int]] = field(default_factory=dict)
    # segments no longer referenced: name -> wall time retired (deleted after a delay)
    retired: dict[str, float] = field(default_factory=dict)
    # the last generation that brought new data: {"at": wall time, "host": ..., "user": ...};
    # fences and compactions carry it forward, so "last flush" means data, not bookkeeping
    last_flush: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {
            "format": FORMAT,
            "project": self.project,
            "generation": self.generation,
            "token": self.token,
            "created": self.created,
            "writer": self.writer,
            "segments": self.segments,
            "databases": self.databases,
            "retired": self.retired,
            "last_flush": self.last_flush,
        }
        body["checksum"] = _crc_json(body)
        return body

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            generation=int(data["generation"]),
            token=int(data["token"]),
            project=str(data["project"]),
            created=float(data["created"]),
            writer=dict(data.get("writer") or {}),
            segments={str(k): dict(v) for k, v in data["segments"].items()},
            databases={str(k): dict(v) for k, v in data["databases"].items()},
            retired={str(k): float(v) for k, v in (data.get("retired") or {}).items()},
            last_flush=dict(data.get("last_flush") or {}),
        )


@dataclass(frozen=True)
class FlushResult:
    generation: int
    token: int
    records: int
    bytes: int
    segment: str | None


def _crc_json(body: dict[str, Any]) -> int:
    return crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def record_crc(payload: memoryview | bytes, attrs: str) -> int:
    return crc32(attrs.encode(), crc32(payload))


class ProjectStore:
    """One project's store, as seen from this host's mount of it."""

    def __init__(self, project_dir: Path, project_id: str) -> None:
        self.project_id = project_id
        self.root = project_dir / ".dbguard" / STORE_DIR
        self.segments_dir = self.root / SEGMENTS
        self.manifests_dir = self.root / MANIFESTS

    # ------------------------------------------------------------- reading

    def generations(self) -> list[int]:
        """Every published generation, oldest first, including ones a stale listing hides.

        A network filesystem's client may serve a directory listing from its cache (sshfs's
        dir_cache, NFS's readdir cache) long after new manifests were published. Looking a name
        up is not served from that listing, so after listing, the following generation numbers
        are probed by name until one is missing: the newest generation is always found.
        """
        try:
            names = os.listdir(self.manifests_dir)
        except FileNotFoundError:
            return []
        listed = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
        probe = (listed[-1] if listed else 0) + 1
        while self.manifest_path(probe).exists():
            listed.append(probe)
            probe += 1
        return listed

    def manifest_path(self, generation: int) -> Path:
        return self.manifests_dir / f"{generation:012d}.json"

    def read_manifest(self, generation: int) -> Manifest:
        path = self.manifest_path(generation)
        try:
            data = json.loads(path.read_bytes())
            checksum = data.pop("checksum")
            if checksum != _crc_json(data):
                raise ValueError("checksum mismatch")
            manifest = Manifest.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"manifest {path} is damaged ({exc}); `dbguard verify` lists what it affects, and the "
                "previous generation is still readable",
                path=str(path),
            ) from exc
        if manifest.generation != generation or (manifest.project and manifest.project != self.project_id):
            raise IntegrityError(f"manifest {path} belongs to another generation or project", path=str(path))
        return manifest

    def latest(self) -> Manifest:
        """The newest whole generation (an empty one if the store has none yet).

        A damaged newest manifest is skipped for the one before it, so a reader always gets a
        whole generation; `verify` reports the damage.
        """
        damage: IntegrityError | None = None
        for generation in reversed(self.generations()):
            try:
                return self.read_manifest(generation)
            except FileNotFoundError:
                continue  # compacted away between listing and reading
            except IntegrityError as exc:
                damage = damage or exc
        if damage is not None:
            raise damage
        return Manifest(project=self.project_id)

    def segment_path(self, name: str) -> Path:
        return self.segments_dir / f"{name}.seg"

    def read_index(self, name: str, path: Path | None = None) -> list[Entry]:
        """The records of one segment, checked against its trailer's checksum."""
        path = path or self.segment_path(name)
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if size < _TRAILER.size:
                raise IntegrityError(f"segment {path} is truncated ({size} bytes){_RESTORE}", path=str(path))
            handle.seek(size - _TRAILER.size)
            magic, fmt, offset, length, crc = _TRAILER.unpack(handle.read(_TRAILER.size))
            if magic != _MAGIC or fmt != FORMAT or offset + length + _TRAILER.size != size:
                raise IntegrityError(f"segment {path} has a damaged trailer{_RESTORE}", path=str(path))
            handle.seek(offset)
            raw = handle.read(length)
        if crc32(raw) != crc:
            raise IntegrityError(
                f"segment {path} has a damaged index (checksum mismatch){_RESTORE}", path=str(path)
            )
        return [Entry.from_json(name, item) for item in json.loads(raw)]

    # ------------------------------------------------------------- writing

    def flush(
        self,
        records: Iterable[PendingRecord],
        *,
        token: int,
        writer: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> FlushResult:
        """Write ``records`` as one segment and publish the next generation under ``token``.

        Raises Fenced if the store has seen a newer token; nothing is published then, and the
        caller still has every record (it is never dropped here).
        """
        base = self.latest()
        self._check_token(base, token)
        self._ensure_dirs()
        name = f"{base.generation + 1:012d}-{token}-{uuid.uuid4().hex[:12]}"
        entries, size = self._write_segment(name, records, progress)
        if not entries:
            return FlushResult(base.generation, base.token, 0, 0, None)
        counts: dict[str, int] = {}
        for entry in entries:
            counts[entry.db] = max(counts.get(entry.db, 0), entry.index + 1)
        segment_info = {"size": size, "records": len(entries), "index_crc": self.index_crc(name)}

        def build(on: Manifest) -> Manifest:
            databases = {db: dict(info) for db, info in on.databases.items()}
            for db, count in counts.items():
                current = databases.setdefault(db, {"count": 0})
                current["count"] = max(current["count"], count)
            return Manifest(
                project=self.project_id,
                token=token,
                writer=dict(writer or {}),
                segments={**on.segments, name: segment_info},
                databases=databases,
                retired=dict(on.retired),
                last_flush={"at": time.time(), **(writer or {})},
            )

        try:
            published = self._publish(base, build, token)
        except BaseException:
            # Not referenced by any manifest: removing it loses nothing (the caller keeps the data).
            with contextlib.suppress(OSError):
                self.segment_path(name).unlink()
            raise
        return FlushResult(published.generation, token, len(entries), size, name)

    def fence(self, token: int, writer: dict[str, str] | None = None) -> Manifest:
        """Publish a generation that only raises the token: from now on older holders are refused."""
        base = self.latest()
        if base.token >= token and base.generation > 0:
            self._check_token(base, token)
            return base
        self._ensure_dirs()
        return self._publish(
            base,
            lambda on: Manifest(
                project=self.project_id,
                token=token,
                writer=dict(writer or {}),
                segments=dict(on.segments),
                databases={db: dict(info) for db, info in on.databases.items()},
                retired=dict(on.retired),
                last_flush=dict(on.last_flush),
            ),
            token,
        )

    def _check_token(self, manifest: Manifest, token: int) -> None:
        if manifest.token > token:
            who = manifest.writer.get("host", "another host")
            raise Fenced(
                f"the project store has seen fencing token {manifest.token} (held by {who}), newer than this "
                f"host's {token}: this host's lease was lost, so its unflushed data was not written over "
                "the newer work; it is kept aside (see `dbguard recover`)",
                token=token,
                current=manifest.token,
            )

    def _ensure_dirs(self) -> None:
        try:
            self.segments_dir.mkdir(parents=True, exist_ok=True)
            self.manifests_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error(self.root, exc) from exc

    def _write_segment(
        self, name: str, records: Iterable[PendingRecord], progress: Callable[[int], None] | None
    ) -> tuple[list[Entry], int]:
        path = self.segment_path(name)
        entries: list[Entry] = []
        try:
            with open(path, "wb") as handle:
                offset = 0
                for record in records:
                    pad = -offset % ALIGN
                    if pad:
                        handle.write(b"\0" * pad)
                        offset += pad
                    handle.write(record.payload)
                    length = (
                        len(record.payload) if isinstance(record.payload, bytes) else record.payload.nbytes
                    )
                    entries.append(
                        Entry(
                            record.db,
                            record.index,
                            name,
                            offset,
                            length,
                            record.dtype,
                            record.shape,
                            record_crc(record.payload, record.attrs),
                            record.attrs,
                        )
                    )
                    offset += length
                    if progress is not None:
                        progress(length)
                index = json.dumps([e.to_json() for e in entries], separators=(",", ":")).encode()
                handle.write(index)
                handle.write(_TRAILER.pack(_MAGIC, FORMAT, offset, len(index), crc32(index)))
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            fsync_dir(self.segments_dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise _storage_error(self.root, exc) from exc
        if not entries:
            path.unlink()
        return entries, size

    def index_crc(self, name: str) -> int:
        with open(self.segment_path(name), "rb") as handle:
            handle.seek(-_TRAILER.size, os.SEEK_END)
            return int(_TRAILER.unpack(handle.read(_TRAILER.size))[4])

    def _publish(self, base: Manifest, build: Callable[[Manifest], Manifest], token: int) -> Manifest:
        """Compare-and-swap the next generation into place; rebuild on a lost race."""
        for _ in range(100):
            manifest = build(base)
            manifest.generation = base.generation + 1
            manifest.created = time.time()
            # The order in which segments override each other is the order they were published
            # in, recorded here; a name's generation prefix may be stale after a lost race.
            for info in manifest.segments.values():
                info.setdefault("added", manifest.generation)
            target = self.manifest_path(manifest.generation)
            temp = (
                self.manifests_dir
                / f".{manifest.generation:012d}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}"
            )
            body = json.dumps(manifest.to_json(), indent=1).encode()
            try:
                write_synced(temp, body)
                published = _link_exclusive(temp, target, body)
                fsync_dir(self.manifests_dir)
            except OSError as exc:
                raise _storage_error(self.root, exc) from exc
            finally:
                # Also after a failed write (a full disk): no temporary manifest is left behind.
                temp.unlink(missing_ok=True)
            if not published:
                base = self.latest()
                if base.generation < manifest.generation:
                    # The name is taken by a manifest that latest() skipped as damaged. Its token
                    # is unknown, so publishing past it could write over a newer writer's work.
                    raise IntegrityError(
                        f"cannot publish a generation: the newest manifest {target} is damaged, so "
                        "this host cannot tell whether a newer writer has fenced it; nothing was published "
                        "and the data stays in this host's cache. Run `dbguard verify` on the project and "
                        "restore that manifest from a backup",
                        path=str(target),
                    )
                self._check_token(base, token)
                continue
            return manifest
        raise GuardError(f"could not publish a manifest in {self.manifests_dir}: too many concurrent flushes")

    # ---------------------------------------------------------- maintenance

    def compact(self, *, token: int, retire_delay: float, writer: dict[str, str] | None = None) -> Manifest:
        """Merge every live record into one segment; delete segments retired long enough ago.

        A segment stops being referenced when compacted, but readers holding the previous
        manifest may still read it, so it is only deleted ``retire_delay`` seconds later.
        """
        base = self.latest()
        self._check_token(base, token)
        live = self.live_entries(base)
        now = time.time()
        self._ensure_dirs()
        name = f"{base.generation + 1:012d}-{token}-{uuid.uuid4().hex[:12]}"
        entries, size = self._write_segment(name, (self._pending(e) for e in live.values()), None)

        def build(on: Manifest) -> Manifest:
            if on.generation != base.generation:
                raise _Retry
            retired = {n: t for n, t in on.retired.items()}
            for old in on.segments:
                retired.setdefault(old, now)
            segments = (
                {name: {"size": size, "records": len(entries), "index_crc": self.index_crc(name)}}
                if entries
                else {}
            )
            return Manifest(
                project=self.project_id,
                token=token,
                writer=dict(writer or {}),
                segments=segments,
                databases={db: dict(info) for db, info in on.databases.items()},
                retired=retired,
                last_flush=dict(on.last_flush),
            )

        try:
            manifest = self._publish(base, build, token)
        except _Retry:
            with contextlib.suppress(OSError):
                self.segment_path(name).unlink()
            return self.latest()  # someone flushed meanwhile; compaction can wait
        self.delete_retired(manifest, retire_delay)
        return manifest

    def delete_retired(self, manifest: Manifest, retire_delay: float) -> list[str]:
        deleted = []
        cutoff = time.time() - retire_delay
        for name, when in manifest.retired.items():
            if when <= cutoff and name not in manifest.segments:
                with contextlib.suppress(FileNotFoundError):
                    self.segment_path(name).unlink()
                    deleted.append(name)
        # Old manifests that name only deleted segments are useless to any reader.
        for generation in self.generations()[:-2]:
            path = self.manifest_path(generation)
            if path.stat().st_mtime <= cutoff:
                path.unlink(missing_ok=True)
        return deleted

    def live_entries(
        self, manifest: Manifest, index_of: Callable[[str], list[Entry]] | None = None
    ) -> dict[tuple[str, int], Entry]:
        """(db, index) -> the newest entry for it; later segments override earlier ones."""
        read = index_of or self.read_index
        live: dict[tuple[str, int], Entry] = {}
        for name in sorted(manifest.segments, key=lambda n: (manifest.segments[n].get("added", 0), n)):
            for entry in read(name):
                live[(entry.db, entry.index)] = entry
        return live

    def _pending(self, entry: Entry) -> PendingRecord:
        return PendingRecord(
            entry.db, entry.index, entry.dtype, entry.shape, self.read_payload(entry), entry.attrs
        )

    def read_payload(self, entry: Entry, path: Path | None = None) -> bytes:
        with open(path or self.segment_path(entry.segment), "rb") as handle:
            handle.seek(entry.offset)
            payload = handle.read(entry.length)
        if len(payload) != entry.length or record_crc(payload, entry.attrs) != entry.crc:
            raise IntegrityError(
                f"record {entry.index} of {entry.db!r} in segment {path or self.segment_path(entry.segment)} "
                f"does not match its checksum{_RESTORE}",
                path=str(path or self.segment_path(entry.segment)),
            )
        return payload

    def verify(self) -> Iterator[str]:
        """Every problem found, as a sentence; nothing when the store is whole."""
        for generation in self.generations():
            try:
                self.read_manifest(generation)
            except IntegrityError as exc:
                yield str(exc)
            except FileNotFoundError:
                continue
        try:
            manifest = self.latest()
        except IntegrityError:
            return
        for name, info in manifest.segments.items():
            path = self.segment_path(name)
            try:
                entries = self.read_index(name)
                if os.path.getsize(path) != info["size"]:
                    actual = os.path.getsize(path)
                    yield f"segment {path} has {actual} bytes, the manifest says {info['size']}"
                for entry in entries:
                    try:
                        self.read_payload(entry)
                    except IntegrityError as exc:
                        yield str(exc)
            except FileNotFoundError:
                yield f"segment {path} named by generation {manifest.generation} is missing"
            except IntegrityError as exc:
                yield str(exc)


def as_array(entry: Entry, payload: bytes | memoryview) -> NDArray[Any]:
    return np.frombuffer(payload, dtype=np.dtype(entry.dtype)).reshape(entry.shape)


class _Retry(Exception):
    pass


def _storage_error(root: Path, exc: OSError) -> GuardError:
    if exc.errno in NO_SPACE:
        return GuardError(
            f"no space left on the filesystem of {root} ({exc.strerror}); nothing was lost: the data stays "
            "in this host's cache. Free some space there and run `dbguard flush` again"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return GuardError(
            f"cannot write the project store {root} ({exc.strerror}); the data stays in this host's cache. "
            "Make the project directory writable for this user and run `dbguard flush` again"
        )
    return GuardError(f"writing the project store {root} failed: {exc}; the data stays in this host's cache")


# link(2) refusing because the name exists. sshfs (SFTP) reports that as EPERM, not EEXIST,
# when another client created the name an instant before: seen in 247 of 300 raced links.
_LINK_TAKEN = (errno.EEXIST, errno.EPERM)


def _link_exclusive(temp: Path, target: Path, body: bytes) -> bool:
    """Link ``temp`` to ``target`` unless the name is taken: True if ours is now there."""
    try:
        os.link(temp, target)
        return True
    except OSError as exc:
        if exc.errno not in _LINK_TAKEN:
            raise
        try:
            existing = target.read_bytes()
        except FileNotFoundError:
            raise exc from None  # not taken after all: a real refusal (permissions)
        return existing == body  # ours, if the link went through but its reply was lost
