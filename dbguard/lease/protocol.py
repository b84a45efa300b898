"""The wire protocol, in one place: message names, version, encoding, validation, timing.

Every message is one ZeroMQ frame holding a UTF-8 JSON object. A request is
``{"v": 1, "id": <client-made id>, "op": <name>, ...fields}``; its reply echoes ``v`` and
``id`` and carries ``"ok": true`` with the result fields, or ``"ok": false`` with ``error``
(a kind from `ErrorKind`) and ``message``. The client-made id lets a client resend a request
whose reply was lost: the broker answers a repeated id from its reply cache instead of
acting twice (kazoo's "uuid prefix" trick for lock nodes, applied to every request).

All times on the wire are seconds (floats). Durations are relative ("ttl", "retry_after"),
never absolute monotonic readings, because two processes do not share a monotonic clock.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

VERSION: Final = 1

# The largest request the broker reads; ZeroMQ drops a peer that sends more (ZMQ_MAXMSGSIZE),
# so an oversized message cannot make the broker allocate without bound.
MAX_MESSAGE_BYTES: Final = 64 * 1024

# A heartbeat is due every TTL / LIVENESS seconds: a holder may miss LIVENESS - 1 heartbeats
# in a row before its lease expires (Paranoid Pirate's interval x liveness, kept here only).
LIVENESS: Final = 3


def heartbeat_interval(ttl: float) -> float:
    """How often a holder must renew a lease of this TTL."""
    return ttl / LIVENESS


class Op(StrEnum):
    """Requests the broker understands."""

    HELLO = "hello"
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"
    LEAVE_QUEUE = "leave-queue"
    STATUS = "status"
    BREAK = "break"
    # The holder tells the lease service that it now holds acknowledged unflushed data (dirty)
    # or that a flush emptied its cache (clean): whether an expired lease orphans or frees.
    MARK = "mark"
    # The holder says where it serves the project to worker nodes (or that it stopped): kept
    # with its writer lease, shown by status, read by workers (`dbguard serve`).
    SERVE = "serve"
    # An agent tells the lease service what happened on its host (a flush, a fence refusal, a
    # deployment), for the project's history; and anyone reads that history back.
    REPORT = "report"
    HISTORY = "history"


# What agents may report for a project's history (`Op.REPORT`); the lease service records the
# other events itself (dbguard.lease.history).
REPORTED_EVENTS: Final = frozenset({"flushed", "fence-refused", "deployed", "synced", "undeployed"})


class AgentOp(StrEnum):
    """Requests the local agent understands on its socket in the cache directory."""

    HELLO = "hello"
    ACQUIRE = "acquire"
    RELEASE = "release"
    LEASES = "leases"
    SHUTDOWN = "shutdown"
    # A writing process's first unflushed write after a clean state: the agent marks the lease
    # dirty at the lease service before the write may proceed (invariant 7).
    MARK_DIRTY = "mark-dirty"
    # A flush has just emptied the project's cache: mark the lease clean now, not at the agent's
    # next look, so that a host that dies right after a successful flush frees its project.
    SETTLE = "settle"
    # How many bytes a lease marked dirty at open now holds. The dirty mark is already durable,
    # so the lease service needs no disk sync for it: a cheap round trip.
    NOTE_UNFLUSHED = "note-unflushed"
    # Serve a held project to worker nodes on an address (`dbguard serve`), or stop serving it.
    SERVE = "serve"
    UNSERVE = "unserve"
    # The project was deployed to (or taken back from) a folder of this host (`dbguard deploy`).
    DEPLOYED = "deployed"
    UNDEPLOYED = "undeployed"
    # A user process tells the agent what happened to a held project (a flush it ran, a flush
    # the fencing token refused), for the agent to report to the lease service's history.
    REPORT = "report"


class ErrorKind(StrEnum):
    """Why a request failed. Each `GuardError` class declares the kind it travels as (its
    ``kind``, dbguard.errors), and a client raises the class of the kind it reads."""

    BAD_REQUEST = "bad-request"
    VERSION = "unsupported-version"
    HELD = "held"
    GRACE = "grace"
    LOST = "lost"
    NOT_HOLDER = "not-holder"
    UNSAFE_CACHE = "unsafe-cache"
    INTEGRITY = "integrity"
    FENCED = "fenced"
    UNAVAILABLE = "unavailable"
    USAGE = "usage"
    BUSY = "busy"
    SHARE_REFUSED = "share-refused"
    CACHE_FULL = "cache-full"
    UNFLUSHED = "unflushed"
    ETCD_CLUSTER = "etcd-cluster"
    AGENT_RUNNING = "agent-running"
    STOPPED = "stopped"
    NOT_SERVED = "not-served"
    HOLDER_UNREACHABLE = "holder-unreachable"
    INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not fit its schema."""


