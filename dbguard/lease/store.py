"""Durable storage of the lease table, behind one small interface.

The store only keeps records; every rule about leases lives in `dbguard.lease.rules`. The embedded
implementation is an LMDB environment in the broker's state directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import lmdb

from dbguard.cache.lmdb_file import missing_pages
from dbguard.errors import GuardError, IntegrityError
from dbguard.lease import history
from dbguard.lease.rules import worth_keeping

# LMDB errors that mean the environment on disk is damaged or not an LMDB file at all.
_DAMAGE = (lmdb.CorruptedError, lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.PageNotFoundError)


class LeaseStore(ABC):
    """Durable records of the lease table, one JSON-able dict per project."""

    @abstractmethod
    def load(self) -> list[dict[str, Any]]:
        """Every stored project record."""

    @abstractmethod
    def save(
        self, records: list[dict[str, Any]], *, sync: bool, events: list[dict[str, Any]] | None = None
    ) -> None:
        """Store these records, and append these history events, in one atomic commit; with
        ``sync``, on disk before returning."""

    @abstractmethod
    def history(self, project: str | None, since: float, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` events of a project (of every project if None) at or after
        ``since``, oldest first."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """A stable id of this store, so clients can tell one broker state from another."""

    @abstractmethod
    def close(self) -> None: ...


class LmdbLeaseStore(LeaseStore):
    """The embedded store: an LMDB environment that one broker process owns at a time."""

    MAP_SIZE = 1 << 30  # address space only; LMDB allocates pages as records arrive

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise GuardError(
                f"cannot create the broker state directory {self.path}: {exc.strerror}; "
                "choose another with --state"
            ) from exc
        self._lock_fd = self._lock_exclusively()
        try:
            self._check_complete()
            # Commits are not synced by themselves: `save(sync=True)` forces one fdatasync for a
            # whole batch of grants (group commit), and other changes ride along with it.
            self._env = lmdb.open(
                str(self.path / "leases"), map_size=self.MAP_SIZE, max_dbs=4, sync=False, metasync=False
            )
            self._projects = self._env.open_db(b"projects")
            self._meta = self._env.open_db(b"meta")
            # Events keyed by project then sequence number, so a project's are one range and the
            # oldest go first when it has more than history.KEEP_PER_PROJECT.
            self._history = self._env.open_db(b"history")
            self._identity = self._ensure_identity()
            self._history_seq = self._last_history_seq()
            self._history_counts: dict[str, int] = {}
        except _DAMAGE as exc:
            os.close(self._lock_fd)
            raise IntegrityError(
                f"the broker state in {self.path / 'leases'} is damaged ({exc}); move that directory "
                "aside and start the broker again: projects keep their fencing floor in their "
                ".dbguard directory, so tokens stay increasing",
                path=str(self.path),
            ) from exc

    def _check_complete(self) -> None:
        # A data.mdb cut short (a copy or restore that stopped early) keeps meta pages that point
        # past its end. LMDB would read there through its map and die of SIGBUS, with no message:
        # checked before LMDB maps it. Not by the last page number alone: a healthy file may be
        # shorter than that when its last pages are free (see cache.lmdb_file).
        truncated = missing_pages(self.path / "leases")
        if truncated is not None:
            raise lmdb.CorruptedError(truncated)

    def _lock_exclusively(self) -> int:
        # Two brokers on one state directory would each issue tokens from the same counter.
        fd = os.open(self.path / "broker.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise GuardError(
                    f"another broker is already using the state directory {self.path}; "
                    "stop it (dbguard down) or give this one another --state"
                ) from None
            raise
        return fd

    def _ensure_identity(self) -> str:
        with self._env.begin(write=True, db=self._meta) as txn:
            value = txn.get(b"identity")
            if value is None:
                value = uuid.uuid4().hex.encode()
                txn.put(b"identity", value)
        self._env.sync(True)
        return bytes(value).decode()

    @property
    def identity(self) -> str:
        return self._identity

    def _last_history_seq(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            value = txn.get(b"history_seq")
        return int(bytes(value)) if value is not None and bytes(value).isdigit() else 0

    @staticmethod
    def _history_prefix(project: str) -> bytes:
        # Length first: no project name is a prefix of another's range.
        name = project.encode()
        return struct.pack(">H", len(name)) + name

    def _append_history(self, txn: Any, events: list[dict[str, Any]]) -> None:
        history_db = self._history
        for record in events:
            self._history_seq += 1
            prefix = self._history_prefix(str(record["project"]))
            key = prefix + struct.pack(">Q", self._history_seq)
            txn.put(key, json.dumps(record, separators=(",", ":")).encode(), db=history_db)
            count = self._history_counts.get(record["project"])
            if count is None:
                count = sum(1 for _ in self._range(txn, prefix))
            else:
                count += 1
            if count > history.KEEP_PER_PROJECT:
                for old_key, _ in list(self._range(txn, prefix))[: count - history.KEEP_PER_PROJECT]:
                    txn.delete(old_key, db=history_db)
                count = history.KEEP_PER_PROJECT
            self._history_counts[record["project"]] = count
        txn.put(b"history_seq", str(self._history_seq).encode(), db=self._meta)

    def _range(self, txn: Any, prefix: bytes) -> Any:
        cursor = txn.cursor(db=self._history)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not bytes(key).startswith(prefix):
                return
            yield bytes(key), value

    def history(self, project: str | None, since: float, limit: int) -> list[dict[str, Any]]:
        found: list[tuple[int, dict[str, Any]]] = []
        try:
            with self._env.begin(db=self._history) as txn:
                items = (
                    self._range(txn, self._history_prefix(project)) if project is not None else txn.cursor()
                )
                for key, value in items:
                    try:
                        record = json.loads(bytes(value))
                    except ValueError:
                        continue  # a damaged event is history lost, not a reason to refuse the rest
                    if isinstance(record, dict):
                        found.append((struct.unpack(">Q", bytes(key)[-8:])[0], record))
        except _DAMAGE as exc:
            raise IntegrityError(
                f"the broker state in {self.path} is damaged ({exc})", path=str(self.path)
            ) from exc
        found.sort(key=lambda item: item[0])
        return history.select((record for _, record in found), since, limit)

    def load(self) -> list[dict[str, Any]]:
        records = []
        try:
            with self._env.begin(db=self._projects) as txn:
                for key, value in txn.cursor():
                    try:
                        records.append(json.loads(bytes(value)))
                    except ValueError as exc:
                        raise IntegrityError(
                            f"the broker state in {self.path} has a damaged record for project "
                            f"{bytes(key)!r}; move the directory aside and restart the broker",
                            path=str(self.path),
                        ) from exc
        except _DAMAGE as exc:
            raise IntegrityError(
                f"the broker state in {self.path} is damaged ({exc})", path=str(self.path)
            ) from exc
        return records

    def save(
        self, records: list[dict[str, Any]], *, sync: bool, events: list[dict[str, Any]] | None = None
    ) -> None:
        if records or events:
            with self._env.begin(write=True, db=self._projects) as txn:
                if events:
                    self._append_history(txn, events)
                for record in records:
                    key = record["project"].encode()
                    if worth_keeping(record):
                        txn.put(key, json.dumps(record, separators=(",", ":")).encode())
                    else:  # a project never granted: nothing to store (and no old record to keep)
                        txn.delete(key)
        if sync:
            self._env.sync(True)

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()
        os.close(self._lock_fd)
