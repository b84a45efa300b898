"""The lease service on an etcd cluster: the broker's requests and replies, with no broker.

``DBGUARD_BROKER=etcd://h1:2379,h2:2379,h3:2379[/prefix]`` makes every dbguard process talk to
etcd directly through this class instead of to a broker over ZeroMQ. It answers the requests of
`dbguard.lease.protocol` with the replies the broker gives, so the agent, the API and the command line
do not know which one they use (the conformance suite runs the same tests against both).

etcd is the authority, and every rule is a transaction that compares what the client read:

- ``p/<project>/writer`` (durable) names the writer lease's holder. It is created in a
  transaction only if absent; the fencing token is its create revision plus the project's
  ``offset`` (0 unless a token floor from the project directory was ahead of etcd's revision,
  e.g. after the etcd data was lost), so tokens strictly increase without a counter to race on.
- ``p/<project>/alive`` is bound to the holder agent's etcd lease, which its heartbeats keep
  alive. While it exists the lease is held; when etcd expires it (TTL without heartbeats), the
  durable writer record stays: the project is *orphaned* if the holder marked itself dirty
  (``dirty``, set before its first unflushed write is acknowledged) or its last heartbeat
  reported unflushed data, else in *lock-delay*, timed by etcd with ``p/<project>/delay``, a key bound to
  a lease of the lock-delay, after which the project is free.
- ``p/<project>/queue/<holder>`` are waiters, each bound to an etcd lease of one TTL that the
  waiter's polls renew, served in create-revision order with takeover requests first.
- ``p/<project>/readers/<holder>``, ``p/<project>/meta`` (offset and last token) and
  ``p/<project>/loss`` (why the last holder lost the lease) complete the picture.
- ``h/<project>/<id>`` are the project's history events (dbguard.lease.history), each written
  in the transaction that made it happen and ordered by its create revision.

A broker restart has no etcd counterpart (etcd keeps its leases across a leader change), so
there is no grace period. CURVE keys do not apply: an etcd site secures etcd itself (TLS, RBAC).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

from dbguard.errors import BrokerUnavailable, GuardError, UsageError
from dbguard.lease import history, protocol, requests
from dbguard.lease.client import error_from_reply  # the broker client's mapping of error replies
from dbguard.lease.protocol import ErrorKind, ProtocolError
from dbguard.lease.rules import Holder, LeaseState, RenewItem, work_fields
from dbguard.settings import check_seconds

DEFAULT_PREFIX = "dbguard"
_ENVELOPE = frozenset({"v", "id", "ok"})
# Answers from a member that cannot serve a linearizable request right now: another member, or
# the same one after an election, may (etcd's error texts, from etcdserver/api/v3rpc/rpctypes).
_TRANSIENT = (
    "no leader",
    "timed out",
    "deadline exceeded",  # a txn or lease grant without quorum (HTTP 500 from the gateway)
    "leader changed",
    "too many requests",
    "not capable",
    "stopped",
)
# How many times one request re-reads and retries when a transaction lost a race.
_RACE_RETRIES = 20


class _LeaseGone(Exception):
    """etcd no longer knows an etcd lease (it expired); the caller grants a new one."""


@dataclass(frozen=True)
class EtcdAddress:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str

    @classmethod
    def parse(cls, address: str) -> EtcdAddress:
        """``etcd://host:port[,host:port...][/prefix]``, or a UsageError saying what is wrong."""
        if not address.startswith("etcd://"):
            raise UsageError(f"{address!r} is not an etcd address (etcd://host:port[,host:port...])")
        hosts, _, prefix = address[len("etcd://") :].partition("/")
        endpoints = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(
                    f"etcd endpoint {item!r} in {address!r} must be host:port, e.g. etcd://h1:2379,h2:2379"
                )
            endpoints.append((host.strip("[]"), int(port)))
        prefix = prefix.strip("/") or DEFAULT_PREFIX
        return cls(tuple(endpoints), prefix)

    def text(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.endpoints)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with ``prefix`` (etcd's rule)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes here end in "/", never in 0xff
    return base64.b64encode(bytes(raw)).decode()


class EtcdTransport:
    """HTTP requests to the etcd gateway of any member that can answer, with a diagnosis when
    none can (is the cluster down, or without quorum?)."""

    def __init__(self, address: EtcdAddress, timeout: float, attempts: int) -> None:
        self.address = address
        self.timeout = timeout
        self.per_try = timeout / max(1, attempts)
        # One HTTP session per member keeps its connection open; api_path skips a version probe.
        self._clients = [
            Etcd3Client(host=host, port=port, timeout=self.per_try, api_path="/v3/")
            for host, port in address.endpoints
        ]
        self._current = 0

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    def post(self, path: str, payload: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        failures: list[str] = []
        tries = 0
        while True:
            index = (self._current + tries) % len(self._clients)
            client = self._clients[index]
            host, port = self.address.endpoints[index]
            endpoint = f"{host}:{port}"
            tries += 1
            try:
                result: dict[str, Any] = client.post(client.get_url(path), json=payload)
                self._current = index
                return result
            except (ConnectionFailedError, ConnectionTimeoutError) as exc:
                failures.append(f"{endpoint}: {_short(exc)}")
            except Etcd3Exception as exc:
                text = str(exc.detail_text or exc)
                if "lease not found" in text:
                    raise _LeaseGone(text) from None
                if not any(word in text for word in _TRANSIENT):
                    raise GuardError(f"etcd at {endpoint} refused a request to {path}: {text}") from None
                failures.append(f"{endpoint}: {_etcd_message(text)}")
            if time.monotonic() >= deadline:
                break
            if tries % len(self._clients) == 0:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))  # let an election finish
        raise BrokerUnavailable(self._diagnose(failures), address=f"etcd://{self.address.text()}")

    def _diagnose(self, failures: list[str]) -> str:
        """Why no member answered: down, or up without a leader (no quorum)."""
        answering, leaders = [], set()
        for host, port in self.address.endpoints:
            probe = Etcd3Client(host=host, port=port, timeout=0.5, api_path="/v3/")
            try:
                status: dict[str, Any] = dict(probe.status())
            except Etcd3Exception:
                continue
            finally:
                probe.session.close()
            answering.append(f"{host}:{port}")
            leader = int(status.get("leader", 0) or 0)
            if leader:
                leaders.add(leader)
        total = len(self.address.endpoints)
        last = failures[-1] if failures else "no answer"
        if not answering:
            return (
                f"no etcd member answers at {self.address.text()} ({last}); start etcd (`dbguard up --etcd` "
                "on one machine) or set DBGUARD_BROKER to your site's etcd endpoints"
            )
        if not leaders:
            return (
                f"etcd has no quorum: {len(answering)} of the {total} listed members answer "
                f"({', '.join(answering)}) and none has a leader, so no lease can be granted or renewed; "
                "start the stopped members (a majority must run), then retry"
            )
        return (
            f"etcd at {self.address.text()} did not complete the request within {self.timeout:.0f}s "
            f"({last}); it may be overloaded or electing a leader, retry shortly"
        )

    # ------------------------------------------------------------ key-value

    def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: Iterable[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        return self.post("/kv/txn", {"compare": compare, "success": success, "failure": list(failure)})

    def range_prefix(self, prefix: str) -> tuple[list[dict[str, Any]], int]:
        reply = self.post("/kv/range", {"key": _b64(prefix), "range_end": _range_end(prefix)})
        return list(reply.get("kvs", [])), int(reply["header"]["revision"])

    def delete_prefix(self, prefix: str) -> None:
        self.post("/kv/deleterange", {"key": _b64(prefix), "range_end": _range_end(prefix)})

    def grant(self, ttl: int) -> tuple[int, int]:
        reply = self.post("/lease/grant", {"TTL": ttl, "ID": 0})
        return int(reply["ID"]), int(reply["TTL"])

    def keepalive(self, lease: int) -> int:
        """The lease's renewed TTL, or -1 if it has expired."""
        reply = self.post("/lease/keepalive", {"ID": lease})
        return int(reply.get("result", {}).get("TTL", -1))

    def time_left(self, lease: int) -> float:
        reply = self.post("/kv/lease/timetolive", {"ID": lease})
        return max(0.0, float(reply.get("TTL", 0)))

    def revoke(self, lease: int) -> None:
        with contextlib.suppress(_LeaseGone):
            self.post("/kv/lease/revoke", {"ID": lease})


def _short(exc: Exception) -> str:
    text = str(exc.args[1] if len(exc.args) > 1 else exc)
    return "connection refused" if "refused" in text.lower() else text[:120]


def _etcd_message(text: str) -> str:
    try:
        return str(json.loads(text).get("message", text))
    except ValueError:
        return text[:120]


# ---------------------------------------------------------------- compares


def _absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "target": "CREATE", "create_revision": "0", "result": "EQUAL"}