# Field schemas: name -> (accepted types, required). Unknown fields are refused, so a typo in a
# client shows up at once instead of being silently ignored.
_HOLDER = (dict, True)
_PROJECT = (str, True)
_SCHEMAS: Final[dict[str, dict[str, tuple[type | tuple[type, ...], bool]]]] = {
    Op.HELLO: {},
    Op.ACQUIRE: {
        "project": _PROJECT,
        "holder": _HOLDER,
        "mode": (str, False),
        "wait": (bool, False),
        "takeover": (bool, False),
        "floor": (int, False),
        "unflushed": (int, False),
        "dirty": (bool, False),
        # What the writer runs, for people reading status: the command, its pid, its batch job.
        "command": (str, False),
        "pid": (int, False),
        "job": (str, False),
        # Where the project is, for people: the lease service keys projects by id.
        "path": (str, False),
    },
    Op.RENEW: {"holder": _HOLDER, "leases": (list, True)},
    Op.RELEASE: {"project": _PROJECT, "holder": _HOLDER, "token": (int, False), "mode": (str, False)},
    Op.LEAVE_QUEUE: {"project": _PROJECT, "holder": _HOLDER},
    Op.STATUS: {"project": (str, False)},
    Op.BREAK: {"project": _PROJECT, "force": (bool, True), "operator": (str, False)},
    Op.SERVE: {
        "project": _PROJECT,
        "holder": _HOLDER,
        "token": (int, True),
        # Where workers reach the holder's server, and its CURVE public key; no address: not served.
        "address": (str, False),
        "key": (str, False),
    },
    Op.REPORT: {
        "project": _PROJECT,
        "holder": _HOLDER,
        "token": (int, True),
        "event": (str, True),
        "bytes": (int, False),
        "records": (int, False),
        "seconds": ((int, float), False),
        "detail": (str, False),
    },
    # Newest last; ``since`` in wall-clock seconds; at most ``limit`` events, the newest ones.
    Op.HISTORY: {"project": (str, False), "since": ((int, float), False), "limit": (int, False)},
    Op.MARK: {
        "project": _PROJECT,
        "holder": _HOLDER,
        "token": (int, True),
        "dirty": (bool, True),
        "unflushed": (int, False),
    },
}
_HOLDER_FIELDS: Final = {"host": str, "user": str, "agent": str, "cache": str}
_RENEW_ITEM_FIELDS: Final = {"project": str, "token": int, "unflushed": int}
_MAX_NAME = 4096  # a cache path may be long
# Tokens and byte counts fit in 64 bits wherever they are kept; an unbounded JSON integer would
# also make the broker fail when it writes the reply (CPython prints at most 4300 digits).
_MAX_INT = 2**63 - 1
# Projects are named by a 36-character UUID; the broker keys its LMDB records by the name, and an
# LMDB key holds at most 511 bytes (a longer one fails the commit, and with it the broker).
_MAX_PROJECT_BYTES = 255


def new_request_id() -> str:
    return uuid.uuid4().hex


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def request(op: str, req_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id or new_request_id(), "op": op, **fields}


