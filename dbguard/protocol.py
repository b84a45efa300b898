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


class AgentOp(StrEnum):
    """Requests the local agent understands on its socket in the cache directory."""

    HELLO = "hello"
    ACQUIRE = "acquire"
    RELEASE = "release"
    LEASES = "leases"
    SHUTDOWN = "shutdown"


class ErrorKind(StrEnum):
    """Why a request failed; the client maps each to a typed `GuardError`."""

    BAD_REQUEST = "bad-request"
    VERSION = "unsupported-version"
    HELD = "held"
    GRACE = "grace"
    LOST = "lost"
    NOT_HOLDER = "not-holder"
    UNSAFE_CACHE = "unsafe-cache"
    INTEGRITY = "integrity"
    UNAVAILABLE = "unavailable"
    USAGE = "usage"
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
    },
    Op.RENEW: {"holder": _HOLDER, "leases": (list, True)},
    Op.RELEASE: {"project": _PROJECT, "holder": _HOLDER, "token": (int, False), "mode": (str, False)},
    Op.LEAVE_QUEUE: {"project": _PROJECT, "holder": _HOLDER},
    Op.STATUS: {"project": (str, False)},
    Op.BREAK: {"project": _PROJECT, "force": (bool, True), "operator": (str, False)},
}
_HOLDER_FIELDS: Final = {"host": str, "user": str, "agent": str, "cache": str}
_RENEW_ITEM_FIELDS: Final = {"project": str, "token": int, "unflushed": int}
_MAX_NAME = 4096  # a cache path may be long


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


def decode(frame: bytes) -> dict[str, Any]:
    """Parse one frame into a JSON object, or raise ProtocolError saying what is wrong."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON object: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


def decode_request(frame: bytes) -> dict[str, Any]:
    """Decode and validate a broker request; raise ProtocolError naming the bad field."""
    message = decode(frame)
    req_id = message.get("id")
    if not isinstance(req_id, str) or not 0 < len(req_id) <= 64:
        raise ProtocolError("'id' must be a string of 1 to 64 characters")
    if message.get("v") != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {message.get('v')!r}; this broker speaks {VERSION}"
        )
    op = message.get("op")
    if op not in _SCHEMAS:
        raise ProtocolError(f"unknown operation {op!r}")
    _check_fields(message, _SCHEMAS[op], {"v", "id", "op"})
    if "holder" in message:
        _check_flat(message["holder"], _HOLDER_FIELDS, "holder")
    if op == Op.RENEW:
        if len(message["leases"]) > 10_000:
            raise ProtocolError("'leases' lists more than 10000 projects")
        for item in message["leases"]:
            _check_flat(item, _RENEW_ITEM_FIELDS, "leases[]")
    if message.get("mode", "write") not in ("write", "read"):
        raise ProtocolError("'mode' must be 'write' or 'read'")
    for name in ("floor", "unflushed", "token"):
        if name in message and message[name] < 0:
            raise ProtocolError(f"'{name}' must not be negative")
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
        if isinstance(item, int) and item < 0:
            raise ProtocolError(f"'{where}.{name}' must not be negative")
    extra = set(value) - set(fields)
    if extra:
        raise ProtocolError(f"unknown field(s) {sorted(extra)} in '{where}'")