def _unchanged(key: str, mod_revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "MOD", "mod_revision": str(mod_revision), "result": "EQUAL"}


def _put(key: str, value: Any, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value, separators=(",", ":")))}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


# ------------------------------------------------------------------- views


@dataclass
class _Entry:
    value: dict[str, Any]
    create_revision: int
    mod_revision: int
    lease: int


@dataclass
class _Waiter:
    holder: Holder
    takeover: bool
    entry: _Entry


@dataclass
class _View:
    """One project's keys as read at one revision, and the state they mean."""

    project: str
    revision: int
    writer: _Entry | None = None
    alive: _Entry | None = None
    delay: _Entry | None = None
    meta: _Entry | None = None
    loss: _Entry | None = None
    queue: list[_Waiter] = field(default_factory=list)
    readers: dict[str, tuple[Holder, _Entry]] = field(default_factory=dict)

    @property
    def offset(self) -> int:
        return int(self.meta.value.get("offset", 0)) if self.meta else 0

    @property
    def last_token(self) -> int:
        if self.writer is not None:
            return self.token
        return int(self.meta.value.get("last_token", 0)) if self.meta else 0

    @property
    def token(self) -> int:
        """The writer's fencing token: its record's create revision, lifted by the offset."""
        assert self.writer is not None
        return self.writer.create_revision + self.offset

    @property
    def holder(self) -> Holder | None:
        return Holder.from_json(self.writer.value["holder"]) if self.writer else None

    @property
    def holds_data(self) -> bool:
        """Whether the writer may hold acknowledged unflushed data (see `rules.WriterLease`)."""
        return self.writer is not None and _holds_data(self.writer.value)

    @property
    def state(self) -> LeaseState:
        writer = self.writer
        if writer is None:
            return LeaseState.FREE
        if self.alive is not None:
            return LeaseState.HELD
        if self.holds_data:
            return LeaseState.ORPHANED
        if writer.value.get("expired") and self.delay is None:
            return LeaseState.FREE  # the lock-delay is over; the record goes with the next grant
        return LeaseState.LOCK_DELAY

    def held_by(self, holder: Holder, token: int | None = None) -> bool:
        """Whether ``holder`` has the writer lease (with ``token``, when given): held, orphaned or
        in lock-delay, but not lapsed for good (free)."""
        current = self.holder
        return (
            current is not None
            and current.key == holder.key
            and (token is None or self.token == token)
            and self.state is not LeaseState.FREE
        )

    @property
    def lapse_unrecorded(self) -> bool:
        """The writer's etcd lease ran out, and nobody has recorded the lapse yet."""
        writer = self.writer
        return writer is not None and self.alive is None and not writer.value.get("expired")


