"""A read-only view of one generation of a project store, served from verified local copies.

Reading costs what is read. Segments are immutable and uniquely named, so the node-local copy
of one never goes stale, and it is kept sparse: a file of the segment's size in which only the
records read so far (and those read ahead of a sequential scan) are filled in, each at its own
offset. A record is fetched from the share with one positioned read, checked against the
checksum in its index in memory, and only a record that matches is written to the local copy;
reads are zero-copy numpy views of a memory map of that copy. A head node that looks at record
12 of a 40 GiB stack fetches record 12 and the segment's index, nothing else.

Every record is checked again the first time a view reads it from the local copy, and each
index against the checksum its manifest gives for it, so what a reader gets always matches its
checksum (invariant 4), whatever part of the segment was fetched and whatever happened to the
local copy since; a record that does not match there is fetched again. Local copies are bounded
(`DEFAULT_READ_CACHE`): past the bound, the least recently written are dropped. Every name from
the share becomes a path in the cache only through `dbguard.names.child`.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

# zlib-ng: the CRC-32 of zlib, faster (see data.store).
from zlib_ng.zlib_ng import crc32

from dbguard.data.store import (
    ALIGN,
    Entry,
    Manifest,
    ProjectStore,
    missing_segment,
    parse_index,
    record_crc,
    record_dtype,
)
from dbguard.errors import IntegrityError, cache_access, share_access
from dbguard.names import OutsideRoot, child

SEGMENT_CACHE = "segments"
_INDEX_SUFFIX = ".idx"  # a segment's index as stored (format 1 kept it as .idx.json, unchecked)
# How many bytes of local copies a host keeps for readers, across projects, before it drops the
# least recently written ones.
DEFAULT_READ_CACHE = 8 << 30
# A sequential scan fetches ahead: the window doubles from the first record up to this.
_READAHEAD_MAX = 32 << 20
_READAHEAD_MIN = 1 << 20
# How many bytes a view fetches between two looks at the size of all local copies.
_TRIM_EVERY = 256 << 20


class StoreView:
    def __init__(
        self, store: ProjectStore, local_root: Path, *, read_cache: int = DEFAULT_READ_CACHE
    ) -> None:
        self.store = store
        self.cache_dir = local_root
        self.local_dir = _inside(local_root / SEGMENT_CACHE, store.project_id, "")
        self.read_cache = read_cache
        self.manifest: Manifest = store.latest()
        self._entries: dict[tuple[str, int], Entry] | None = None
        self._maps: dict[str, mmap.mmap] = {}
        # Records of the local copies whose checksum this view has matched: (segment, offset,
        # length, crc). Read again, they cost nothing more.
        self._verified: set[tuple[str, int, int, int]] = set()
        # Per segment: its live records in file order, and where the last fetch ended (a fetch
        # that starts there is a sequential scan, and reads ahead) with its window.
        self._layout: dict[str, list[Entry]] = {}
        self._next_fetch: dict[str, tuple[int, int]] = {}
        self.fetched = 0  # bytes this view read from the share (records and read-ahead)
        self._fetched_since_trim = 0

    def refresh(self) -> bool:
        """Move to the newest generation; True if there was a newer one."""
        newest = self.store.latest()
        if newest.generation == self.manifest.generation:
            return False
        self.manifest = newest
        self._entries = None
        return True

    @property
    def generation(self) -> int:
        return self.manifest.generation

    def databases(self) -> list[str]:
        return sorted(self.manifest.databases)

    def count(self, db: str) -> int:
        return int(self.manifest.databases.get(db, {}).get("count", 0))

    def entries(self) -> dict[tuple[str, int], Entry]:
        if self._entries is None:
            self._entries = self.store.live_entries(self.manifest, self._index)
        return self._entries

    def entry(self, db: str, index: int) -> Entry | None:
        return self.entries().get((db, index))

    def array(self, entry: Entry) -> NDArray[Any]:
        """A read-only, zero-copy view of the record in the verified local copy."""
        mapped = self._checked_map(entry)
        dtype = record_dtype(entry.dtype)
        if dtype.itemsize == 0:
            # Void items of no size (np.zeros(3, "V0"), which the cache keeps as any record):
            # numpy's frombuffer refuses them, and there are no bytes to share.
            empty = np.empty(entry.shape, dtype=dtype)
            empty.flags.writeable = False
            return empty
        count = math.prod(entry.shape)
        return np.frombuffer(mapped, dtype=dtype, count=count, offset=entry.offset).reshape(entry.shape)

    def attrs(self, entry: Entry) -> dict[str, Any]:
        try:
            value = json.loads(entry.attrs or "{}")
        except (ValueError, RecursionError) as exc:
            path = self.store.segment_path(entry.segment)
            raise IntegrityError(
                f"record {entry.index} of {entry.db!r} in segment {path} has attrs that are not JSON "
                f"({exc}); run `dbguard verify` on the project",
                path=str(path),
            ) from exc
        return value if isinstance(value, dict) else {}

    # ------------------------------------------------------------ internals

    def _index(self, name: str) -> list[Entry]:
        """A segment's index, from the local copy of it if that still has the checksum the
        manifest gives (else from the share, checked the same way, and kept locally again)."""
        expected = self.manifest.segments[name].get("index_crc")
        local = _inside(self.local_dir, name, _INDEX_SUFFIX)
        if expected is not None:
            with contextlib.suppress(OSError):
                raw = local.read_bytes()
                if crc32(raw) == expected:
                    return parse_index(local, name, raw, expected)
        raw, crc = self.store.read_index_bytes(name)
        source = self.store.segment_path(name)
        if expected is not None and crc != expected:
            raise IntegrityError(
                f"segment {source} is not the one its manifest names (index checksum)", path=str(source)
            )
        entries = parse_index(source, name, raw, crc)
        if expected is not None:
            with cache_access(self.cache_dir):
                self.local_dir.mkdir(parents=True, exist_ok=True)
                _write_atomically(local, raw)
        return entries

    def _checked_map(self, entry: Entry) -> mmap.mmap:
        """The map of the local copy that holds ``entry``, its bytes matched with the entry's
        checksum (once per view); a record the copy lacks, or holds damaged, is fetched."""
        key = (entry.segment, entry.offset, entry.length, entry.crc)
        mapped = self._maps.get(entry.segment)
        if mapped is not None and key in self._verified:
            return mapped
        if mapped is None:
            mapped = self._existing_map(entry.segment)
        if mapped is None or not _matches(mapped, entry):
            mapped = self._fetch(entry)
        self._verified.add(key)
        return mapped

    def _existing_map(self, name: str) -> mmap.mmap | None:
        """A map of the local copy another view (or process) left, if there is one."""
        local = _inside(self.local_dir, name, ".seg")
        try:
            with cache_access(self.cache_dir), open(local, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (FileNotFoundError, ValueError):  # none, or an empty one
            return None
        self._maps[name] = mapped
        return mapped

    def _fetch(self, entry: Entry) -> mmap.mmap:
        """Read ``entry`` (and, for a sequential scan, the records after it) from the share with
        one positioned read, check each against its checksum in memory, and write those that
        match into the local copy; IntegrityError if ``entry`` itself does not match."""
        name = entry.segment
        source = self.store.segment_path(name)
        layout = self._records_of(name)
        start = entry.offset
        expected_start, window = self._next_fetch.get(name, (-1, _READAHEAD_MIN))
        # Sequential: the record right after the last fetch (records are padded to ALIGN bytes).
        sequential = expected_start <= start < expected_start + ALIGN
        window = min(window * 2, _READAHEAD_MAX) if sequential else 0
        wanted = [entry]
        if window:
            position = next((i for i, e in enumerate(layout) if e.offset == start), None)
            if position is not None:
                end_limit = start + window
                wanted = [e for e in layout[position:] if e.offset + e.length <= end_limit] or [entry]
        end = max(e.offset + e.length for e in wanted)
        with share_access(source, "then run the command again"):
            try:
                with open(source, "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    data = os.pread(handle.fileno(), end - start, start)
            except FileNotFoundError as exc:
                raise missing_segment(source) from exc
        self.fetched += len(data)
        self._fetched_since_trim += len(data)
        good = []
        with memoryview(data) as whole:
            for record in wanted:
                at = record.offset - start
                if at + record.length <= len(data):
                    with whole[at : at + record.length] as payload:
                        if record_crc(payload, record.attrs) == record.crc:
                            good.append(record)
        if entry not in good:
            raise IntegrityError(
                f"record {entry.index} of {entry.db!r} in segment {source} does not match its "
                "checksum; run `dbguard verify` on the project",
                path=str(source),
            )
        self._next_fetch[name] = (end, max(window, _READAHEAD_MIN))
        mapped = self._write_local(name, size, start, data, good)
        if self._fetched_since_trim >= _TRIM_EVERY:
            self._fetched_since_trim = 0
            self._trim()
        return mapped

    def _records_of(self, name: str) -> list[Entry]:
        """The live records of a segment in file order (what read-ahead may fetch)."""
        layout = self._layout.get(name)
        if layout is None:
            layout = sorted((e for e in self.entries().values() if e.segment == name), key=lambda e: e.offset)
            self._layout[name] = layout
        return layout

    def _write_local(self, name: str, size: int, start: int, data: bytes, good: list[Entry]) -> mmap.mmap:
        """Write the checked records into the local copy (made, sparse, at the segment's size if
        it is missing or of another size) and return this view's map of it."""
        local = _inside(self.local_dir, name, ".seg")
        with cache_access(self.cache_dir):
            self.local_dir.mkdir(parents=True, exist_ok=True)
            mapped = self._maps.get(name)
            if mapped is not None and len(mapped) != size:
                self._maps.pop(name, None)  # arrays handed out keep the old map alive
                mapped = None
            descriptor = os.open(local, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(descriptor).st_size != size:
                    # Another size: not a copy of this segment (cut short, or damaged). Start over
                    # in a fresh file, so that maps of the old one stay what they were.
                    os.close(descriptor)
                    temp = _inside(self.local_dir, f"{name}.{uuid.uuid4().hex[:8]}", ".part")
                    descriptor = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                    os.ftruncate(descriptor, size)
                    os.replace(temp, local)
                    mapped = None
                    self._verified = {key for key in self._verified if key[0] != name}
                with memoryview(data) as whole:
                    for record in good:
                        at = record.offset - start
                        os.pwrite(descriptor, whole[at : at + record.length], record.offset)
                if mapped is None:
                    mapped = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ) if size else mmap.mmap(-1, 1)
                    self._maps[name] = mapped
            finally:
                os.close(descriptor)
        return mapped

    def _trim(self) -> None:
        """Keep every project's local copies together under ``read_cache`` bytes on disk: drop
        the least recently written first, never one this view has mapped."""
        root = self.cache_dir / SEGMENT_CACHE
        copies = []
        with contextlib.suppress(OSError):
            for path in root.glob("*/*.seg"):
                with contextlib.suppress(OSError):
                    info = path.stat()
                    copies.append((info.st_mtime, info.st_blocks * 512, path))
        total = sum(used for _, used, _ in copies)
        mine = {_inside(self.local_dir, name, ".seg") for name in self._maps}
        for _, used, path in sorted(copies):
            if total <= self.read_cache:
                return
            if path in mine:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= used

    def close(self) -> None:
        for mapped in self._maps.values():
            # Arrays handed out may still export the buffer; then the map closes with them.
            with contextlib.suppress(BufferError):
                mapped.close()
        self._maps.clear()


def _matches(data: mmap.mmap, entry: Entry) -> bool:
    """Whether ``data`` holds ``entry``'s record where its index says, with its checksum."""
    end = entry.offset + entry.length
    if end > len(data):
        return False
    with memoryview(data) as whole, whole[entry.offset : end] as payload:
        return record_crc(payload, entry.attrs) == entry.crc


def _inside(root: Path, name: str, suffix: str) -> Path:
    """``root/name+suffix`` for a name that stays there (`child`); IntegrityError otherwise: the
    names come from the share (a project id, a segment name)."""
    try:
        return child(root, name, suffix)
    except OutsideRoot as exc:
        raise IntegrityError(
            f"the project store names something that cannot be kept in the cache {root}: {exc}; run "
            "`dbguard verify` on the project",
            path=str(root),
        ) from exc


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temp.write_bytes(data)
    os.replace(temp, path)
