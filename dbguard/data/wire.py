"""What workers and the host that serves a project say to each other (`dbguard serve`).

A request is one ZeroMQ message of one or two frames: a JSON header, and for a record the raw
bytes of its array (sent and received without a copy into Python objects). A reply is the same
shape. Every request carries an id; a worker that resends a request after a timeout or a
reconnection resends the same id, and the server applies an append once per id
(`CacheStore.append(..., once=...)`), so a retried append never lands twice. Errors travel as
the lease service's do (`GuardError.to_reply` / `from_reply`): a worker raises the class the
holder raised.

The holder checks everything here as untrusted input: a header that does not parse, a field of
the wrong type, a payload whose size does not match its dtype and shape are refused with a
``bad_request`` naming what was wrong, and the server carries on.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from typing import Any

import numpy as np

from dbguard.lease.protocol import ErrorKind, ProtocolError, new_request_id, reply_error

VERSION = 1
# A header is a few hundred bytes; attrs may make it larger, but never this large.
MAX_HEADER_BYTES = 1 << 20
# One record: a 16k x 16k float32 image is 1 GiB. The server's socket refuses larger messages
# before it reads them (ZMQ_MAXMSGSIZE).
MAX_RECORD_BYTES = 1 << 30
# A request id (a worker sends a uuid's 32 hex digits); the cache keeps it with an append.
MAX_ID = 64


class DataOp(StrEnum):
    HELLO = "hello"  # which project, which token: a worker checks it reached the right holder
    DATABASES = "databases"  # names and counts
    COUNT = "count"
    GET = "get"  # one record: header (dtype, shape, attrs) and payload
    RECORDS = "records"  # every record's dtype, shape and attrs (ls)
    APPEND = "append"
    PUT = "put"  # overwrite one record, keeping its attrs
    SET_ATTRS = "set_attrs"


WRITES = frozenset({DataOp.APPEND, DataOp.PUT, DataOp.SET_ATTRS})


def request(op: DataOp, req_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id or new_request_id(), "op": str(op), **fields}


def encode_header(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=True).encode()


def decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    """One header, or ProtocolError naming what is wrong with it."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        message = json.loads(bytes(frame))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("header is not a JSON object")
    if not isinstance(message.get("id"), str) or not 0 < len(message["id"]) <= MAX_ID:
        raise ProtocolError(f"header has no request id of 1 to {MAX_ID} characters")
    return message


def field(message: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    """``message[name]`` if it has type ``kind`` (bool is not an int here), else ProtocolError."""
    value = message.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}, not {value!r}")
    return value


def array_header(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


def array_from(message: dict[str, Any], payload: bytes | memoryview) -> np.ndarray[Any, Any]:
    """The record a request or reply carries: its payload viewed with its dtype and shape (no
    copy). ProtocolError if the three do not agree."""
    try:
        dtype = np.dtype(field(message, "dtype", str))
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ProtocolError(f"dtype {message.get('dtype')!r} is not a numpy dtype: {exc}") from None
    if dtype.hasobject or dtype.itemsize == 0 or dtype.subdtype is not None or dtype.fields:
        raise ProtocolError(f"dtype {dtype} cannot be a record (a plain numeric dtype can)")
    shape = field(message, "shape", list)
    if len(shape) > 32 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ProtocolError(f"shape {shape!r} must be a list of at most 32 sizes")
    expected = dtype.itemsize * math.prod(shape)
    if expected != len(payload):
        raise ProtocolError(f"payload of {len(payload)} bytes does not hold {dtype} {tuple(shape)}")
    try:
        return np.frombuffer(payload, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError) as exc:  # a shape numpy cannot make, such as [0, 10**30]
        raise ProtocolError(f"shape {shape!r} cannot be made: {exc}") from None


def bad_request(req_id: str, exc: Exception) -> dict[str, Any]:
    return reply_error(req_id, ErrorKind.BAD_REQUEST, f"malformed request: {exc}")
