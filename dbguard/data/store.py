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
import functools
import json
import math
import os
import re
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

# zlib-ng computes the same CRC-32 as zlib (the format is unchanged) about four times faster;
# checksumming was a fifth of a flush's time.
from zlib_ng.zlib_ng import crc32

from dbguard.data.durable import fsync_dir, write_synced
from dbguard.errors import Fenced, GuardError, IntegrityError, share_access, share_failure
from dbguard.names import (
    DATABASE_NAME_RULE,
    PLAIN_NAME_RULE,
    OutsideRoot,
    child,
    is_database_name,
    is_plain_name,
)

STORE_DIR = "store"
SEGMENTS = "segments"
MANIFESTS = "manifests"
FORMAT = 1
ALIGN = 64

# <generation>.json, 12 digits (more once generation 10**12 is reached).
_MANIFEST_NAME = re.compile(r"[0-9]{12,18}\.json")

# Trailer: magic, format, index offset, index length, index crc32.
_TRAILER = struct.Struct("<8sIQQI")
_MAGIC = b"DBGSEG01"

# What to do about a damaged segment: it is immutable, so a backup's copy is as good as the original.
_RESTORE = "; restore that file from a backup (`dbguard verify` lists every damaged file and record)"

# What each writing method says to do once the share takes writes again (dbguard.errors names
# the share's refusals: full, over quota, read-only, permissions).
_AFTER_FLUSH = (
    "then run `dbguard flush` again. Nothing was published and nothing was lost: what was not "
    "flushed stays in this host's cache (the agent also retries by itself)"
)
_AFTER_FENCE = (
    "then run `dbguard acquire` again. This host did not become the writer: a writer must be able "
    "to write the project store"
)
_AFTER_COMPACT = "the data is safe: compaction is tried again after a later flush"
_AFTER_READ = "then run the command again"

_T = TypeVar("_T")


