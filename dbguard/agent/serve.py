"""Serving a project to worker nodes: the holder's side of `dbguard serve`.

One process per served project, started by this host's agent (`serving.Servers`) while it holds
the writer lease, and stopped by it when the lease ends, the agent dies (the kernel sends it
SIGTERM: PR_SET_PDEATHSIG) or serving is switched off. It is a local writer like any other
process of this host: it opens the project's image databases with `dbguard.open` (the same
cache, the same dirty mark before the first write, the same lease check before every write), and
answers workers over one ZeroMQ ROUTER socket (data.wire). Reads see this host's current records,
unflushed ones included; appends land in the cache and reach the share with the agent's flushes,
under this host's token.

A worker pins the token it met at its first request: a server under another token (this host
lost the lease and was granted a new one) refuses it with `LeaseLost`, so nothing a worker
believed it wrote under one lease is silently continued under another.

Run as ``python -P -m dbguard.agent.serve PROJECT_ID PATH ADDRESS``; it prints one JSON line on
stdout when it listens (``{"address": ..., "bound": ..., "key": ...}``) or when it cannot
(``{"error": ...}``, a GuardError's reply), then serves until SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from dbguard.agent import local as local_agent
from dbguard.agent.lease_check import WriterGuard
from dbguard.cache import CacheError, CacheStore
from dbguard.data import wire
from dbguard.data.imagedb import ImageDB, database_names
from dbguard.data.project import Project
from dbguard.data.wire import DataOp
from dbguard.errors import GuardError, LeaseLost, UsageError, from_cache_error
from dbguard.lease import keys as key_files
from dbguard.lease.protocol import ProtocolError, reply_ok
from dbguard.names import DATABASE_NAME_RULE, is_database_name
from dbguard.settings import Settings, load

log = logging.getLogger("dbguard.agent.serve")

_PR_SET_PDEATHSIG = 1
# Requests taken off the socket per turn (their appends batched per database), and the bytes
# they may hold: a batch is one cache transaction, whose dirty pages LMDB keeps in memory.
_BATCH = 256
_BATCH_BYTES = 64 << 20
# Messages queued on the socket before ZeroMQ stops reading from workers (they wait, in TCP).
_RECEIVE_QUEUE = 64
# Appends' request ids are kept this long (a worker resends for at most serve_retry, <= 1 h),
# and forgotten this often.
_IDS_KEPT = 86_400.0
_FORGET_EVERY = 600.0


class ProjectServer:
    """Answers workers' requests for one project on one socket."""

    def __init__(self, settings: Settings, project: Project, address: str) -> None:
        self.settings = settings
        self.project = project
        self.cache_dir = local_agent.cache_dir(settings)
        self._guard = WriterGuard(self.cache_dir, project)
        self.token = int(self._guard.check()["token"])
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_RECORD_BYTES + wire.MAX_HEADER_BYTES)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._socket.setsockopt(zmq.RCVHWM, _RECEIVE_QUEUE)
        self._authenticator: ThreadAuthenticator | None = None
        self.public_key: str | None = None
        if settings.keys is not None:
            # Workers present their own client keys; only those in this machine's authorized/
            # (and operators/) directory get through the handshake.
            mine = key_files.client_keys(settings.keys)
            accepted = key_files.BrokerKeys(mine.public, mine.secret, settings.keys)
            self._authenticator = ThreadAuthenticator(self._context)
            self._authenticator.start()
            self._authenticator.configure_curve_callback(
                domain="*", credentials_provider=key_files.AcceptKnownKeys(accepted, "worker")
            )
            self._socket.curve_secretkey = mine.secret
            self._socket.curve_publickey = mine.public
            self._socket.curve_server = True
            self.public_key = mine.public.decode()
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self.close()
            raise UsageError(
                f"cannot serve {project.path} on {address}: {exc}. Pass --address tcp://HOST:PORT with "
                "an address of this host that workers can reach and a free port (0 picks one)"
            ) from None
        self.bound = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = _advertised(self.bound, address)
        self._databases: dict[str, ImageDB] = {}
        self._catalog: ImageDB | None = None
        # A plain flag, not a threading.Event: `stop` runs in signal handlers, and a second signal
        # arriving inside Event.set would wait forever for the lock the first one holds.
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        next_forget = time.monotonic() + _FORGET_EVERY
        parent = os.getppid()
        try:
            while not self._stopping:
                if poller.poll(200):
                    self._serve_ready()
                if os.getppid() != parent:  # the agent died and the death signal did not come
                    break
                if time.monotonic() >= next_forget:
                    next_forget = time.monotonic() + _FORGET_EVERY
                    self._forget_old_ids()
        finally:
            self.close()

    def close(self) -> None:
        for db in self._databases.values():
            with contextlib.suppress(Exception):
                db.close()
        self._databases.clear()
        if self._catalog is not None:
            self._catalog.close()
        self._socket.close()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def _forget_old_ids(self) -> None:
        try:
            store = CacheStore(self.cache_dir, self.project.id, create=False)
        except (CacheError, FileNotFoundError):
            return  # nothing written yet, or a damaged cache the writes will report
        try:
            forgotten = store.forget_once(time.time() - _IDS_KEPT)
        except CacheError as exc:
            log.warning("could not forget old request ids: %s", exc)
        else:
            if forgotten:
                log.info("forgot %d request ids older than a day", forgotten)
        finally:
            store.close()

    # ----------------------------------------------------------- requests

    def _serve_ready(self) -> None:
        """Answer every request waiting now (several workers pipeline theirs). Appends to one
        database that arrive together are applied in one cache transaction: a transaction's
        cost is shared, and each append still lands once, whole, with its id."""
        received: list[tuple[Any, memoryview, memoryview | None]] = []
        size = 0
        while len(received) < _BATCH and size < _BATCH_BYTES:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            # ROUTER: the worker's identity, then the header, then the payload if any.
            if 2 <= len(frames) <= 3:
                received.append((frames[0], frames[1].buffer, frames[2].buffer if len(frames) == 3 else None))
                size += sum(len(frame.buffer) for frame in frames)
        batch: list[tuple[Any, str, dict[str, Any], np.ndarray[Any, Any]]] = []
        for identity, header, payload in received:
            appended = self._as_append(header, payload)
            if appended is not None and (not batch or batch[0][2]["db"] == appended[1]["db"]):
                batch.append((identity, *appended))
                continue
            self._apply_appends(batch)
            batch = []
            if appended is not None:
                batch.append((identity, *appended))
                continue
            self._send(identity, *self._answer(header, payload))
        self._apply_appends(batch)

    def _send(self, identity: Any, reply: dict[str, Any], out: np.ndarray[Any, Any] | None = None) -> None:
        parts: list[Any] = [identity, wire.encode_header(reply)]
        if out is not None:
            parts.append(out)
        self._socket.send_multipart(parts, copy=False)

    def _as_append(
        self, header: memoryview, payload: memoryview | None
    ) -> tuple[str, dict[str, Any], np.ndarray[Any, Any]] | None:
        """A well-formed append for this project under this token, ready to batch; None for
        anything else (answered one by one, errors included)."""
        try:
            message = wire.decode_header(header)
            if message.get("op") != DataOp.APPEND or message.get("project") != self.project.id:
                return None
            _database_name(message)
            if wire.field(message, "token", int, required=False) not in (None, self.token):
                return None
            _attrs(message)
            return message["id"], message, self._record(message, payload)
        except Exception:  # answered one by one, where the error is said
            return None

    def _apply_appends(self, batch: list[tuple[Any, str, dict[str, Any], np.ndarray[Any, Any]]]) -> None:
        if not batch:
            return
        name = batch[0][2]["db"]
        try:
            self._check_token(batch[0][2], writing=True)
            records = [(array, _attrs(message), req_id) for _, req_id, message, array in batch]
            indices = self._writer(name).append_batch(records)
        except GuardError as exc:  # the lease, the cache: the same for every one of them
            for identity, req_id, _, _ in batch:
                self._send(identity, self._error_reply(req_id, exc))
            return
        except Exception:
            # Something about one of them: each alone, so the others still land.
            for identity, req_id, message, array in batch:
                try:
                    index = self._writer(name).append(array, _attrs(message), once=req_id)
                except Exception as exc:
                    self._send(identity, self._error_reply(req_id, exc))
                else:
                    self._send(identity, reply_ok(req_id, index=index))
            return
        for (identity, req_id, _, _), index in zip(batch, indices, strict=True):
            self._send(identity, reply_ok(req_id, index=index))

    def _answer(
        self, header: memoryview, payload: memoryview | None
    ) -> tuple[dict[str, Any], np.ndarray[Any, Any] | None]:
        req_id = ""
        try:
            message = wire.decode_header(header)
            req_id = message["id"]
            return self._dispatch(req_id, message, payload)
        except Exception as exc:  # nothing a worker sends may stop the server
            return self._error_reply(req_id, exc), None

    @staticmethod
    def _error_reply(req_id: str, exc: Exception) -> dict[str, Any]:
        if isinstance(exc, ProtocolError):
            return wire.bad_request(req_id, exc)
        if isinstance(exc, GuardError):  # each class says how it travels (dbguard.errors)
            return exc.to_reply(req_id)
        if isinstance(exc, CacheError):
            return from_cache_error(exc).to_reply(req_id)
        if isinstance(exc, IndexError):
            return GuardError(str(exc)).to_reply(req_id) | {"index_error": True}
        log.error("request failed", exc_info=exc)
        return GuardError(f"the holder failed on this request: {exc!r}").to_reply(req_id)

    def _dispatch(
        self, req_id: str, message: dict[str, Any], payload: memoryview | None
    ) -> tuple[dict[str, Any], np.ndarray[Any, Any] | None]:
        try:
            op = DataOp(str(message.get("op")))
        except ValueError:
            raise ProtocolError(f"unknown operation {message.get('op')!r}") from None
        if message.get("project") != self.project.id:
            raise ProtocolError(
                f"this server serves project {self.project.id}, not {message.get('project')!r}"
            )
        self._check_token(message, writing=op in wire.WRITES)
        if op is DataOp.HELLO:
            return reply_ok(req_id, project=self.project.id, token=self.token, host=self.settings.host), None
        if op is DataOp.DATABASES:
            return reply_ok(req_id, databases=self._database_counts()), None
        name = _database_name(message)
        if op is DataOp.COUNT:
            return reply_ok(req_id, count=len(self._reader(name))), None
        if op is DataOp.GET:
            db = self._reader(name)
            index = wire.field(message, "index", int)
            array = np.ascontiguousarray(db[index])
            attrs = db.attrs(index) if message.get("with_attrs") else None
            return reply_ok(req_id, **wire.array_header(array), attrs=attrs, count=len(db)), array
        if op is DataOp.RECORDS:
            return reply_ok(req_id, records=self._records(name)), None
        if op is DataOp.APPEND:
            array = self._record(message, payload)
            index = self._writer(name).append(array, _attrs(message), once=req_id)
            return reply_ok(req_id, index=index), None
        if op is DataOp.PUT:
            index, db = wire.field(message, "index", int), self._writer(name)
            if not -len(db) <= index < len(db):
                raise UsageError(
                    f"record {index} is past the end of {name!r} ({len(db)} records): a worker "
                    "overwrites records that exist, and appends new ones"
                )
            db[index] = self._record(message, payload)
            return reply_ok(req_id), None
        if op is DataOp.SET_ATTRS:
            self._writer(name).set_attrs(wire.field(message, "index", int), _attrs(message) or {})
            return reply_ok(req_id), None
        raise ProtocolError(f"no handler for {op}")

    def _check_token(self, message: dict[str, Any], *, writing: bool) -> None:
        """Refuse a worker that opened under another lease of this host, and every write once
        this host's lease is gone (the agent stops this process too, a moment later)."""
        expected = wire.field(message, "token", int, required=False)
        lease = self._guard.check() if writing else None
        current = int(lease["token"]) if lease is not None else self.token
        if expected is not None and expected != current:
            raise LeaseLost(
                f"{self.settings.host} opened {self.project.path} for this worker under token {expected}, "
                f"and holds it under token {current} now: what was written under the old one was set "
                "aside there (`dbguard recover` on that host). Open the database again",
                project=str(self.project.path),
            )

    @staticmethod
    def _record(message: dict[str, Any], payload: memoryview | None) -> np.ndarray[Any, Any]:
        if payload is None:
            raise ProtocolError("a write carries its record as a second frame")
        return wire.array_from(message, payload)

    def _reader(self, name: str) -> ImageDB:
        db = self._databases.get(name)
        if db is None:
            # Read-only until a worker writes: opening to write marks the lease dirty.
            db = self._databases[name] = ImageDB(self.project, name, "r", self.settings)
        return db

    def _writer(self, name: str) -> ImageDB:
        db = self._databases.get(name)
        if db is not None and db.mode == "a":
            return db
        if db is not None:
            db.close()
            del self._databases[name]
        db = self._databases[name] = ImageDB(self.project, name, "a", self.settings)
        return db

    def _database_counts(self) -> list[dict[str, Any]]:
        if self._catalog is None:
            # "_" need not exist: any database's view lists the project's databases.
            self._catalog = ImageDB(self.project, "_", "r", self.settings)
        return [{"name": name, "count": len(self._reader(name))} for name in database_names(self._catalog)]

    def _records(self, name: str) -> list[dict[str, Any]]:
        db = self._reader(name)
        records = []
        for index in range(len(db)):
            with contextlib.suppress(IndexError):  # an index never written
                info = db.describe(index)
                records.append({"index": index, **info})
        return records


