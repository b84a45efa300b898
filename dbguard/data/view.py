"""A read-only view of one generation of a project store, served from verified local copies.

Segments are immutable and uniquely named, so a copy in the node-local cache never goes stale.
Each is copied once, checked record by record against the checksums in its index, and only
then renamed into place; reads are zero-copy numpy views of a memory map of that local copy.
What a reader gets therefore always matches its checksum (invariant 4), and reading it again
costs no trip to the shared filesystem.

The local copies are checked again when they are read: each record once per view, the first
time it is read, and each index against the checksum its manifest gives for it. A copy that
no longer matches (a damaged disk, a stray edit of the cache) is copied from the share again.
Every name from the share becomes a path in the cache only through `dbguard.names.child`.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

# zlib-ng: the CRC-32 of zlib, faster (see data.store).
from zlib_ng.zlib_ng import crc32

from dbguard.data.store import (
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


class StoreView:
    def __init__(self, store: ProjectStore, local_root: Path) -> None:
        self.store = store
        self.cache_dir = local_root
        self.local_dir = _inside(local_root / SEGMENT_CACHE, store.project_id, "")
        self.manifest: Manifest = store.latest()
        self._entries: dict[tuple[str, int], Entry] | None = None
        self._maps: dict[str, mmap.mmap] = {}
        # Records of the local copies whose checksum this view has matched: (segment, offset,
        # length, crc). Read again, they cost nothing more.
        self._verified: set[tuple[str, int, int, int]] = set()

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
        checksum (once per view); a copy that does not match is made again from the share."""
        key = (entry.segment, entry.offset, entry.length, entry.crc)
        mapped = self._map(entry.segment)
        if key in self._verified:
            return mapped
        if not _matches(mapped, entry):
            self._forget(entry.segment)
            mapped = self._map(entry.segment)  # a fresh copy, checked as it is made
            if not _matches(mapped, entry):
                source = self.store.segment_path(entry.segment)
                raise IntegrityError(
                    f"record {entry.index} of {entry.db!r} in segment {source} does not match its "
                    "checksum; run `dbguard verify` on the project",
                    path=str(source),
                )
        self._verified.add(key)
        return mapped

    def _forget(self, name: str) -> None:
        """Drop this view's map of a local copy and the copy itself (arrays handed out from the
        map keep it alive until they go)."""
        self._maps.pop(name, None)
        self._verified = {key for key in self._verified if key[0] != name}
        with contextlib.suppress(FileNotFoundError):
            _inside(self.local_dir, name, ".seg").unlink()

    def _map(self, name: str) -> mmap.mmap:
        mapped = self._maps.get(name)
        if mapped is None:
            path = self._local_copy(name)
            with open(path, "rb") as handle:
                try:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                except ValueError:  # empty: a local copy cut short; records are checked on reading
                    mapped = mmap.mmap(-1, 1)
            self._maps[name] = mapped
        return mapped

    def _local_copy(self, name: str) -> Path:
        local = _inside(self.local_dir, name, ".seg")
        if local.exists():
            return local
        source = self.store.segment_path(name)
        temp = _inside(self.local_dir, f"{name}.{uuid.uuid4().hex[:8]}", ".part")
        try:
            # The share's refusals (permissions) name the segment; a full disk, the cache.
            with share_access(source, "then run the command again"), cache_access(self.cache_dir):
                self.local_dir.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(source, temp)
                except FileNotFoundError as exc:
                    if exc.filename != str(source):
                        raise
                    raise missing_segment(source) from exc
            # Check the copy, not the source: what is read later is the copy. Records that a later
            # segment replaces are never read from it, and may be damaged: that is how `clear`
            # mends a damaged record, by flushing a good copy of it again.
            live = self.entries()
            copied = self.store.read_index(name, temp)  # its trailer first: an empty copy has none
            checked = []
            with open(temp, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for entry in copied:
                    if live.get((entry.db, entry.index)) != entry:
                        continue
                    if not _matches(data, entry):
                        raise IntegrityError(
                            f"record {entry.index} of {entry.db!r} in segment {source} "
                            "does not match its checksum; run `dbguard verify` on the project",
                            path=str(source),
                        )
                    checked.append((name, entry.offset, entry.length, entry.crc))
            os.replace(temp, local)
            self._verified.update(checked)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        return local

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