class EtcdLeases:
    """The lease service for one ``etcd://`` address; use from one thread, like `Client`."""

    # Every process's etcd lease ("session") per holder, shared by its EtcdLeases objects: the
    # agent asks for leases from one thread and renews them from another.
    _sessions: ClassVar[dict[tuple[str, str], tuple[int, int]]] = {}
    _sessions_lock = threading.Lock()

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 5.0,
        attempts: int = 3,
        ttl: float = 30.0,
        lock_delay: float = 5.0,
    ) -> None:
        self.address = address
        self.parsed = EtcdAddress.parse(address)
        self.transport = EtcdTransport(self.parsed, timeout, attempts)
        self.root = self.parsed.prefix + "/"
        self._default_timing = (ttl, lock_delay)
        self._timing: tuple[float, float] | None = None
        self._id_prefix = protocol.new_request_id()[:16]
        self._sent = 0

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> EtcdLeases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- requests

    def call(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Answer one request as the broker would; raise BrokerUnavailable if etcd cannot."""
        self._sent += 1
        message = protocol.request(op, f"{self._id_prefix}-{self._sent}", **fields)
        try:
            req_id, request = requests.decode(protocol.encode(message))
        except ProtocolError as exc:
            return protocol.reply_error(message["id"], ErrorKind.BAD_REQUEST, str(exc))
        default = self.transport.timeout
        if timeout is not None:
            self.transport.timeout = timeout
        try:
            try:
                return self._dispatch(req_id, request)
            except _LeaseGone:
                # An etcd lease of this process expired between two steps (a paused process):
                # forget it, so the retry grants a fresh one and re-reads everything.
                self._forget_sessions()
                return self._dispatch(req_id, request)
        except _LeaseGone as exc:
            raise BrokerUnavailable(
                f"etcd dropped this host's lease twice in a row: {exc}", address=self.address
            ) from None
        finally:
            self.transport.timeout = default

    def send(self, request: requests.Request, *, timeout: float | None = None) -> dict[str, Any]:
        """`call` for a typed request."""
        return self.call(request.op, timeout=timeout, **requests.to_fields(request))

    def send_ok(self, request: requests.Request, *, timeout: float | None = None) -> dict[str, Any]:
        """`call_ok` for a typed request."""
        return self.call_ok(request.op, timeout=timeout, **requests.to_fields(request))

    def _forget_sessions(self) -> None:
        with self._sessions_lock:
            for key in [key for key in self._sessions if key[0] == self.address]:
                del self._sessions[key]

    def call_ok(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        reply = self.call(op, timeout=timeout, **fields)
        if not reply.get("ok"):
            raise error_from_reply(reply, self.address)
        return {key: value for key, value in reply.items() if key not in _ENVELOPE}

    def _dispatch(self, req_id: str, request: requests.Request) -> dict[str, Any]:
        match request:
            case requests.Hello():
                return protocol.reply_ok(req_id, **self._hello())
            case requests.Status(project=None):
                return protocol.reply_ok(req_id, projects=[self._status(view) for view in self._read_all()])
            case requests.Status(project=str(project)):
                return protocol.reply_ok(req_id, projects=[self._status(self._read(project))])
            case requests.Break(force=False):
                return protocol.reply_error(req_id, ErrorKind.USAGE, "break needs force=true")
            case requests.Break():
                return protocol.reply_ok(req_id, broken=self._break(request.project, request.operator))
            case requests.Acquire():
                return self._acquire(req_id, request)
            case requests.Renew():
                return protocol.reply_ok(req_id, results=self._renew(request.holder, request.leases))
            case requests.Release():
                fields = self._release(request.project, request.holder, request.token, request.mode)
                return protocol.reply_ok(req_id, **fields)
            case requests.LeaveQueue():
                self._leave_queue(request.project, request.holder)
                return protocol.reply_ok(req_id)
            case requests.Mark():
                return self._mark(req_id, request)
            case requests.Serve():
                return self._serve(req_id, request)
            case requests.Report():
                self._report(request)
                return protocol.reply_ok(req_id)
            case requests.History():
                limit = min(request.limit, history.MAX_LIMIT)
                return protocol.reply_ok(req_id, events=self._history(request.project, request.since, limit))
        raise AssertionError(f"no dispatch for {request!r}")  # requests.decode knows every op

    # --------------------------------------------------------------- timing

    @property
    def timing(self) -> tuple[float, float]:
        """The site's TTL and lock-delay, kept in etcd so every host uses the same ones; the
        first client to find none stores its own settings (`dbguard up --etcd` does it first)."""
        if self._timing is None:
            key = self.root + "config"
            ttl, lock_delay = self._default_timing
            reply = self.transport.txn(
                [_absent(key)],
                [_put(key, {"ttl": ttl, "lock_delay": lock_delay})],
                [{"request_range": {"key": _b64(key)}}],
            )
            if not reply.get("succeeded"):
                kvs = reply["responses"][0]["response_range"].get("kvs", [])
                if kvs:
                    ttl, lock_delay = self._stored_timing(key, kvs[0].get("value", ""))
            self._timing = (ttl, lock_delay)
        return self._timing

    def _stored_timing(self, key: str, value: str) -> tuple[float, float]:
        """The site's timing as stored in etcd, which anyone who may write the prefix can change:
        checked as the settings are, so that a TTL of nan or a missing field is an error that
        says how to fix it, not a crash or a lease that never expires."""
        origin = f"the site's timing in etcd (key {key!r} at {self.address})"
        fix = (
            "; store good values with `dbguard up --etcd` (or delete the key to let the next host "
            "store its own)"
        )
        try:
            stored = json.loads(_unb64(value))
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
            return (
                check_seconds("ttl", stored.get("ttl"), origin),
                check_seconds("lock_delay", stored.get("lock_delay"), origin),
            )
        except UsageError as exc:
            raise UsageError(f"{exc}{fix}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"{origin} is not readable ({exc}){fix}") from None

    def _lease_ttl(self) -> int:
        # etcd counts lease TTLs in whole seconds.
        return max(1, math.ceil(self.timing[0]))

    def _session(self, holder: Holder) -> tuple[int, int]:
        """This process's etcd lease for ``holder``: (id, ttl), granted on first use."""
        key = (self.address, holder.key)
        with self._sessions_lock:
            session = self._sessions.get(key)
            if session is None:
                session = self.transport.grant(self._lease_ttl())
                self._sessions[key] = session
            return session

    def _renew_session(self, holder: Holder) -> tuple[int, int]:
        """Keep the holder's etcd lease alive; a new one if it expired (its keys went with it)."""
        lease, ttl = self._session(holder)
        if self.transport.keepalive(lease) > 0:
            return lease, ttl
        with self._sessions_lock:
            if self._sessions.get((self.address, holder.key), (0, 0))[0] == lease:
                del self._sessions[(self.address, holder.key)]
        return self._session(holder)

    # ---------------------------------------------------------------- reads

    def _project_prefix(self, project: str) -> str:
        # Project names may hold "/"; quoted, a project's keys stay under one prefix.
        return f"{self.root}p/{urllib.parse.quote(project, safe='')}/"

    def _read(self, project: str) -> _View:
        kvs, revision = self.transport.range_prefix(self._project_prefix(project))
        return self._view(project, kvs, revision)

    def _read_all(self) -> list[_View]:
        kvs, revision = self.transport.range_prefix(self.root + "p/")
        grouped: dict[str, list[dict[str, Any]]] = {}
        for kv in kvs:
            quoted = _unb64(kv["key"])[len(self.root) + 2 :].split("/", 1)[0]
            grouped.setdefault(urllib.parse.unquote(quoted), []).append(kv)
        return [self._view(project, items, revision) for project, items in sorted(grouped.items())]

    def _view(self, project: str, kvs: list[dict[str, Any]], revision: int) -> _View:
        view = _View(project, revision)
        base = self._project_prefix(project)
        for kv in kvs:
            name = _unb64(kv["key"])[len(base) :]
            entry = _Entry(
                json.loads(_unb64(kv.get("value", ""))) if kv.get("value") else {},
                int(kv.get("create_revision", 0)),
                int(kv.get("mod_revision", 0)),
                int(kv.get("lease", 0)),
            )
            if name in ("writer", "alive", "delay", "meta", "loss"):
                setattr(view, name, entry)
            elif name.startswith("queue/"):
                value = entry.value
                view.queue.append(_Waiter(Holder.from_json(value["holder"]), bool(value["takeover"]), entry))
            elif name.startswith("readers/"):
                reader = Holder.from_json(entry.value["holder"])
                view.readers[reader.key] = (reader, entry)
        # First come, first served, except that a takeover request goes to the head.
        view.queue.sort(key=lambda w: (not w.takeover, w.entry.create_revision))
        return view

    def _keys(self, view: _View) -> dict[str, str]:
        base = self._project_prefix(view.project)
        return {name: base + name for name in ("writer", "alive", "delay", "meta", "loss")}

    def _observe(self, view: _View) -> _View:
        """Record a lapse as the table does when a lease expires: the loss ("expired", or
        "orphaned" for a writer that may hold unflushed data), a takeover request dropped, and
        for a clean expiry the lock-delay started, so etcd times it. Whoever looks first records
        it, so a lock-delay ends no earlier than it should. Returns the view as it is now."""
        if not view.lapse_unrecorded:
            return view
        assert view.writer is not None
        keys = self._keys(view)
        record = view.writer.value
        lapsed_at = time.time()
        orphaned = view.holds_data
        loss = {
            "holder": Holder.from_json(record["holder"]).key,
            "token": view.token,
            "reason": "orphaned" if orphaned else "expired",
            "at": lapsed_at,
            "unflushed": int(record.get("unflushed", 0)) if orphaned else 0,
        }
        success = [
            _put(keys["writer"], {**record, "expired": True, "lapsed_at": lapsed_at, "takeover_by": None}),
            _put(keys["loss"], loss),
            self._event(
                view,
                "orphaned" if orphaned else "expired",
                lapsed_at,
                record,
                unflushed=loss["unflushed"] or None,
            ),
        ]
        if not orphaned:
            delay, _ = self.transport.grant(max(1, math.ceil(self.timing[1])))
            success.append(_put(keys["delay"], {"token": view.token}, lease=delay))
        self.transport.txn(
            [_unchanged(keys["writer"], view.writer.mod_revision), _absent(keys["alive"])], success
        )
        return self._read(view.project)

    # ------------------------------------------------------------- acquire

    def _acquire(self, req_id: str, request: requests.Acquire) -> dict[str, Any]:
        project, holder = request.project, request.holder
        if request.mode == "read":
            session, _ = self._session(holder)
            reader = self._project_prefix(project) + "readers/" + holder.key
            self.transport.txn([], [_put(reader, {"holder": holder.to_json()}, lease=session)])
            return protocol.reply_ok(req_id, status="granted", mode="read", ttl=float(self._lease_ttl()))
        wait, takeover, floor = request.wait, request.takeover, request.floor
        unflushed, dirty = request.unflushed, request.dirty  # see `rules.LeaseTable.acquire`
        work = requests.work_of(request)
        for _ in range(_RACE_RETRIES):
            view = self._observe(self._read(project))
            state = view.state
            if view.held_by(holder):
                # The same user, host and cache again: a retry, a restarted agent, or the holder
                # of an orphaned lease coming back. Nobody was granted since: the token stands.
                if self._resume(view, holder, unflushed, dirty=dirty, work=work):
                    return self._granted(req_id, self._read(project))
                continue
            if state is LeaseState.FREE and (not view.queue or view.queue[0].holder.key == holder.key):
                if view.writer is not None:
                    self._retire(view, "expired")  # the lock-delay ended: clear it, then grant
                    continue
                granted = self._grant(view, holder, floor, unflushed, dirty, work)
                if granted is not None:
                    return protocol.reply_ok(req_id, **granted)
                continue
            if takeover and state is LeaseState.HELD and view.writer is not None:
                asked = view.writer.value.get("takeover_by")
                if asked in (None, holder.key):
                    if asked is None and not self._ask_takeover(view, holder):
                        continue
                    self._enqueue(view, holder, takeover=True)
                    return self._queued(req_id, self._read(project), holder)
            if wait or takeover:
                self._enqueue(view, holder, takeover=False)
                return self._queued(req_id, self._read(project), holder)
            return protocol.reply_error(req_id, ErrorKind.HELD, "the project is held", **self._refusal(view))
        return protocol.reply_error(
            req_id, ErrorKind.UNAVAILABLE, "etcd kept changing under this request; retry"
        )

    def _grant(
        self,
        view: _View,
        holder: Holder,
        floor: int,
        unflushed: int,
        dirty: bool,
        work: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """The granted lease's reply fields, or None if the project changed since ``view``."""
        keys = self._keys(view)
        session, ttl = self._session(holder)
        offset = view.offset
        # The token will be this transaction's revision (> view.revision) plus the offset; lift
        # the offset if that could fail to exceed the project's floor or its last token.
        needed = max(floor, view.last_token)
        if view.revision + 1 + offset <= needed:
            offset = needed
        meta = {"offset": offset, "last_token": view.last_token}
        compare = [_absent(keys["writer"])]
        compare.append(
            _unchanged(keys["meta"], view.meta.mod_revision) if view.meta else _absent(keys["meta"])
        )
        since = time.time()
        record = {
            "holder": holder.to_json(),
            "since": since,
            "unflushed": unflushed,
            "dirty": dirty,
            "takeover_by": None,
            "work": work,
        }
        took_over = any(w.takeover and w.holder.key == holder.key for w in view.queue)
        # The token is not known before the transaction commits: the event names it "granted"
        # with the token to come, written under the same revision (see _history).
        success = [
            _put(keys["writer"], record),
            _put(keys["alive"], {"holder": holder.key}, lease=session),
            _put(keys["meta"], meta),
            _delete(self._project_prefix(view.project) + "queue/" + holder.key),
            self._event(
                view, "granted", since, record, token=None, offset=offset, takeover=took_over or None
            ),
        ]
        reply = self.transport.txn(compare, success)
        if not reply.get("succeeded"):
            return None
        self._maybe_trim(view.project)
        # One transaction is one revision: the writer record was created at this one.
        token = int(reply["header"]["revision"]) + offset
        return self._lease_fields(view.project, token, since, ttl, None)

    def _lease_fields(
        self, project: str, token: int, since: float, ttl: int, takeover_by: str | None
    ) -> dict[str, Any]:
        return {
            "status": "granted",
            "mode": "write",
            "project": project,
            "token": token,
            "since": since,
            "ttl": float(ttl),
            "takeover_by": takeover_by,
        }

    def _resume(
        self,
        view: _View,
        holder: Holder,
        unflushed: int,
        *,
        dirty: bool = False,
        work: dict[str, Any] | None = None,
    ) -> bool:
        """Renew the holder's lease in etcd if anything changed; False if the record moved.
        ``dirty`` only ever sets the writer's dirty mark (an acquire of an announced cache);
        ``work``, when given, replaces what the writer runs."""
        assert view.writer is not None
        session, _ = self._session(holder)
        record = view.writer.value
        if (
            view.alive is not None
            and view.alive.lease == session
            and int(record.get("unflushed", 0)) == unflushed
            and Holder.from_json(record["holder"]) == holder
            and (bool(record.get("dirty")) or not dirty)
            and (work is None or record.get("work") == work)
        ):
            return True
        keys = self._keys(view)
        fresh = {
            **record,
            "holder": holder.to_json(),
            "unflushed": unflushed,
            "dirty": bool(record.get("dirty")) or dirty,
            "expired": False,
        }
        if work is not None:
            fresh["work"] = work
        fresh.pop("lapsed_at", None)
        lapsed = view.alive is None
        if lapsed:
            # Back after a lapse, as the table resumes one: the lapse took any takeover request
            # with it, and a lease held again has lost nothing.
            fresh["takeover_by"] = None
        success = [
            _put(keys["writer"], fresh),
            _put(keys["alive"], {"holder": holder.key}, lease=session),
            _delete(keys["delay"]),
        ]
        if lapsed:
            success.append(_delete(keys["loss"]))
            success.append(self._event(view, "resumed", time.time(), fresh))
        reply = self.transport.txn([_unchanged(keys["writer"], view.writer.mod_revision)], success)
        return bool(reply.get("succeeded"))

    def _retire(self, view: _View, reason: str, by: str | None = None) -> bool:
        """End the recorded writer lease (released, expired or broken) in one transaction."""
        assert view.writer is not None
        keys = self._keys(view)
        token = view.token
        record = view.writer.value
        success = [
            _delete(keys["writer"]),
            _delete(keys["alive"]),
            _delete(keys["delay"]),
            _put(keys["meta"], {"offset": view.offset, "last_token": token}),
        ]
        if reason == "released":
            success.append(self._event(view, "released", time.time(), record))
        elif reason == "broken":
            unflushed = int(record.get("unflushed", 0)) or None
            success.append(self._event(view, "broken", time.time(), record, by=by, unflushed=unflushed))
        else:  # a lock-delay that ended; etcd timed it from the lapse
            ended = float(record.get("lapsed_at") or time.time()) + self.timing[1]
            success.append(self._event(view, "lock-delay-ended", min(ended, time.time()), record))
        if reason != "released":
            loss = {
                "holder": Holder.from_json(record["holder"]).key,
                "token": token,
                "reason": reason,
                "at": float(record.get("lapsed_at") or time.time()),
                "unflushed": int(record.get("unflushed", 0)),
            }
            success.append(_put(keys["loss"], loss))
        reply = self.transport.txn([_unchanged(keys["writer"], view.writer.mod_revision)], success)
        return bool(reply.get("succeeded"))

    def _ask_takeover(self, view: _View, holder: Holder) -> bool:
        assert view.writer is not None
        keys = self._keys(view)
        reply = self.transport.txn(
            [
                _unchanged(keys["writer"], view.writer.mod_revision),
                {**_absent(keys["alive"]), "result": "GREATER"},
            ],
            [
                _put(keys["writer"], {**view.writer.value, "takeover_by": holder.key}),
                self._event(
                    view, "takeover-asked", time.time(), view.writer.value, by=f"{holder.user}@{holder.host}"
                ),
            ],
        )
        return bool(reply.get("succeeded"))

    def _enqueue(self, view: _View, holder: Holder, *, takeover: bool) -> None:
        """Join the queue, or stay in it: each poll renews the place for one more TTL, so a
        waiter that stops asking drops out as it does from the broker's queue."""
        key = self._project_prefix(view.project) + "queue/" + holder.key
        mine = next((w for w in view.queue if w.holder.key == holder.key), None)
        # A place already as good as the one asked for (a takeover place serves a plain wait too).
        if (
            mine is not None
            and (mine.takeover or not takeover)
            and self.transport.keepalive(mine.entry.lease) > 0
        ):
            return
        # A new place, or a takeover request: an existing key keeps its create revision, and
        # with it its place in the queue.
        lease, _ = self.transport.grant(self._lease_ttl())
        self.transport.txn([], [_put(key, {"holder": holder.to_json(), "takeover": takeover}, lease=lease)])

    def _granted(self, req_id: str, view: _View) -> dict[str, Any]:
        assert view.writer is not None
        record = view.writer.value
        _, ttl = self._session(Holder.from_json(record["holder"]))
        fields = self._lease_fields(
            view.project, view.token, float(record["since"]), ttl, record.get("takeover_by")
        )
        return protocol.reply_ok(req_id, **fields)

    def _queued(self, req_id: str, view: _View, holder: Holder) -> dict[str, Any]:
        keys = [w.holder.key for w in view.queue]
        position = keys.index(holder.key) + 1 if holder.key in keys else len(keys) + 1
        return protocol.reply_ok(req_id, status="queued", position=position, **self._refusal(view))

    def _refusal(self, view: _View) -> dict[str, Any]:
        fields: dict[str, Any] = {"state": str(view.state), "holder": None, "retry_after": None}
        if view.writer is not None and view.state is not LeaseState.FREE:
            record = view.writer.value
            fields["holder"] = {
                "host": record["holder"]["host"],
                "user": record["holder"]["user"],
                "since": float(record["since"]),
                "token": view.token,
                "unflushed": int(record.get("unflushed", 0)),
                "dirty": view.holds_data,
                **work_fields(record.get("work"), record.get("serving")),
            }
        if view.state is LeaseState.LOCK_DELAY:
            fields["retry_after"] = self._delay_left(view)
        elif view.state is LeaseState.FREE and view.queue:
            fields["queue_length"] = len(view.queue)
        return fields

    def _delay_left(self, view: _View) -> float:
        if view.delay is None:
            return self.timing[1]
        return self.transport.time_left(view.delay.lease)

    # --------------------------------------------------------------- renew

    def _renew(self, holder: Holder, items: Sequence[RenewItem]) -> list[dict[str, Any]]:
        """Heartbeat: one keep-alive of this holder's etcd lease, then each project checked and
        its record brought up to date (unflushed bytes, a new session after a restart)."""
        _, ttl = self._renew_session(holder)
        results = []
        for item in items:
            project, token, unflushed = item.project, item.token, item.unflushed
            for _ in range(_RACE_RETRIES):
                view = self._observe(self._read(project))
                if view.held_by(holder, token):
                    if not self._resume(view, holder, unflushed):
                        continue
                    takeover_by = view.writer.value.get("takeover_by") if view.writer else None
                    results.append(
                        {"project": project, "ok": True, "ttl": float(ttl), "takeover_by": takeover_by}
                    )
                elif token == 0 and holder.key in view.readers:
                    results.append({"project": project, "ok": True, "ttl": float(ttl), "takeover_by": None})
                else:
                    results.append({"project": project, "ok": False, **self._loss_for(view, holder, token)})
                break
            else:
                results.append({"project": project, "ok": False, "reason": "contended", "at": None})
        return results

    def _mark(self, req_id: str, request: requests.Mark) -> dict[str, Any]:
        """The holder marks its lease dirty (before its first unflushed write is acknowledged)
        or clean (a flush emptied its cache); see `rules.LeaseTable.mark`. The writer record
        is durable in etcd once the transaction is answered."""
        project, holder, token, dirty = request.project, request.holder, request.token, request.dirty
        unflushed = request.unflushed
        self._renew_session(holder)
        for _ in range(_RACE_RETRIES):
            view = self._observe(self._read(project))
            if not view.held_by(holder, token):
                return protocol.reply_error(
                    req_id,
                    ErrorKind.LOST,
                    "this host no longer holds the writer lease",
                    **self._loss_for(view, holder, token),
                )
            assert view.writer is not None
            record = view.writer.value
            bytes_now = 0 if not dirty else max(int(record.get("unflushed", 0)), int(unflushed or 0))
            if not self._resume(view, holder, int(record.get("unflushed", 0))):
                continue
            view = self._read(project)
            if view.writer is None or view.token != token:
                continue
            keys = self._keys(view)
            fresh = {**view.writer.value, "dirty": dirty, "unflushed": bytes_now}
            reply = self.transport.txn(
                [_unchanged(keys["writer"], view.writer.mod_revision)], [_put(keys["writer"], fresh)]
            )
            if reply.get("succeeded"):
                return protocol.reply_ok(req_id, dirty=_holds_data(fresh), ttl=float(self._lease_ttl()))
        return protocol.reply_error(
            req_id, ErrorKind.UNAVAILABLE, "etcd kept changing under this request; retry"
        )

    def _serve(self, req_id: str, request: requests.Serve) -> dict[str, Any]:
        """The holder says where it serves the project to workers; see `rules.LeaseTable.serve`."""
        holder, token = request.holder, request.token
        serving = {"address": request.address, "key": request.key} if request.address else None
        self._renew_session(holder)
        for _ in range(_RACE_RETRIES):
            view = self._observe(self._read(request.project))
            if not view.held_by(holder, token):
                return protocol.reply_error(
                    req_id,
                    ErrorKind.LOST,
                    "this host no longer holds the writer lease",
                    **self._loss_for(view, holder, token),
                )
            assert view.writer is not None
            if not self._resume(view, holder, int(view.writer.value.get("unflushed", 0))):
                continue
            view = self._read(request.project)
            if view.writer is None or view.token != token:
                continue
            fields = {"serve": request.address, "serve_key": request.key if request.address else None}
            if view.writer.value.get("serving") == serving:
                return protocol.reply_ok(req_id, **fields)
            keys = self._keys(view)
            fresh = {**view.writer.value, "serving": serving}
            reply = self.transport.txn(
                [_unchanged(keys["writer"], view.writer.mod_revision)], [_put(keys["writer"], fresh)]
            )
            if reply.get("succeeded"):
                return protocol.reply_ok(req_id, **fields)
        return protocol.reply_error(
            req_id, ErrorKind.UNAVAILABLE, "etcd kept changing under this request; retry"
        )

    def _loss_for(self, view: _View, holder: Holder, token: int) -> dict[str, Any]:
        loss = view.loss.value if view.loss else None
        if loss is not None and loss.get("holder") == holder.key and int(loss.get("token", -1)) == token:
            return {"reason": loss["reason"], "at": loss.get("at"), "current_token": view.last_token}
        if view.last_token > token:
            return {"reason": "superseded", "at": None, "current_token": view.last_token}
        return {"reason": "released", "at": None, "current_token": view.last_token}

    # ------------------------------------------------------- release, break

    def _release(self, project: str, holder: Holder, token: int | None, mode: str) -> dict[str, Any]:
        base = self._project_prefix(project)
        # Each transaction is a write to every member's log, even one that deletes nothing: a
        # release of what is not there (a retry, a stray or malformed request) writes nothing.
        if mode == "read":
            if holder.key in self._read(project).readers:
                self.transport.txn([], [_delete(base + "readers/" + holder.key)])
            return {}
        for _ in range(_RACE_RETRIES):
            view = self._observe(self._read(project))
            if not view.held_by(holder, token):  # a lease lapsed for good holds nothing
                if any(w.holder.key == holder.key for w in view.queue):
                    self.transport.txn([], [_delete(base + "queue/" + holder.key)])
                return {"held": False}
            mine = view.token
            if self._retire(view, "released"):
                return {"held": True, "token": mine}
        raise BrokerUnavailable("etcd kept changing under a release; retry", address=self.address)

    def _leave_queue(self, project: str, holder: Holder) -> None:
        view = self._read(project)
        waiting = any(w.holder.key == holder.key for w in view.queue)
        asked = view.writer is not None and view.writer.value.get("takeover_by") == holder.key
        if not waiting and not asked:  # nothing to leave: write nothing (see _release)
            return
        base = self._project_prefix(project)
        success = [_delete(base + "queue/" + holder.key)]
        compare = []
        if view.writer is not None and view.writer.value.get("takeover_by") == holder.key:
            compare = [_unchanged(base + "writer", view.writer.mod_revision)]
            success.append(_put(base + "writer", {**view.writer.value, "takeover_by": None}))
        self.transport.txn(compare, success, [_delete(base + "queue/" + holder.key)])

    def _break(self, project: str, by: str | None = None) -> dict[str, Any] | None:
        for _ in range(_RACE_RETRIES):
            view = self._observe(self._read(project))
            if view.writer is None or view.state is LeaseState.FREE:
                return None
            record = view.writer.value
            stranded = {
                "host": record["holder"]["host"],
                "user": record["holder"]["user"],
                "token": view.token,
                "state": str(view.state),
                "unflushed": int(record.get("unflushed", 0)),
                "dirty": view.holds_data,
            }
            if self._retire(view, "broken", by):
                return stranded
        raise BrokerUnavailable("etcd kept changing under a break; retry", address=self.address)

    # ------------------------------------------------------------- history

    def _history_prefix(self, project: str) -> str:
        return f"{self.root}h/{urllib.parse.quote(project, safe='')}/"

    def _event(
        self, view: _View, kind: str, at: float, record: dict[str, Any], **fields: Any
    ) -> dict[str, Any]:
        """The put of one history event about the writer ``record``, for a transaction."""
        holder = record["holder"]
        token = fields.pop("token") if "token" in fields else view.token
        event = history.event(
            kind,
            view.project,
            at,
            **history.holder_fields(str(holder["host"]), str(holder["user"]), token, record.get("work")),
            **fields,
        )
        return _put(self._history_prefix(view.project) + uuid.uuid4().hex, event)

    def _report(self, request: requests.Report) -> None:
        view = self._read(request.project)
        work = (
            view.writer.value.get("work") if view.writer is not None and view.token == request.token else None
        )
        holder = request.holder
        event = history.event(
            request.event,
            request.project,
            time.time(),
            **history.holder_fields(holder.host, holder.user, request.token, work),
            bytes=request.bytes,
            records=request.records,
            seconds=request.seconds,
            detail=request.detail,
        )
        self.transport.txn([], [_put(self._history_prefix(request.project) + uuid.uuid4().hex, event)])
        self._maybe_trim(request.project)

    def _history(self, project: str | None, since: float, limit: int) -> list[dict[str, Any]]:
        # A lapse due by now is an event too.
        for view in [self._read(project)] if project is not None else self._read_all():
            self._observe(view)
        prefix = self._history_prefix(project) if project is not None else self.root + "h/"
        kvs, _ = self.transport.range_prefix(prefix)
        kvs.sort(key=lambda kv: int(kv.get("create_revision", 0)))
        events = []
        for kv in kvs:
            try:
                event = json.loads(_unb64(kv.get("value", "")))
            except ValueError:
                continue  # a damaged event is history lost, not a reason to refuse the rest
            if not isinstance(event, dict):
                continue
            if event.get("event") == "granted" and event.get("token") is None:
                # Written in the granting transaction, whose revision is the token's base.
                event["token"] = int(kv.get("create_revision", 0)) + int(event.pop("offset", 0))
            events.append(event)
        return history.select(events, since, limit)

    def _maybe_trim(self, project: str) -> None:
        """Now and then, drop a project's oldest events beyond history.KEEP_PER_PROJECT: counting
        on every write would double the cost of each grant and flush report."""
        if random.random() >= 1 / 32:
            return
        prefix = self._history_prefix(project)
        reply = self.transport.post(
            "/kv/range",
            {"key": _b64(prefix), "range_end": _range_end(prefix), "keys_only": True},
        )
        kvs = sorted(reply.get("kvs", []), key=lambda kv: int(kv.get("create_revision", 0)))
        for kv in kvs[: max(0, len(kvs) - history.KEEP_PER_PROJECT)]:
            self.transport.post("/kv/deleterange", {"key": kv["key"]})

    # -------------------------------------------------------- hello, status

    def _hello(self) -> dict[str, Any]:
        status = self.transport.post("/maintenance/status", {})
        lock_delay = self.timing[1]
        return {
            "broker": f"etcd:{status['header']['cluster_id']}",
            "backend": "etcd",
            "endpoints": [f"{host}:{port}" for host, port in self.parsed.endpoints],
            "ttl": float(self._lease_ttl()),
            "lock_delay": lock_delay,
            "grace_left": 0.0,
            "version": protocol.VERSION,
            "etcd_version": status.get("version"),
        }

    def _status(self, view: _View) -> dict[str, Any]:
        view = self._observe(view)
        state = view.state
        if view.writer is None and view.meta is None and not view.queue and not view.readers:
            return protocol.unknown_project_status(view.project, 0.0)
        writer = None
        if view.writer is not None and state is not LeaseState.FREE:
            record = view.writer.value
            ttl_left = 0.0
            if state is LeaseState.HELD and view.alive is not None:
                ttl_left = self.transport.time_left(view.alive.lease)
            writer = {
                "host": record["holder"]["host"],
                "user": record["holder"]["user"],
                "since": float(record["since"]),
                "token": view.token,
                "ttl_left": ttl_left,
                "unflushed": int(record.get("unflushed", 0)),
                "dirty": view.holds_data,
                "takeover_by": record.get("takeover_by"),
                **work_fields(record.get("work"), record.get("serving")),
            }
        return protocol.project_status(
            view.project,
            state=str(state),
            token=view.last_token,
            writer=writer,
            free_in=self._delay_left(view) if state is LeaseState.LOCK_DELAY else None,
            readers=[{"host": h.host, "user": h.user} for h, _ in view.readers.values()],
            queue=[
                {"host": w.holder.host, "user": w.holder.user, "takeover": w.takeover} for w in view.queue
            ],
            last_loss=dict(view.loss.value) if view.loss else None,
            grace_left=0.0,
        )


def _holds_data(record: dict[str, Any]) -> bool:
    return bool(record.get("dirty")) or int(record.get("unflushed", 0)) > 0


def configure(address: str, *, ttl: float, lock_delay: float, timeout: float = 5.0) -> None:
    """Store the site's timing in etcd (replacing what is there), as `dbguard up --etcd` does."""
    with EtcdLeases(address, timeout=timeout) as leases:
        leases.transport.txn([], [_put(leases.root + "config", {"ttl": ttl, "lock_delay": lock_delay})])