def _writes(then: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Decorate a method that writes the store: every OSError becomes a GuardError naming the
    path (`share_failure`: ShareRefused, or IntegrityError for a file where a directory belongs
    or the other way round) that says nothing was published; ``then`` says what to do after."""

    def decorate(method: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(method)
        def wrapper(self: ProjectStore, *args: Any, **kwargs: Any) -> _T:
            try:
                return method(self, *args, **kwargs)
            except OSError as exc:
                raise share_failure(self.root, exc, then) from exc

        return wrapper

    return decorate


def _reads(method: Callable[..., _T]) -> Callable[..., _T]:
    """Decorate a method that reads the store: the share's refusals (permissions, a file where a
    directory belongs) become GuardErrors naming the path; the rest is re-raised."""

    @functools.wraps(method)
    def wrapper(self: ProjectStore, *args: Any, **kwargs: Any) -> _T:
        with share_access(self.root, _AFTER_READ):
            return method(self, *args, **kwargs)

    return wrapper


def _reads_segment(method: Callable[..., _T]) -> Callable[..., _T]:
    """Like `_reads`, for a method that reads a segment a manifest names: a missing one is
    damage to the store (segments are never removed while a manifest that a reader may hold
    still names them, see `compact`)."""

    @functools.wraps(method)
    def wrapper(self: ProjectStore, *args: Any, **kwargs: Any) -> _T:
        try:
            with share_access(self.root, _AFTER_READ):
                return method(self, *args, **kwargs)
        except FileNotFoundError as exc:
            raise missing_segment(exc.filename or self.segments_dir) from exc

    return wrapper


def missing_segment(path: Path | str) -> IntegrityError:
    return IntegrityError(
        f"segment {path} is missing: a manifest of the project store names it, so its records "
        f"cannot be read (a reader that kept an old generation open for longer than retire_delay "
        f"reads the newest one once it reopens){_RESTORE}",
        path=str(path),
    )


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
        """The entry an index holds, checked field by field: an index is read from the share,
        where anyone with write access may have put anything (ValueError says what is wrong)."""
        if not isinstance(item, dict):
            raise ValueError(f"an index entry is {type(item).__name__}, not an object")
        db, index, offset, length = item["db"], item["i"], item["off"], item["len"]
        dtype, shape, crc, attrs = item["dtype"], item["shape"], item["crc"], item["attrs"]
        # One test for the usual entry (an index may hold 100,000); the checks one by one, to
        # say what is wrong, only when it fails.
        if not (
            type(index) is int
            and type(offset) is int
            and type(length) is int
            and type(crc) is int
            and 0 <= index < _LIMIT
            and 0 <= offset < _LIMIT
            and 0 <= length < _LIMIT
            and 0 <= crc < 1 << 32
            and type(shape) is list
            and len(shape) <= _MAX_DIMENSIONS
            and all(type(n) is int and 0 <= n < _LIMIT for n in shape)
            and type(dtype) is str
            and type(attrs) is str
            and is_database_name(db)
        ):
            if type(shape) is not list or len(shape) > _MAX_DIMENSIONS:
                raise ValueError(f"shape {shape!r} is not a list of at most {_MAX_DIMENSIONS} sizes")
            _database_name(db)
            _count(index, "record index")
            _count(offset, "offset")
            _count(length, "length")
            _count(crc, "checksum", below=1 << 32)
            _text(dtype, "dtype")
            _text(attrs, "attrs")
            for n in shape:
                _count(n, "dimension")
        items = math.prod(shape)
        if record_dtype(dtype).itemsize * items != length:
            raise ValueError(f"record {index} of {db!r}: {length} bytes do not hold {shape} {dtype}")
        # The length bounds the items only where they have a size: of a dtype whose items have
        # none ("V0"), any number fit in no bytes, yet numpy counts an array's items in a signed
        # 64-bit integer (np.empty((3, 2**62), "V0").size is negative; frombuffer overflows).
        if items >= _LIMIT:
            raise ValueError(f"record {index} of {db!r}: shape {shape} holds more than {_LIMIT - 1} items")
        return cls(db, index, _segment_name(segment), offset, length, dtype, tuple(shape), crc, attrs)


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
        """The manifest a file holds, checked field by field (ValueError says what is wrong): a
        checksum only proves the file whole, not that whoever wrote it wrote sense. Every name
        in it becomes a path (segments) or a key (databases) only in its allowed form."""
        project = data["project"]
        if not isinstance(project, str) or (project and not is_plain_name(project)):
            raise ValueError(f"project id {project!r} is not a plain name ({PLAIN_NAME_RULE})")
        return cls(
            generation=_count(data["generation"], "generation"),
            token=_count(data["token"], "token"),
            project=project,
            created=_number(data["created"], "created"),
            writer=_flat(data.get("writer") or {}, "writer"),
            segments={
                _segment_name(name): _counts(info, f"segment {name}")
                for name, info in _object(data["segments"], "segments").items()
            },
            databases={
                _database_name(name): _counts(info, f"database {name}")
                for name, info in _object(data["databases"], "databases").items()
            },
            retired={
                _segment_name(name): _number(when, f"retired {name}")
                for name, when in _object(data.get("retired") or {}, "retired").items()
            },
            last_flush=_flat(data.get("last_flush") or {}, "last_flush"),
        )


# ---------------------------------------------------------------- what files may hold

# numpy's own limit is 64; no image stack has more than a handful.
_MAX_DIMENSIONS = 32
# Every count and offset in a manifest or an index is below this (a signed 64-bit integer).
_LIMIT = 1 << 63


def _segment_name(name: Any) -> str:
    if not is_plain_name(name):
        raise ValueError(f"segment name {name!r} is not a plain name ({PLAIN_NAME_RULE})")
    return str(name)


def _database_name(name: Any) -> str:
    if not is_database_name(name):
        raise ValueError(f"database name {name!r} is not {DATABASE_NAME_RULE}")
    return str(name)


def _count(value: Any, what: str, below: int = _LIMIT) -> int:
    if type(value) is not int or not 0 <= value < below:
        raise ValueError(f"{what} {value!r} is not a whole number from 0 to {below - 1}")
    return value


def _number(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"{what} {value!r} is not a number")
    return float(value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not text")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}, not an object")
    return value


def _counts(value: Any, what: str) -> dict[str, int]:
    return {key: _count(number, f"{what}: {key}") for key, number in _object(value, what).items()}


def _flat(value: Any, what: str) -> dict[str, Any]:
    """An object of plain values (who wrote, when), shown to people as it is."""
    for key, item in _object(value, what).items():
        if item is not None and type(item) not in (str, int, float, bool):
            raise ValueError(f"{what}: {key} is {type(item).__name__}, not a plain value")
    return dict(value)


@functools.lru_cache(maxsize=256)
def record_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype an index names, if it is one a record can have: plain numbers, booleans,
    fixed-width strings and bytes, as the cache stores them (ValueError otherwise). numpy must
    never be handed object pointers, fields or sub-arrays from a file."""
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ValueError(f"dtype {name!r} is not a numpy dtype") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"dtype {name!r} is not one a record can have")
    # Strings of no length: numpy makes no array of them (it gives "S" one byte), so no record
    # has them. Void items of no size it does make (np.zeros(3, "V0")), and a record can hold.
    if dtype.itemsize == 0 and dtype.kind != "V":
        raise ValueError(f"dtype {name!r} has items of no size, which no array has")
    return dtype


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
        self._segment_paths: dict[str, Path] = {}  # checked once each (symlinks resolved)

    # ------------------------------------------------------------- reading

    @_reads
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
        # Only names dbguard writes: int() would take other digits, and refuse 5,000 of them.
        listed = sorted(int(n[:-5]) for n in names if _MANIFEST_NAME.fullmatch(n))
        probe = (listed[-1] if listed else 0) + 1
        while self.manifest_path(probe).exists():
            listed.append(probe)
            probe += 1
        return listed

    def manifest_path(self, generation: int) -> Path:
        return self.manifests_dir / f"{generation:012d}.json"

    @_reads
    def read_manifest(self, generation: int) -> Manifest:
        manifest = self._load_manifest(generation)
        path = self.manifest_path(generation)
        if manifest.project and manifest.project != self.project_id:
            raise IntegrityError(
                f"manifest {path} belongs to project {manifest.project}, not to {self.project_id}, which "
                f"{path.parents[2] / 'project.json'} names. If that project.json was made anew after the "
                "old one was lost, move it aside and run the command again: dbguard then takes the "
                "project's id back from its store. Otherwise restore the project's .dbguard directory "
                "from a backup",
                path=str(path),
            )
        return manifest

    @_reads
    def recorded_identity(self) -> tuple[str, int] | None:
        """The project id that the newest whole manifest records, and its generation; None if
        no manifest records one. Every manifest records its project's id: this is what a lost
        project.json said (this store's own ``project_id`` plays no part)."""
        for generation in reversed(self.generations()):
            try:
                manifest = self._load_manifest(generation)
            except (FileNotFoundError, IntegrityError):
                continue
            if manifest.project:
                return manifest.project, generation
        return None

    def _load_manifest(self, generation: int) -> Manifest:
        path = self.manifest_path(generation)
        try:
            data = json.loads(path.read_bytes())
            checksum = data.pop("checksum")
            if checksum != _crc_json(data):
                raise ValueError("checksum mismatch")
            manifest = Manifest.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise IntegrityError(
                f"manifest {path} is damaged ({exc}); `dbguard verify` lists what it affects, and the "
                "previous generation is still readable",
                path=str(path),
            ) from exc
        if manifest.generation != generation:
            raise IntegrityError(
                f"manifest {path} holds generation {manifest.generation}, not {generation}: it was copied or "
                "renamed by something other than dbguard; restore it from a backup",
                path=str(path),
            )
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
        """Where segment ``name`` lives: only a plain name, and only inside the segments
        directory (a symlink that leads out is refused too), as IntegrityError otherwise. Names
        come from manifests, which anyone who can write the share can write."""
        path = self._segment_paths.get(name)
        if path is None:
            try:
                path = child(self.segments_dir, name, ".seg")
            except OutsideRoot as exc:
                raise IntegrityError(
                    f"the project store {self.root} names a segment that is not one: {exc}. A manifest "
                    "or index was damaged or written by something other than dbguard; run `dbguard "
                    "verify` on the project and restore the store from a backup",
                    path=str(self.segments_dir),
                ) from exc
            if len(self._segment_paths) < 4096:
                self._segment_paths[name] = path
        return path

    @_reads_segment
    def read_index(self, name: str, path: Path | None = None) -> list[Entry]:
        """The records of one segment, checked against its trailer's checksum."""
        path = path or self.segment_path(name)
        raw, crc = self.read_index_bytes(name, path)
        return parse_index(path, name, raw, crc)

    @_reads_segment
    def read_index_bytes(self, name: str, path: Path | None = None) -> tuple[bytes, int]:
        """A segment's index as stored, and the checksum its trailer gives for it (not checked
        here: `parse_index` does)."""
        path = path or self.segment_path(name)
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - TRAILER_SIZE))
            offset, length, crc = parse_trailer(path, size, handle.read(TRAILER_SIZE))
            handle.seek(offset)
            raw = handle.read(length)
        return raw, crc

    # ------------------------------------------------------------- writing

    @_writes(_AFTER_FLUSH)
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
        self.check_token(base, token)
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

    @_writes(_AFTER_FENCE)
    def fence(self, token: int, writer: dict[str, str] | None = None) -> Manifest:
        """Publish a generation that only raises the token: from now on older holders are refused."""
        base = self.latest()
        if base.token >= token and base.generation > 0:
            self.check_token(base, token)
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

    def check_token(self, manifest: Manifest, token: int) -> None:
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
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self.manifests_dir.mkdir(parents=True, exist_ok=True)

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
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if not entries:
            path.unlink()
        return entries, size

    @_reads_segment
    def index_crc(self, name: str) -> int:
        path = self.segment_path(name)
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TRAILER_SIZE))
            return parse_trailer(path, size, handle.read(TRAILER_SIZE))[2]

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
                self.check_token(base, token)
                continue
            return manifest
        raise GuardError(f"could not publish a manifest in {self.manifests_dir}: too many concurrent flushes")

    # ---------------------------------------------------------- maintenance

    @_writes(_AFTER_COMPACT)
    def compact(self, *, token: int, retire_delay: float, writer: dict[str, str] | None = None) -> Manifest:
        """Merge every live record into one segment; delete segments retired long enough ago.

        A segment stops being referenced when compacted, but readers holding the previous
        manifest may still read it, so it is only deleted ``retire_delay`` seconds later.
        """
        base = self.latest()
        self.check_token(base, token)
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

    @_writes(_AFTER_COMPACT)
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

    @_reads_segment
    def read_payload(self, entry: Entry, path: Path | None = None) -> bytes:
        with open(path or self.segment_path(entry.segment), "rb") as handle:
            # An index may name any length (below 2**63): read(n) makes room for n bytes first,
            # so a record that does not fit in the file is not read at all.
            payload = b""
            if entry.offset + entry.length <= os.fstat(handle.fileno()).st_size:
                handle.seek(entry.offset)
                payload = handle.read(entry.length)
        if len(payload) != entry.length or record_crc(payload, entry.attrs) != entry.crc:
            raise IntegrityError(
                f"record {entry.index} of {entry.db!r} in segment {path or self.segment_path(entry.segment)} "
                f"does not match its checksum{_RESTORE}",
                path=str(path or self.segment_path(entry.segment)),
            )
        return payload

    def verify(self, superseded: list[str] | None = None) -> Iterator[str]:
        """Every problem found, as a sentence; nothing when the store is whole.

        A damaged record that a later segment replaces is not a problem: no reader of this
        generation reads it (`clear` mends damage that way, by flushing a good copy again), and
        compaction leaves it behind. It is reported into ``superseded`` when that is given.
        """
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
        indexes: dict[str, list[Entry]] = {}
        for name, info in manifest.segments.items():
            try:
                path = self.segment_path(name)
                raw, crc = self.read_index_bytes(name)
                if "index_crc" in info and crc != info["index_crc"]:
                    yield (
                        f"segment {path} is not the one generation {manifest.generation} names "
                        "(index checksum)"
                    )
                    continue
                indexes[name] = parse_index(path, name, raw, crc)
                actual = os.path.getsize(path)
                if actual != info.get("size", actual):
                    yield f"segment {path} has {actual} bytes, the manifest says {info['size']}"
            except FileNotFoundError:
                yield f"segment {path} named by generation {manifest.generation} is missing"
            except IntegrityError as exc:
                yield str(exc)
            except OSError as exc:  # what the share refuses or fails, said for this segment
                yield f"segment {self.segments_dir / name}.seg cannot be read ({exc.strerror or exc})"
        # With an index unreadable, what it replaces is unknown: every record counts then.
        whole = len(indexes) == len(manifest.segments)
        live = self.live_entries(manifest, lambda name: indexes[name]) if whole else {}
        for entries in indexes.values():
            for entry in entries:
                try:
                    self.read_payload(entry)
                except IntegrityError as exc:
                    if whole and live.get((entry.db, entry.index)) != entry:
                        if superseded is not None:
                            superseded.append(str(exc))
                        continue
                    yield str(exc)


