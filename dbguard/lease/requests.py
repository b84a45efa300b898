"""The requests of the lease service as typed values: one frozen dataclass per operation.

`decode` checks a frame against the protocol (dbguard.lease.protocol) and returns the request
with every optional field filled in with its default, so the broker and the etcd service
dispatch on the same values and neither keeps defaults of its own. `encode` is the inverse:
``decode(encode(r, id)) == (id, r)`` for every request ``r`` (tests/test_requests.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from dbguard.lease import protocol
from dbguard.lease.protocol import Op
from dbguard.lease.rules import Holder, RenewItem

Mode = Literal["write", "read"]


@dataclass(frozen=True)
class Hello:
    """Who is the service, with which timing; also the cheapest "are you there"."""

    op: ClassVar[Op] = Op.HELLO


@dataclass(frozen=True)
class Acquire:
    """Take a project's writer lease (or a reader's place), or queue for it with ``wait``.

    ``floor`` is the project's fencing floor read from the share: the token granted is above
    it. ``unflushed`` and ``dirty`` say that the holder's cache already holds data for the
    project (a restarted agent), so the lease is dirty from its grant (invariant 7)."""

    op: ClassVar[Op] = Op.ACQUIRE
    project: str
    holder: Holder
    mode: Mode = "write"
    wait: bool = False
    takeover: bool = False
    floor: int = 0
    unflushed: int = 0
    dirty: bool = False
    command: str | None = None  # what the writer runs, shown by status (`dbguard run`)
    pid: int | None = None
    job: str | None = None  # the batch job it belongs to (SLURM_JOB_ID and the like)
    path: str | None = None  # where the project is, for people (the service keys by id)


@dataclass(frozen=True)
class Renew:
    """One heartbeat for every lease a holder has, with each project's unflushed bytes."""

    op: ClassVar[Op] = Op.RENEW
    holder: Holder
    leases: tuple[RenewItem, ...]


@dataclass(frozen=True)
class Release:
    """Give a lease back. ``token`` guards against releasing a successor's lease with a stale
    request; None releases whatever this holder has."""

    op: ClassVar[Op] = Op.RELEASE
    project: str
    holder: Holder
    token: int | None = None
    mode: Mode = "write"


@dataclass(frozen=True)
class LeaveQueue:
    """Stop waiting for a project (a waiter that gave up or was interrupted)."""

    op: ClassVar[Op] = Op.LEAVE_QUEUE
    project: str
    holder: Holder


@dataclass(frozen=True)
class Status:
    """One project's state, or every project's when ``project`` is None."""

    op: ClassVar[Op] = Op.STATUS
    project: str | None = None


@dataclass(frozen=True)
class Break:
    """An operator ends a lease, held or orphaned; ``force`` must be given explicitly."""

    op: ClassVar[Op] = Op.BREAK
    project: str
    force: bool
    operator: str | None = None


@dataclass(frozen=True)
class Mark:
    """The holder says its lease now guards acknowledged unflushed data (dirty) or that a
    flush emptied its cache (clean), and optionally how many bytes it holds."""

    op: ClassVar[Op] = Op.MARK
    project: str
    holder: Holder
    token: int
    dirty: bool
    unflushed: int | None = None


@dataclass(frozen=True)
class Serve:
    """The holder serves the project to worker nodes at ``address`` (its server's CURVE public
    key ``key`` when keys are used), or no longer serves it (``address`` None)."""

    op: ClassVar[Op] = Op.SERVE
    project: str
    holder: Holder
    token: int
    address: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Report:
    """The holder's agent reports what happened to a project on its host (a flush, a fence
    refusal, a deployment), for the project's history (dbguard.lease.history)."""

    op: ClassVar[Op] = Op.REPORT
    project: str
    holder: Holder
    token: int
    event: str
    bytes: int | None = None
    records: int | None = None
    seconds: float | None = None
    detail: str | None = None


@dataclass(frozen=True)
class History:
    """What happened to one project (or to every one when ``project`` is None) since ``since``
    (wall-clock seconds), oldest first: at most ``limit`` events, the newest ones."""

    op: ClassVar[Op] = Op.HISTORY
    project: str | None = None
    since: float = 0.0
    limit: int = 1000


def work_of(request: Acquire) -> dict[str, Any] | None:
    """What the writer runs, as the lease service keeps it; None when the acquire did not say."""
    if request.command is None and request.pid is None and request.job is None and request.path is None:
        return None
    return {"command": request.command, "pid": request.pid, "job": request.job, "path": request.path}


Request = Hello | Acquire | Renew | Release | LeaveQueue | Status | Break | Mark | Serve | Report | History

REQUEST_TYPES: dict[Op, type[Request]] = {
    cls.op: cls
    for cls in (Hello, Acquire, Renew, Release, LeaveQueue, Status, Break, Mark, Serve, Report, History)
}


def decode(frame: bytes) -> tuple[str, Request]:
    """The id and the typed request of one frame; ProtocolError naming what is wrong."""
    message = protocol.decode_request(frame)
    return message["id"], from_message(message)


def from_message(message: dict[str, Any]) -> Request:
    """The typed request of a message that `protocol.decode_request` has validated."""
    cls = REQUEST_TYPES[Op(message["op"])]
    values: dict[str, Any] = {}
    for field in fields(cls):
        if field.name not in message:
            continue  # the dataclass's default
        value = message[field.name]
        if field.name == "holder":
            value = Holder.from_json(value)
        elif field.name == "leases":
            value = tuple(RenewItem(item["project"], item["token"], item["unflushed"]) for item in value)
        values[field.name] = value
    return cls(**values)


def to_fields(request: Request) -> dict[str, Any]:
    """The wire fields of a request, without its envelope; fields that are None are left out."""
    result: dict[str, Any] = {}
    for field in fields(request):
        value = getattr(request, field.name)
        if value is None:
            continue
        if isinstance(value, Holder):
            value = value.to_wire()
        elif field.name == "leases":
            value = [item.to_json() for item in value]
        result[field.name] = value
    return result


def encode(request: Request, req_id: str | None = None) -> bytes:
    """One frame holding ``request`` under ``req_id`` (a fresh id when None)."""
    return protocol.encode(protocol.request(request.op, req_id, **to_fields(request)))
