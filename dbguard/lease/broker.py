"""The lease broker: a ZeroMQ server in front of the lease table and its durable store.

One thread, one ROUTER socket. Each turn of the loop drains every request that has arrived,
applies them all to the table, commits the changed records in one LMDB transaction with at most
one fdatasync, and only then sends the replies. Concurrent clients therefore share a disk sync
(group commit), and no grant is ever answered before it is durable.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.base import Authenticator
from zmq.auth.thread import ThreadAuthenticator

from dbguard.errors import GuardError, IntegrityError
from dbguard.lease import history, protocol, requests
from dbguard.lease.keys import AcceptKnownKeys, BrokerKeys, is_loopback
from dbguard.lease.protocol import ErrorKind, ProtocolError
from dbguard.lease.rules import Decision, Holder, LeaseState, LeaseTable, Timing
from dbguard.lease.store import LeaseStore, LmdbLeaseStore

log = logging.getLogger("dbguard.lease.broker")

# Requests handled per turn before replies go out: bounds the latency one burst can add.
_BATCH = 512
# How long the reply to a request id is kept for a client that resends it after a lost reply.
_REPLY_CACHE_SIZE = 100_000


class Broker:
    """Serve leases on ``address`` from the table kept in ``store``."""

    def __init__(
        self, address: str, store: LeaseStore, timing: Timing, keys: BrokerKeys | None = None
    ) -> None:
        self.address = address
        self.keys = keys
        self.store = store
        self.timing = timing
        self.table = LeaseTable(timing)
        records = store.load()
        started = time.monotonic()
        try:
            self.table.load(records, started)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a record of the wrong shape
            where = str(getattr(store, "path", store.identity))
            store.close()
            raise IntegrityError(
                f"the broker state in {where} holds a damaged lease record ({type(exc).__name__}: {exc}); "
                "move that directory aside and start the broker again: projects keep their fencing "
                "floor in their .dbguard directory, so tokens stay increasing",
                path=where,
            ) from exc
        live = any(r.get("state") in (LeaseState.HELD, LeaseState.LOCK_DELAY) for r in records)
        if not live:
            # Nobody can be renewing a lease from an earlier run, so there is nothing to protect.
            self.table.grace_until = started
        self._replies: OrderedDict[str, bytes] = OrderedDict()
        # Counters for operators and benchmarks: syncs per grant shows the group commit at work.
        self.stats = {"requests": 0, "batches": 0, "syncs": 0, "grants": 0}
        # How long grants and renewals take from arrival to reply, the disk sync included
        # (the status page's /metrics shows them as histograms).
        self.latency = {"grant": LatencyBuckets(), "renew": LatencyBuckets()}
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        # A client that vanished must not make the broker block or buffer without bound.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._socket.setsockopt(zmq.SNDHWM, 10_000)
        self._authenticator: ThreadAuthenticator | None = None
        if keys is not None:
            # ZAP checks every client's key during the handshake; a server's CURVE options must
            # be set before bind (pyzmq's ThreadAuthenticator pattern).
            self._start_authenticator(keys)
            self._socket.curve_secretkey = keys.secret
            self._socket.curve_publickey = keys.public
            self._socket.curve_server = True
        self._socket.bind(address)
        self.bound_address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # Told to every client (HELLO), so that `dbguard status` can say when anyone on the
        # network may take or break leases here.
        self.exposed = not is_loopback(self.bound_address)
        self._stop = threading.Event()
        log.info(
            "broker %s listening on %s with %d projects (ttl %.1fs, grace %.1fs left)",
            store.identity,
            self.bound_address,
            len(records),
            timing.ttl,
            self.table.grace_until - started,
        )

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._check_authenticator()
                if not poller.poll(100):
                    continue
                self._serve_batch()
        finally:
            self._persist()
            self._socket.close()
            self._stop_authenticator()
            self.store.close()

    # ------------------------------------------------------- authentication

    def _start_authenticator(self, keys: BrokerKeys) -> None:
        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(
            domain="*", credentials_provider=AcceptKnownKeys(keys, "client")
        )

    def _check_authenticator(self) -> None:
        """Restart the ZAP thread if it died: without it every handshake waits forever, so
        every client, authorised or not, would be told the broker is unreachable."""
        if self.keys is None or (self._authenticator is not None and self._authenticator.is_alive()):
            return
        if self._authenticator is not None:
            log.error("the authentication thread stopped; starting it again")
            self._stop_authenticator()
        try:
            self._start_authenticator(self.keys)
        except zmq.ZMQError as exc:  # the old ZAP endpoint not yet released: next turn
            log.warning("cannot restart the authentication thread yet: %s", exc)
            self._stop_authenticator()

    def _stop_authenticator(self) -> None:
        authenticator, self._authenticator = self._authenticator, None
        if authenticator is None:
            return
        if authenticator.is_alive():
            authenticator.stop()
            return
        # Its thread is gone: ThreadAuthenticator.stop() would send TERMINATE to a pipe nobody
        # reads and block there for ever (a broker that ignores SIGTERM). Close its sockets only.
        if authenticator.pipe is not None:
            authenticator.pipe.close(linger=0)
            authenticator.pipe = None  # type: ignore[assignment]  # what stop() leaves behind
        authenticator.thread = None  # type: ignore[assignment]  # likewise
        Authenticator.stop(authenticator)

    def _serve_batch(self) -> None:
        outgoing: list[list[bytes]] = []
        timed: list[tuple[str, float]] = []  # (grant or renew, when it arrived)
        for _ in range(_BATCH):
            # Asking the socket is cheaper than the zmq.Again exception that would end each batch.
            if not int(self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                break
            principal = ""
            if self.keys is None:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            else:
                # The authenticated key rides on the message as its User-Id property.
                parts = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                principal = str(parts[-1].get("User-Id"))
                frames = [part.bytes for part in parts]
            # ROUTER prepends the peer identity; a REQ peer adds an empty delimiter, kept as is.
            if len(frames) < 2:
                continue
            envelope, payload = frames[:-1], frames[-1]
            arrived = time.monotonic()
            reply, kind = self._answer(payload, principal)
            outgoing.append([*envelope, reply])
            if kind:
                timed.append((kind, arrived))
        self.stats["batches"] += 1
        self.stats["requests"] += len(outgoing)
        self._persist()
        for frames in outgoing:
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the peer is gone or not reading; it will retry
                log.debug("reply dropped: %s", exc)
        replied = time.monotonic()
        for kind, arrived in timed:
            self.latency[kind].observe(replied - arrived)

    def _persist(self) -> None:
        records, must_sync = self.table.take_changes()
        # A failure here is not caught: the table in memory is ahead of the disk, and the only
        # safe way on is to stop and let a restart reload what is durable.
        self.store.save(records, sync=must_sync, events=self.table.take_events())
        self.stats["syncs"] += must_sync

    # -------------------------------------------------------------- requests

    def _answer(self, payload: bytes, principal: str = "") -> tuple[bytes, str | None]:
        """The encoded reply, and "grant" or "renew" when its latency is measured."""
        try:
            req_id, request = requests.decode(payload)
        except ProtocolError as exc:
            req_id = _loose_id(payload)
            return protocol.encode(protocol.reply_error(req_id, ErrorKind.BAD_REQUEST, str(exc))), None
        cached = self._replies.get(req_id)
        if cached is not None:
            return cached, None
        try:
            reply = self._dispatch(req_id, request, principal)
        except GuardError as exc:  # each class says how it travels (dbguard.errors)
            reply = exc.to_reply(req_id)
        except Exception:  # the broker never dies of one request
            log.exception("request %s failed", request.op)
            reply = protocol.reply_error(
                req_id, ErrorKind.INTERNAL, "the broker failed on this request; see its log"
            )
        encoded = protocol.encode(reply)
        self._replies[req_id] = encoded
        if len(self._replies) > _REPLY_CACHE_SIZE:
            self._replies.popitem(last=False)
        kind = None
        if isinstance(request, requests.Renew):
            kind = "renew"
        elif (
            isinstance(request, requests.Acquire)
            and reply.get("status") == "granted"
            and reply.get("mode") == "write"
        ):
            kind = "grant"
        return encoded, kind

    def _dispatch(self, req_id: str, request: requests.Request, principal: str = "") -> dict[str, Any]:
        now, wall = time.monotonic(), time.time()
        table = self.table
        match request:
            case requests.Hello():
                return protocol.reply_ok(
                    req_id,
                    broker=self.store.identity,
                    ttl=self.timing.ttl,
                    lock_delay=self.timing.lock_delay,
                    grace_left=max(0.0, table.grace_until - now),
                    version=protocol.VERSION,
                    projects=len(table.projects),
                    stats=self.stats,
                    latency={name: buckets.to_json() for name, buckets in self.latency.items()},
                    authenticated=self.keys is not None,
                    exposed=self.exposed,
                )
            case requests.Status(project=None):
                return protocol.reply_ok(req_id, projects=table.status_all(now, wall))
            case requests.Status(project=str(project)):
                return protocol.reply_ok(req_id, projects=[table.status(project, now, wall)])
            case requests.History():
                # Expiries due by now are events too.
                if request.project is None:
                    table.status_all(now, wall)
                else:
                    table.status(request.project, now, wall)
                self._persist()  # and so are this batch's earlier requests'
                limit = min(request.limit, history.MAX_LIMIT)
                return protocol.reply_ok(
                    req_id, events=self.store.history(request.project, request.since, limit)
                )
            case requests.Report():
                holder = self._authenticated(request.holder, principal)
                fields = {"bytes": request.bytes, "records": request.records, "seconds": request.seconds}
                table.report(
                    request.project,
                    holder,
                    request.token,
                    request.event,
                    now,
                    wall,
                    detail=request.detail,
                    **fields,
                )
                return protocol.reply_ok(req_id)
            case requests.Break():
                return self._break(req_id, request, principal, now, wall)
            case requests.Acquire():
                decision = table.acquire(
                    request.project,
                    self._authenticated(request.holder, principal),
                    now,
                    wall,
                    mode=request.mode,
                    wait=request.wait,
                    takeover=request.takeover,
                    floor=request.floor,
                    unflushed=request.unflushed,
                    dirty=request.dirty,
                    work=requests.work_of(request),
                )
                self.stats["grants"] += decision.kind == "granted" and decision.fields.get("mode") == "write"
                return _reply_for(req_id, decision)
            case requests.Renew():
                holder = self._authenticated(request.holder, principal)
                return protocol.reply_ok(req_id, results=table.renew(holder, request.leases, now, wall))
            case requests.Release():
                holder = self._authenticated(request.holder, principal)
                decision = table.release(request.project, holder, request.token, now, wall, mode=request.mode)
                return protocol.reply_ok(req_id, **decision.fields)
            case requests.LeaveQueue():
                holder = self._authenticated(request.holder, principal)
                return protocol.reply_ok(
                    req_id, **table.leave_queue(request.project, holder, now, wall).fields
                )
            case requests.Mark():
                holder = self._authenticated(request.holder, principal)
                decision = table.mark(
                    request.project,
                    holder,
                    request.token,
                    request.dirty,
                    now,
                    wall,
                    unflushed=request.unflushed,
                )
                if decision.kind == "lost":
                    return protocol.reply_error(
                        req_id,
                        ErrorKind.LOST,
                        "this host no longer holds the writer lease",
                        **decision.fields,
                    )
                return protocol.reply_ok(req_id, **decision.fields)
            case requests.Serve():
                holder = self._authenticated(request.holder, principal)
                decision = table.serve(
                    request.project, holder, request.token, request.address, request.key, now, wall
                )
                if decision.kind == "lost":
                    return protocol.reply_error(
                        req_id,
                        ErrorKind.LOST,
                        "this host no longer holds the writer lease",
                        **decision.fields,
                    )
                return protocol.reply_ok(req_id, **decision.fields)
        raise AssertionError(f"no dispatch for {request!r}")  # requests.decode knows every op

    @staticmethod
    def _authenticated(holder: Holder, principal: str) -> Holder:
        """The holder as the broker knows it: with the key that authenticated the request."""
        return replace(holder, principal=principal)

    def _break(
        self, req_id: str, request: requests.Break, principal: str, now: float, wall: float
    ) -> dict[str, Any]:
        if not request.force:
            return protocol.reply_error(req_id, ErrorKind.USAGE, "break needs force=true")
        if self.keys is not None and principal.encode() not in self.keys.operators():
            return protocol.reply_error(
                req_id,
                ErrorKind.USAGE,
                "breaking a lease needs an operator key: run this with DBGUARD_KEYS holding a key the "
                "broker's operators/ directory lists (`dbguard keys authorize --operator`)",
            )
        by = request.operator or (f"key {principal[:8]}" if principal else None)
        decision = self.table.break_lease(request.project, now, wall, by=by)
        if decision.fields["broken"]:
            log.warning("lease of %s broken by operator: %s", request.project, decision.fields["broken"])
        return protocol.reply_ok(req_id, **decision.fields)


class LatencyBuckets:
    """Cumulative counts of durations per upper bound, as a Prometheus histogram keeps them."""

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last: +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for index, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.counts[index] += 1
        self.counts[-1] += 1

    def to_json(self) -> dict[str, Any]:
        return {"bounds": list(self.BOUNDS), "counts": list(self.counts), "sum": self.total}


def _reply_for(req_id: str, decision: Decision) -> dict[str, Any]:
    if decision.kind in ("granted", "queued"):
        return protocol.reply_ok(req_id, status=decision.kind, **decision.fields)
    if decision.kind == "grace":
        return protocol.reply_error(
            req_id,
            ErrorKind.GRACE,
            "the broker restarted recently and grants no new writer yet",
            **decision.fields,
        )
    return protocol.reply_error(req_id, ErrorKind.HELD, "the project is held", **decision.fields)


def _loose_id(payload: bytes) -> str:
    """The id of a request that failed validation, if one can be read, so the client can match it."""
    try:
        value = protocol.decode(payload).get("id")
    except ProtocolError:
        return ""
    return value if isinstance(value, str) and len(value) <= 64 else ""


def run(
    address: str,
    state_dir: Path,
    timing: Timing,
    *,
    keys: BrokerKeys | None = None,
    ready_file: Path | None = None,
) -> None:
    """Run a broker in this process until SIGTERM or SIGINT."""
    broker = Broker(address, LmdbLeaseStore(state_dir), timing, keys)
    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        # Once only: a second signal arriving inside Event.set would wait forever for the lock
        # that the first one holds.
        if not signalled:
            signalled.append(signum)
            broker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    if ready_file is not None:
        ready_file.write_text(broker.bound_address + "\n")
    broker.serve_forever()
