"""What the Python API returns about leases: typed values rather than the wire's dicts.

`acquire` returns a `Lease`, `status` a `Status` of `ProjectStatus` entries. Each has
``to_json()`` giving the form `dbguard ... --json` prints, which is the wire's form, so scripts
that read the command's output see the same fields as before these types existed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbguard.errors import UsageError
from dbguard.lease.rules import LeaseState


@dataclass(frozen=True)
class Lease:
    """This host's writer lease on a project, as `dbguard.acquire` granted it."""

    project: str  # the project's id
    path: Path  # the project directory as this host sees it
    token: int  # the fencing token: every flush under this lease carries it
    ttl: float  # seconds the lease lasts without a renewal (the agent renews it)
    since: float  # wall-clock time of the grant
    state: str = "held"  # as the agent keeps it: held, lost, uncertain (lease service silent)
    reason: str = ""  # why it was lost
    takeover_by: str | None = None  # who asked this host to hand the project over
    # Whether the lease service may believe this host holds unflushed data of the project.
    marked: bool = True
    # Where this host serves the project to workers (`dbguard serve`), when it does.
    serve: str | None = None
    # When the project's identity file was lost and written again from the project store: what
    # was written back (see dbguard.data.project.open_project).
    recovered_identity: str | None = None

    @classmethod
    def from_agent(cls, reply: dict[str, Any], recovered_identity: str | None = None) -> Lease:
        return cls(
            project=str(reply["project"]),
            path=Path(reply["path"]),
            token=int(reply["token"]),
            ttl=float(reply["ttl"]),
            since=float(reply["since"]),
            state=str(reply.get("state", "held")),
            reason=str(reply.get("reason", "")),
            takeover_by=reply.get("takeover_by"),
            marked=bool(reply.get("marked", True)),
            serve=reply.get("serve"),
            recovered_identity=recovered_identity,
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": "granted",
            "project": self.project,
            "path": str(self.path),
            "token": self.token,
            "ttl": self.ttl,
            "since": self.since,
            "state": self.state,
            "reason": self.reason,
            "takeover_by": self.takeover_by,
            "marked": self.marked,
            "serve": self.serve,
        }
        if self.recovered_identity:
            data["identity"] = self.recovered_identity
        return data


@dataclass(frozen=True)
class QueuePlace:
    """Where this host waits for a project (what `acquire`'s ``on_queued`` is told)."""

    position: int  # 1 is next
    holder: dict[str, Any] | None  # who holds it now, as the lease service describes them


@dataclass(frozen=True)
class Writer:
    """A project's writer (or, once its lease ended, former writer) as the lease service sees it."""

    host: str
    user: str
    since: float  # wall-clock time of the grant
    token: int
    ttl_left: float  # seconds until the lease expires unrenewed (0 once it has)
    unflushed: int  # bytes, as the holder last reported them
    dirty: bool  # whether the holder may hold acknowledged unflushed data (invariant 7)
    takeover_by: str | None  # who asked the holder to hand the project over, if anyone
    # What the writer runs, when its acquire said (`dbguard run`): the command, its pid, the
    # batch job it belongs to.
    command: str | None = None
    pid: int | None = None
    job: str | None = None
    # Where it serves the project to workers (`dbguard serve`), and its server's CURVE key.
    serve: str | None = None
    serve_key: str | None = None
    path: str | None = None  # the project directory as the writer's host sees it

    def doing(self) -> str:
        """ "job 12345 (relion_refine) of ann on node7", or "ann on node7"."""
        return describe_writer(self.user, self.host, self.command, self.job)


def describe_writer(user: Any, host: Any, command: Any = None, job: Any = None) -> str:
    """Who writes, and what they run when they said: "job 12345 (relion_refine) of ann on node7"."""
    who = f"{user} on {host}"
    program = os.path.basename(str(command).split(" ", 1)[0]) if command else ""
    parts = (f"job {job}" if job else "", f"({program})" if program else "")
    running = " ".join(part for part in parts if part)
    return f"{running} of {who}" if running else who