TRAILER_SIZE = _TRAILER.size


def parse_trailer(path: Path, size: int, trailer: bytes) -> tuple[int, int, int]:
    """Where a segment of ``size`` bytes keeps its index, from its last TRAILER_SIZE bytes:
    (offset, length, crc32); IntegrityError if they are not a trailer of this format."""
    if size < _TRAILER.size or len(trailer) != _TRAILER.size:
        raise IntegrityError(f"segment {path} is truncated ({size} bytes){_RESTORE}", path=str(path))
    magic, fmt, offset, length, crc = _TRAILER.unpack(trailer)
    if magic != _MAGIC or fmt != FORMAT or offset + length + _TRAILER.size != size:
        raise IntegrityError(f"segment {path} has a damaged trailer{_RESTORE}", path=str(path))
    return offset, length, crc


def parse_index(path: Path, name: str, raw: bytes, crc: int) -> list[Entry]:
    """The entries of segment ``name`` from its index bytes, checked against the trailer's crc
    and entry by entry (`Entry.from_json`)."""
    if crc32(raw) != crc:
        raise IntegrityError(
            f"segment {path} has a damaged index (checksum mismatch){_RESTORE}", path=str(path)
        )
    try:
        items = json.loads(raw)
        if not isinstance(items, list):
            raise ValueError(f"the index is {type(items).__name__}, not a list")
        return [Entry.from_json(name, item) for item in items]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"segment {path} has a damaged index ({exc}){_RESTORE}", path=str(path)) from exc


def as_array(entry: Entry, payload: bytes | memoryview) -> NDArray[Any]:
    return np.frombuffer(payload, dtype=np.dtype(entry.dtype)).reshape(entry.shape)


class _Retry(Exception):
    pass


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