def _database_name(message: dict[str, Any]) -> str:
    name: str = wire.field(message, "db", str)
    if not is_database_name(name):
        raise UsageError(f"database name {name!r} must be {DATABASE_NAME_RULE}")
    return name


def _attrs(message: dict[str, Any]) -> dict[str, Any] | None:
    return wire.field(message, "attrs", dict, required=False)  # type: ignore[no-any-return]


def _advertised(endpoint: str, asked: str) -> str:
    """The address workers use: what ZeroMQ bound (with the port it picked), but with the name
    the user gave rather than 0.0.0.0 when the user bound every interface."""
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        import socket

        asked_host = asked[len("tcp://") :].rpartition(":")[0]
        host = asked_host if asked_host not in ("*", "0.0.0.0", "") else socket.getfqdn()
    return f"tcp://{host}:{port}"


def _die_with_parent(parent: int) -> None:
    """The agent that started this server holds the lease it serves under: when it dies, so does
    this (the kernel sends SIGTERM), and a restarted agent starts a new server."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        sys.exit(0)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve %(levelname)s %(message)s")
    project_id, path, address = argv
    _die_with_parent(int(os.environ.get("DBGUARD_SERVE_PARENT", os.getppid())))
    server: ProjectServer | None = None
    try:
        server = ProjectServer(load(), Project(project_id, Path(path)), address)
    except GuardError as exc:
        print(json.dumps({"error": exc.to_reply("")}), flush=True)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop() if server is not None else None)
    print(
        json.dumps({"address": server.address, "bound": server.bound, "key": server.public_key}), flush=True
    )
    log.info("serving %s (token %d) on %s", path, server.token, server.address)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