def reply_ok(req_id: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": True, **fields}


def reply_error(req_id: str, kind: ErrorKind, message: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": False, "error": str(kind), "message": message, **fields}


def decode(frame: bytes, *, limit: int | None = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Parse one frame into a JSON object, or raise ProtocolError saying what is wrong.

    ``limit`` is for requests; a client reading replies passes None: the status of every
    project of a site is far larger than any request.
    """
    if limit is not None and len(frame) > limit:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds {limit}")
    # ValueError covers bad JSON, bad UTF-8, and an integer of more than 4300 digits, which
    # json.loads refuses with a plain ValueError (CPython's int_max_str_digits).
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON object: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


def decode_request(frame: bytes) -> dict[str, Any]:
    """Decode and validate a broker request; raise ProtocolError naming the bad field."""
    message = decode(frame)
    req_id = message.get("id")
    if not isinstance(req_id, str) or not 0 < len(req_id) <= 64 or not _is_text(req_id):
        raise ProtocolError("'id' must be a string of 1 to 64 characters")
    # type() and not ==: true and 1.0 equal 1 in Python but are not this version.
    if type(message.get("v")) is not int or message["v"] != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {message.get('v')!r}; this broker speaks {VERSION}"
        )
    op = message.get("op")
    if not isinstance(op, str) or op not in _SCHEMAS:  # a list or object cannot be looked up
        raise ProtocolError(f"unknown operation {op!r}")
    _check_fields(message, _SCHEMAS[op], {"v", "id", "op"})
    if "holder" in message:
        _check_flat(message["holder"], _HOLDER_FIELDS, "holder")
    if op == Op.RENEW:
        if len(message["leases"]) > 10_000:
            raise ProtocolError("'leases' lists more than 10000 projects")
        for item in message["leases"]:
            _check_flat(item, _RENEW_ITEM_FIELDS, "leases[]")
    projects = [item["project"] for item in message["leases"]] if op == Op.RENEW else [message.get("project")]
    for project in projects:
        if project is not None and len(project.encode()) > _MAX_PROJECT_BYTES:
            raise ProtocolError(f"a project name must be at most {_MAX_PROJECT_BYTES} bytes of UTF-8")
    if message.get("mode", "write") not in ("write", "read"):
        raise ProtocolError("'mode' must be 'write' or 'read'")
    if op == Op.REPORT and message["event"] not in REPORTED_EVENTS:
        raise ProtocolError(f"'event' must be one of {', '.join(sorted(REPORTED_EVENTS))}")
    for name in ("seconds", "since"):
        if name in message and not (math.isfinite(message[name]) and 0 <= message[name] < 1e12):
            raise ProtocolError(f"'{name}' must be a finite number of seconds, not negative")
    for name in ("floor", "unflushed", "token", "pid", "bytes", "records", "limit"):
        if name in message and not 0 <= message[name] <= _MAX_INT:
            raise ProtocolError(f"'{name}' must be from 0 to 2**63 - 1")
    return message


def _check_fields(
    message: Mapping[str, Any],
    schema: Mapping[str, tuple[type | tuple[type, ...], bool]],
    envelope: set[str],
) -> None:
    for name, (kinds, required) in schema.items():
        if name not in message:
            if required:
                raise ProtocolError(f"missing field '{name}'")
            continue
        value = message[name]
        # bool is an int in Python; an int field must not accept true/false.
        if isinstance(value, bool) and kinds is not bool:
            raise ProtocolError(f"field '{name}' has the wrong type")
        if not isinstance(value, kinds):
            raise ProtocolError(f"field '{name}' has the wrong type")
        if isinstance(value, str) and not 0 < len(value) <= _MAX_NAME:
            raise ProtocolError(f"field '{name}' must be 1 to {_MAX_NAME} characters")
        if isinstance(value, str) and not _is_text(value):
            raise ProtocolError(f"field '{name}' is not valid Unicode (a lone surrogate)")
    extra = set(message) - set(schema) - envelope
    if extra:
        raise ProtocolError(f"unknown field(s) {sorted(extra)}")


def _check_flat(value: Any, fields: Mapping[str, type], where: str) -> None:
    if not isinstance(value, dict):
        raise ProtocolError(f"'{where}' must be an object")
    for name, kind in fields.items():
        item = value.get(name)
        if isinstance(item, bool) or not isinstance(item, kind):
            raise ProtocolError(f"'{where}.{name}' is missing or has the wrong type")
        if isinstance(item, str) and not 0 < len(item) <= _MAX_NAME:
            raise ProtocolError(f"'{where}.{name}' must be 1 to {_MAX_NAME} characters")
        if isinstance(item, str) and not _is_text(item):
            raise ProtocolError(f"'{where}.{name}' is not valid Unicode (a lone surrogate)")
        if isinstance(item, int) and not 0 <= item <= _MAX_INT:
            raise ProtocolError(f"'{where}.{name}' must be from 0 to 2**63 - 1")
    extra = set(value) - set(fields)
    if extra:
        raise ProtocolError(f"unknown field(s) {sorted(extra)} in '{where}'")


def _is_text(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8. JSON's "\\ud800" decodes to a lone surrogate, which
    cannot be a project name: the broker keys its LMDB records by the name's UTF-8 bytes."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def unknown_project_status(project: str, grace_left: float) -> dict[str, Any]:
    """The status of a project the lease service has no record of (free, token 0)."""
    return {
        "project": project,
        "state": "free",
        "known": False,
        "token": 0,
        "writer": None,
        "readers": [],
        "queue": [],
        "grace_left": grace_left,
    }


def project_status(
    project: str,
    *,
    state: str,
    token: int,
    writer: dict[str, Any] | None,
    free_in: float | None,
    readers: list[dict[str, Any]],
    queue: list[dict[str, Any]],
    last_loss: dict[str, Any] | None,
    grace_left: float,
) -> dict[str, Any]:
    """One project's entry in a status reply, the same from either lease service. ``writer``
    holds host, user, since, token, ttl_left, unflushed, dirty, takeover_by, what the writer
    runs: command, pid and job (None when it did not say), and where it serves the project to
    workers: serve and serve_key (None when it does not)."""
    return {
        "project": project,
        "known": True,
        "state": state,
        "token": token,
        "writer": writer,
        "free_in": free_in,
        "readers": readers,
        "queue": queue,
        "last_loss": last_loss,
        "grace_left": grace_left,
    }