def _writer(fields: dict[str, Any]) -> Writer:
    # By name, so that a lease service that reports more (a newer dbguard) is still understood.
    return Writer(
        host=str(fields["host"]),
        user=str(fields["user"]),
        since=float(fields["since"]),
        token=int(fields["token"]),
        ttl_left=float(fields.get("ttl_left", 0.0)),
        unflushed=int(fields.get("unflushed", 0)),
        dirty=bool(fields.get("dirty", False)),
        takeover_by=fields.get("takeover_by"),
        command=fields.get("command"),
        pid=fields.get("pid"),
        job=fields.get("job"),
        serve=fields.get("serve"),
        serve_key=fields.get("serve_key"),
        path=fields.get("path"),
    )


@dataclass(frozen=True)
class Reader:
    host: str
    user: str


@dataclass(frozen=True)
class Waiter:
    host: str
    user: str
    takeover: bool  # waiting with a takeover request rather than in turn


@dataclass(frozen=True)
class ProjectStatus:
    """One project's lease as the lease service knows it."""

    project: str  # the project's id
    state: LeaseState
    known: bool  # False for a project the lease service has no record of (free, token 0)
    token: int  # the last token granted
    writer: Writer | None
    readers: tuple[Reader, ...]
    queue: tuple[Waiter, ...]
    grace_left: float  # seconds of the broker's restart grace period left
    free_in: float | None = None  # seconds of lock-delay left
    last_loss: dict[str, Any] | None = None  # how the last holder lost it: holder, token, reason, at
    path: Path | None = None  # the project directory, when asked about one
    # Where the project is deployed (`dbguard deploy`), from its record on the share.
    deployment: dict[str, Any] | None = None

    @classmethod
    def from_wire(cls, item: dict[str, Any], path: Path | None = None) -> ProjectStatus:
        try:
            state = LeaseState(item["state"])
        except ValueError:
            raise UsageError(
                f"the lease service reports project {item.get('project')} as {item['state']!r}, a state this "
                "dbguard does not know: the lease service runs a newer dbguard; upgrade dbguard on this host"
            ) from None
        writer = item.get("writer")
        return cls(
            project=str(item["project"]),
            state=state,
            known=bool(item.get("known", True)),
            token=int(item["token"]),
            writer=_writer(writer) if writer else None,
            readers=tuple(Reader(r["host"], r["user"]) for r in item.get("readers", [])),
            queue=tuple(Waiter(w["host"], w["user"], bool(w["takeover"])) for w in item.get("queue", [])),
            grace_left=float(item.get("grace_left", 0.0)),
            free_in=item.get("free_in"),
            last_loss=item.get("last_loss"),
            path=path,
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "project": self.project,
            "known": self.known,
            "state": str(self.state),
            "token": self.token,
            "writer": vars(self.writer).copy() if self.writer else None,
            "readers": [vars(r).copy() for r in self.readers],
            "queue": [vars(w).copy() for w in self.queue],
            "grace_left": self.grace_left,
        }
        if self.known:  # as the wire has it: a project never seen has no lock-delay and no past
            data["free_in"] = self.free_in
            data["last_loss"] = self.last_loss
        if self.path is not None:
            data["path"] = str(self.path)
            data["deployment"] = self.deployment
        return data


@dataclass(frozen=True)
class Status:
    """What `dbguard.status` found: the lease service's view of one project (or of all), and
    this host's agent's own leases and notices when it runs."""

    broker: str  # the lease service's address
    projects: tuple[ProjectStatus, ...]
    # This host's agent: {"holder", "leases", "notices"} as it reports them, None when not running.
    agent: dict[str, Any] | None
    # For a broker: whether it checks keys, and whether anyone on the network can reach it.
    authenticated: bool | None = None
    exposed: bool | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "broker": self.broker,
            "projects": [item.to_json() for item in self.projects],
            "agent": self.agent,
        }
        if self.authenticated is not None:
            data["authenticated"] = self.authenticated
            data["exposed"] = bool(self.exposed)
        return data
