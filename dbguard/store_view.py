"""A read-only view of one generation of a project store, served from verified local copies.

Segments are immutable and uniquely named, so a copy in the node-local cache never goes stale.
Each is copied once, checked record by record against the checksums in its index, and only
then renamed into place; reads are zero-copy numpy views of a memory map of that local copy.
What a reader gets therefore always matches its checksum (invariant 4), and reading it again
costs no trip to the shared filesystem.
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

from dbguard.errors import IntegrityError
from dbguard.project_store import Entry, Manifest, ProjectStore, record_crc

SEGMENT_CACHE = "segments"


class StoreView:
    def __init__(self, store: ProjectStore, local_root: Path) -> None:
        self.store = store
        self.local_dir = local_root / SEGMENT_CACHE / store.project_id
        self.manifest: Manifest = store.latest()
        self._entries: dict[tuple[str, int], Entry] | None = None
        self._maps: dict[str, mmap.mmap] = {}

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
        mapped = self._map(entry.segment)
        count = math.prod(entry.shape)
        return np.frombuffer(mapped, dtype=np.dtype(entry.dtype), count=count, offset=entry.offset).reshape(
            entry.shape
        )

    def attrs(self, entry: Entry) -> dict[str, Any]:
        value = json.loads(entry.attrs or "{}")
        return value if isinstance(value, dict) else {}

    # ------------------------------------------------------------ internals

    def _index(self, name: str) -> list[Entry]:
        """A segment's index, from the local copy of it if there is one; checked either way."""
        local = self.local_dir / f"{name}.idx.json"
        expected = self.manifest.segments[name].get("index_crc")
        try:
            return [Entry.from_json(name, item) for item in json.loads(local.read_text())]
        except (OSError, ValueError, KeyError):
            pass
        entries = self.store.read_index(name)
        if expected is not None and self.store.index_crc(name) != expected:
            raise IntegrityError(
                f"segment {self.store.segment_path(name)} is not the one its manifest names (index checksum)",
                path=str(self.store.segment_path(name)),
            )
        self.local_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(local, json.dumps([e.to_json() for e in entries]).encode())
        return entries

    def _map(self, name: str) -> mmap.mmap:
        mapped = self._maps.get(name)
        if mapped is None:
            path = self._local_copy(name)
            with open(path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[name] = mapped
        return mapped

    def _local_copy(self, name: str) -> Path:
        local = self.local_dir / f"{name}.seg"
        if local.exists():
            return local
        self.local_dir.mkdir(parents=True, exist_ok=True)
        temp = self.local_dir / f".{name}.{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(self.store.segment_path(name), temp)
            # Check the copy, not the source: what is read later is the copy.
            with open(temp, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for entry in self.store.read_index(name, temp):
                    payload = data[entry.offset : entry.offset + entry.length]
                    if len(payload) != entry.length or record_crc(payload, entry.attrs) != entry.crc:
                        raise IntegrityError(
                            f"record {entry.index} of {entry.db!r} in segment "
                            f"{self.store.segment_path(name)} "
                            "does not match its checksum; run `dbguard verify` on the project",
                            path=str(self.store.segment_path(name)),
                        )
            os.replace(temp, local)
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


def _write_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temp.write_bytes(data)
    os.replace(temp, path)
