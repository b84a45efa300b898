"""The lease state machine of one site: who may write which project, and who waits.

Pure logic with no I/O and no clock of its own: every operation takes ``now`` (the broker's
monotonic clock) and ``wall`` (wall-clock seconds, only for what a person reads). The broker
feeds it requests and persists what it reports as changed; property tests drive it directly
with random operations and clock steps.

Time is evaluated lazily: a project's expiries are applied when the project is next touched,
computed from the recorded deadlines rather than from the moment of observation, so the result
does not depend on how often anyone looks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from dbguard.lease import history, protocol


class LeaseState(StrEnum):
    """What the broker knows about a project's writer lease (a state, not a boolean)."""

    FREE = "free"
    HELD = "held"
    # Expired with nothing unflushed: free once the lock-delay has passed, so that a holder
    # whose clock or network hiccuped cannot race a new writer at the very instant of expiry.
    LOCK_DELAY = "lock-delay"
    # Expired while holding unflushed data: blocked until the holder returns or an operator
    # breaks it, because granting it would strand that data behind a newer fencing token.
    ORPHANED = "orphaned"


@dataclass(frozen=True)
class Timing:
    """The lease timing settings, in seconds."""

    ttl: float
    lock_delay: float
    grace: float

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.lock_delay < 0:
            raise ValueError("ttl must be positive and lock_delay not negative")
        if self.grace < self.ttl:
            raise ValueError("the grace period must be at least one TTL")


@dataclass(frozen=True, slots=True)
class Holder:
    """A lease holder: one user's agent with one cache directory on one host.

    ``agent`` is new each time the agent starts; ownership goes by `key`, so a restarted agent
    reclaims what its predecessor held. The cache directory is part of the key because two
    agents of one user on one host with different caches (two DBGUARD_CACHE settings) would
    flush the same project independently: they must not share a lease.
    """

    host: str
    user: str
    agent: str
    cache: str
    # The client's CURVE public key (z85) as the broker authenticated it, when the site uses
    # keys; never taken from a message, so a lease cannot be renewed or released by another key.
    principal: str = ""

    @property
    def key(self) -> str:
        base = f"{self.user}@{self.host}:{self.cache}"
        return f"{base}#{self.principal}" if self.principal else base

    def to_json(self) -> dict[str, str]:
        data = {"host": self.host, "user": self.user, "agent": self.agent, "cache": self.cache}
        if self.principal:
            data["principal"] = self.principal
        return data

    def to_wire(self) -> dict[str, str]:
        """The holder as a request names it: the principal is never sent, only authenticated."""
        return {"host": self.host, "user": self.user, "agent": self.agent, "cache": self.cache}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Holder:
        fields = {name: str(value[name]) for name in ("host", "user", "agent", "cache")}
        return cls(**fields, principal=str(value.get("principal", "")))


@dataclass(frozen=True, slots=True)
class RenewItem:
    """One project of a heartbeat: the lease the holder believes it has, and its unflushed bytes
    (token 0 for a reader's place)."""

    project: str
    token: int
    unflushed: int

    def to_json(self) -> dict[str, Any]:
        return {"project": self.project, "token": self.token, "unflushed": self.unflushed}


@dataclass(slots=True)
class WriterLease:
    holder: Holder
    token: int
    since: float  # wall clock, for people
    expires: float  # monotonic deadline
    unflushed: int = 0  # bytes, as the last heartbeat or mark reported them
    # Set by the holder's agent before the first unflushed write after a clean state is
    # acknowledged, cleared only when a flush has emptied its cache. Heartbeats never clear it:
    # one computed before a write and answered after it would otherwise hide that write.
    dirty: bool = False
    takeover_by: str | None = None  # holder key of whoever asked for a takeover
    # What the writer runs, as its acquire said: {"command", "pid", "job"}, for people.
    work: dict[str, Any] | None = None
    # Where the holder serves the project to worker nodes: {"address", "key"}; None if it does not.
    serving: dict[str, Any] | None = None

    @property
    def holds_data(self) -> bool:
        """Whether the holder may hold acknowledged unflushed data: its expiry orphans."""
        return self.dirty or self.unflushed > 0


def work_fields(work: dict[str, Any] | None, serving: dict[str, Any] | None = None) -> dict[str, Any]:
    """A writer's work as status shows it: command, pid and job, None where not given; and
    where it serves the project to workers (serve, serve_key), None when it does not."""
    work, serving = work or {}, serving or {}
    return {
        "command": work.get("command"),
        "pid": work.get("pid"),
        "job": work.get("job"),
        "path": work.get("path"),
        "serve": serving.get("address"),
        "serve_key": serving.get("key"),
    }


@dataclass(slots=True)
class Waiter:
    holder: Holder
    expires: float  # dropped from the queue unless it polls again before this
    takeover: bool = False


@dataclass(slots=True)
class Loss:
    """The last time a holder lost this project's lease, so its agent can be told why."""

    holder: str
    token: int
    reason: str  # "expired", "orphaned", "broken", "taken over"
    at: float  # wall clock
    unflushed: int = 0


# slots: a broker keeps one of these (and a writer lease) per project of its site, 100,000 in
# tools/bench_scale.py; without a __dict__ each takes about a third less memory.
@dataclass(slots=True)
class ProjectLeases:
    project: str
    last_token: int = 0
    state: LeaseState = LeaseState.FREE
    # The holder while HELD; the former holder while LOCK_DELAY or ORPHANED.
    writer: WriterLease | None = None
    free_at: float = 0.0  # monotonic, while LOCK_DELAY
    readers: dict[str, tuple[Holder, float]] = field(default_factory=dict)
    queue: list[Waiter] = field(default_factory=list)
    loss: Loss | None = None

    def durable(self) -> dict[str, Any]:
        """What survives a broker restart; deadlines, readers and the queue are rebuilt."""
        writer = None
        if self.writer is not None:
            writer = {
                "holder": self.writer.holder.to_json(),
                "token": self.writer.token,
                "since": self.writer.since,
                "unflushed": self.writer.unflushed,
                "dirty": self.writer.dirty,
                "work": self.writer.work,
                "serving": self.writer.serving,
            }
        loss = None
        if self.loss is not None:
            loss = asdict(self.loss)
        return {
            "project": self.project,
            "last_token": self.last_token,
            "state": str(self.state),
            "writer": writer,
            "loss": loss,
        }


def worth_keeping(record: dict[str, Any]) -> bool:
    """Whether a durable record says anything: a project that was granted at least once (its
    last token is a fencing floor), or one with a writer or a loss to report. Anything else came
    from requests for projects never granted, and is neither stored nor loaded."""
    return bool(record.get("last_token")) or bool(record.get("writer")) or bool(record.get("loss"))


@dataclass(frozen=True)
class Decision:
    """The outcome of one request, for the broker to turn into a reply.

    ``kind`` is one of: granted, queued, held, grace, lost, released, ok.
    """

    kind: str
    fields: dict[str, Any]


class LeaseTable:
    """Every project's leases at one site, with the rules of docs/design.md."""

    def __init__(self, timing: Timing) -> None:
        self.timing = timing
        self.projects: dict[str, ProjectLeases] = {}
        self.grace_until = 0.0
        # Projects whose durable record changed, and whether a grant is among the changes
        # (a grant must be on disk before it is answered; other changes may ride along later).
        self.changed: set[str] = set()
        self.must_sync = False
        # History events since the last `take_events`, oldest first (dbguard.lease.history).
        self.events: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- restart

    def load(self, records: list[dict[str, Any]], now: float) -> None:
        """Rebuild from durable records after a restart and open the grace period.

        Deadlines died with the old process, so every holder gets the whole grace period to
        renew; until it ends nobody else is granted a writer lease (docs/design.md, "The lease rules").
        """
        self.grace_until = now + self.timing.grace
        for record in records:
            if not worth_keeping(record):
                continue
            entry = ProjectLeases(project=record["project"], last_token=int(record["last_token"]))
            entry.state = LeaseState(record["state"])
            if record.get("writer"):
                w = record["writer"]
                entry.writer = WriterLease(
                    holder=Holder.from_json(w["holder"]),
                    token=int(w["token"]),
                    since=float(w["since"]),
                    expires=self.grace_until,
                    unflushed=int(w.get("unflushed", 0)),
                    dirty=bool(w.get("dirty", False)),
                    work=w.get("work"),
                    serving=w.get("serving"),
                )
            if entry.state is LeaseState.LOCK_DELAY:
                # The lease expired before the restart, at a time the record does not keep; the
                # lock-delay counted from now still ends after the one the old process owed.
                entry.free_at = max(self.grace_until, now + self.timing.lock_delay)
            if record.get("loss"):
                entry.loss = Loss(**record["loss"])
            self.projects[entry.project] = entry

    def in_grace(self, now: float) -> bool:
        return now < self.grace_until

    # --------------------------------------------------------------- requests

    def acquire(
        self,
        project: str,
        holder: Holder,
        now: float,
        wall: float,
        *,
        mode: str = "write",
        wait: bool = False,
        takeover: bool = False,
        floor: int = 0,
        unflushed: int = 0,
        dirty: bool = False,
        work: dict[str, Any] | None = None,
    ) -> Decision:
        """``work``: what the writer runs ({"command", "pid", "job"}), kept for status; an
        acquire that resumes a lease with ``work`` replaces it.

        ``dirty``: the holder's cache is announced dirty (see `mark`), so the lease is dirty
        from the grant on, whatever heartbeats report, until the holder marks it clean. A
        heartbeat of an empty but announced cache reports 0 bytes, and the next write then
        goes through the announced cache without asking: the lease must already be dirty."""
        entry = self._touch(project, now, wall)
        if mode == "read":
            entry.readers[holder.key] = (holder, now + self.timing.ttl)
            return Decision("granted", {"mode": "read", "ttl": self.timing.ttl})
        writer = entry.writer
        mine = writer is not None and writer.holder.key == holder.key
        if mine and entry.state in (LeaseState.HELD, LeaseState.ORPHANED, LeaseState.LOCK_DELAY):
            # The same user and host asking again: a retry, a restarted agent reclaiming its
            # lease, or the holder of an orphaned lease coming back. Nobody else was granted in
            # between, so the old token is still the newest and the lease simply resumes.
            assert writer is not None
            if work is not None and writer.work != work:
                writer.work = work
                self._mark(entry)
            return self._resume(entry, writer, holder, now, wall, unflushed, dirty=dirty)
        if entry.state is LeaseState.FREE and not self.in_grace(now) and self._may_take(entry, holder):
            return self._grant(entry, holder, now, wall, floor, unflushed, dirty, work)
        if (
            takeover
            and entry.state is LeaseState.HELD
            and writer is not None
            and writer.takeover_by in (None, holder.key)
        ):
            if writer.takeover_by is None:
                self._log(entry, "takeover-asked", wall, writer, by=f"{holder.user}@{holder.host}")
            writer.takeover_by = holder.key
            self._enqueue(entry, holder, now, front=True)
            return self._queued(entry, holder, now)
        if wait or takeover:
            self._enqueue(entry, holder, now)
            return self._queued(entry, holder, now)
        if entry.state is LeaseState.FREE and self.in_grace(now):
            self._forget_if_empty(entry)
            return Decision("grace", {"retry_after": self.grace_until - now})
        return Decision("held", self._refusal(entry, now))

    def renew(
        self, holder: Holder, items: Sequence[RenewItem], now: float, wall: float
    ) -> list[dict[str, Any]]:
        """Heartbeat for several projects at once; one result per item, in order."""
        results = []
        for item in items:
            project, token, unflushed = item.project, item.token, item.unflushed
            entry = self._touch(project, now, wall, create=False)
            if entry is None:  # never granted here: nothing to renew, nothing to remember
                results.append({"project": project, "ok": False, **self._loss_for(None, holder, token)})
                continue
            writer = entry.writer
            if (
                writer is not None
                and writer.holder.key == holder.key
                and writer.token == token
                and entry.state is not LeaseState.FREE
            ):
                self._resume(entry, writer, holder, now, wall, unflushed)
                results.append(
                    {
                        "project": project,
                        "ok": True,
                        "ttl": self.timing.ttl,
                        "takeover_by": writer.takeover_by,
                    }
                )
                continue
            if holder.key in entry.readers and token == 0:
                entry.readers[holder.key] = (holder, now + self.timing.ttl)
                results.append({"project": project, "ok": True, "ttl": self.timing.ttl, "takeover_by": None})
                continue
            results.append({"project": project, "ok": False, **self._loss_for(entry, holder, token)})
            self._forget_if_empty(entry)
        return results

    def release(
        self, project: str, holder: Holder, token: int | None, now: float, wall: float, *, mode: str = "write"
    ) -> Decision:
        """Give up a lease. Releasing what one no longer holds is not an error: a retry after a
        lost reply, or a release after the lease was broken, must not fail the caller."""
        entry = self._touch(project, now, wall, create=False)
        if entry is None:  # never granted here: nothing to release, nothing to remember
            return Decision("released", {} if mode == "read" else {"held": False})
        if mode == "read":
            entry.readers.pop(holder.key, None)
            self._forget_if_empty(entry)
            return Decision("released", {})
        writer = entry.writer
        if writer is None or writer.holder.key != holder.key or (token is not None and writer.token != token):
            self._dequeue(entry, holder.key)
            self._forget_if_empty(entry)
            return Decision("released", {"held": False})
        entry.writer = None
        entry.state = LeaseState.FREE
        self._mark(entry)
        self._log(entry, "released", wall, writer)
        return Decision("released", {"held": True, "token": writer.token})

    def leave_queue(self, project: str, holder: Holder, now: float, wall: float) -> Decision:
        entry = self._touch(project, now, wall, create=False)
        if entry is None:
            return Decision("ok", {})
        self._dequeue(entry, holder.key)
        if entry.writer is not None and entry.writer.takeover_by == holder.key:
            entry.writer.takeover_by = None
        self._forget_if_empty(entry)
        return Decision("ok", {})

    def break_lease(self, project: str, now: float, wall: float, *, by: str | None = None) -> Decision:
        """An operator frees the project whatever its state; reports what may be stranded."""
        entry = self._touch(project, now, wall, create=False)
        writer = entry.writer if entry is not None else None
        if entry is None or writer is None or entry.state is LeaseState.FREE:
            return Decision("ok", {"broken": None})
        stranded = {
            "host": writer.holder.host,
            "user": writer.holder.user,
            "token": writer.token,
            "state": str(entry.state),
            "unflushed": writer.unflushed,
            "dirty": writer.holds_data,
        }
        entry.loss = Loss(writer.holder.key, writer.token, "broken", wall, writer.unflushed)
        entry.writer = None
        entry.state = LeaseState.FREE
        self._mark(entry)
        self._log(entry, "broken", wall, writer, by=by, unflushed=writer.unflushed or None)
        return Decision("ok", {"broken": stranded})

    def status(self, project: str, now: float, wall: float) -> dict[str, Any]:
        entry = self._touch(project, now, wall, create=False)
        if entry is None or self._forget_if_empty(entry):
            return protocol.unknown_project_status(project, self._grace_left(now))
        writer = None
        if entry.writer is not None:
            w = entry.writer
            writer = {
                "host": w.holder.host,
                "user": w.holder.user,
                "since": w.since,
                "token": w.token,
                "ttl_left": max(0.0, w.expires - now) if entry.state is LeaseState.HELD else 0.0,
                "unflushed": w.unflushed,
                "dirty": w.holds_data,
                "takeover_by": w.takeover_by,
                **work_fields(w.work, w.serving),
            }
        return protocol.project_status(
            project,
            state=str(entry.state),
            token=entry.last_token,
            writer=writer,
            free_in=max(0.0, entry.free_at - now) if entry.state is LeaseState.LOCK_DELAY else None,
            readers=[{"host": h.host, "user": h.user} for h, _ in entry.readers.values()],
            queue=[
                {"host": w.holder.host, "user": w.holder.user, "takeover": w.takeover} for w in entry.queue
            ],
            last_loss=asdict(entry.loss) if entry.loss else None,
            grace_left=self._grace_left(now),
        )

    def status_all(self, now: float, wall: float) -> list[dict[str, Any]]:
        """The status of every project the table knows, after forgetting those that ended
        with nothing to know (a read lease or a queue place that lapsed)."""
        for entry in list(self.projects.values()):
            self._advance(entry, now, wall)
            self._forget_if_empty(entry)
        return [self.status(project, now, wall) for project in self.known_projects()]

    def known_projects(self) -> list[str]:
        return sorted(self.projects)

    # ---------------------------------------------------------------- helpers

    def _touch(self, project: str, now: float, wall: float, *, create: bool = True) -> Any:
        entry = self.projects.get(project)
        if entry is None:
            if not create:
                return None
            entry = self.projects[project] = ProjectLeases(project)
        self._advance(entry, now, wall)
        return entry

    def _forget_if_empty(self, entry: ProjectLeases) -> bool:
        """Drop a project that holds nothing worth keeping: never granted (no token, so no
        fencing floor to protect), no writer, loss, reader or queue place. Requests that name
        projects nobody was granted then leave nothing behind, in memory or on disk."""
        if entry.last_token or entry.writer is not None or entry.loss is not None:
            return False
        if entry.state is not LeaseState.FREE or entry.readers or entry.queue:
            return False
        if self.projects.get(entry.project) is entry:
            del self.projects[entry.project]
        self.changed.discard(entry.project)
        return True

    def _advance(self, entry: ProjectLeases, now: float, wall: float) -> None:
        """Apply every expiry due by ``now``, each at the time it fell due."""
        writer = entry.writer
        if entry.state is LeaseState.HELD and writer is not None and writer.expires <= now:
            lapsed_wall = wall - (now - writer.expires)
            if writer.holds_data:
                entry.state = LeaseState.ORPHANED
                entry.loss = Loss(writer.holder.key, writer.token, "orphaned", lapsed_wall, writer.unflushed)
                self._log(entry, "orphaned", lapsed_wall, writer, unflushed=writer.unflushed or None)
            else:
                entry.state = LeaseState.LOCK_DELAY
                entry.free_at = writer.expires + self.timing.lock_delay
                entry.loss = Loss(writer.holder.key, writer.token, "expired", lapsed_wall, 0)
                self._log(entry, "expired", lapsed_wall, writer)
            writer.takeover_by = None
            self._mark(entry)
        if entry.state is LeaseState.LOCK_DELAY and entry.free_at <= now:
            entry.state = LeaseState.FREE
            if entry.writer is not None:
                self._log(entry, "lock-delay-ended", wall - (now - entry.free_at), entry.writer)
            entry.writer = None
            self._mark(entry)
        if entry.readers:
            entry.readers = {k: v for k, v in entry.readers.items() if v[1] > now}
        if entry.queue:
            entry.queue = [w for w in entry.queue if w.expires > now]

    def _may_take(self, entry: ProjectLeases, holder: Holder) -> bool:
        """First come, first served: a free project goes to the head of its queue."""
        return not entry.queue or entry.queue[0].holder.key == holder.key

    def _grant(
        self,
        entry: ProjectLeases,
        holder: Holder,
        now: float,
        wall: float,
        floor: int,
        unflushed: int,
        dirty: bool,
        work: dict[str, Any] | None = None,
    ) -> Decision:
        # The token is strictly greater than every earlier one, and than the floor the client
        # read from the project directory, so a lost broker state cannot reissue old tokens.
        token = max(entry.last_token, floor) + 1
        entry.last_token = token
        entry.writer = WriterLease(holder, token, wall, now + self.timing.ttl, unflushed, dirty, work=work)
        entry.state = LeaseState.HELD
        took_over = any(w.takeover and w.holder.key == holder.key for w in entry.queue)
        self._dequeue(entry, holder.key)
        self._mark(entry, sync=True)
        self._log(entry, "granted", wall, entry.writer, takeover=took_over or None)
        return Decision("granted", self._lease_fields(entry, entry.writer, now))

    def _resume(
        self,
        entry: ProjectLeases,
        writer: WriterLease,
        holder: Holder,
        now: float,
        wall: float,
        unflushed: int,
        *,
        dirty: bool = False,
    ) -> Decision:
        was_dirty = writer.holds_data
        writer.dirty = writer.dirty or dirty
        if entry.state is not LeaseState.HELD:
            self._log(entry, "resumed", wall, writer)
            entry.state = LeaseState.HELD
            entry.loss = None
            self._mark(entry, sync=True)
        writer.holder = holder
        writer.expires = max(writer.expires, now + self.timing.ttl)
        writer.unflushed = unflushed
        if writer.holds_data != was_dirty:
            # Whether an expired lease orphans or frees depends on this, so it must survive a
            # restart; becoming dirty is synced before the heartbeat is answered.
            self._mark(entry, sync=writer.holds_data)
        return Decision("granted", self._lease_fields(entry, writer, now))

    def mark(
        self,
        project: str,
        holder: Holder,
        token: int,
        dirty: bool,
        now: float,
        wall: float,
        *,
        unflushed: int | None = None,
    ) -> Decision:
        """The holder says it now holds acknowledged unflushed data, or that it no longer does.

        Becoming dirty is synced before it is answered, as a grant is: the holder's write waits
        for this answer, and a crash of the broker right after must not forget it.
        """
        entry = self._touch(project, now, wall, create=False)
        writer = entry.writer if entry is not None else None
        if (
            entry is None
            or writer is None
            or writer.holder.key != holder.key
            or writer.token != token
            or entry.state is LeaseState.FREE
        ):
            return Decision("lost", self._loss_for(entry, holder, token))
        # A mark is a sign of life too: like a heartbeat, it resumes a lease that lapsed while
        # nobody else was granted.
        self._resume(entry, writer, holder, now, wall, writer.unflushed)
        was_dirty = writer.holds_data
        writer.dirty = dirty
        if not dirty:
            writer.unflushed = 0
        elif unflushed is not None:
            writer.unflushed = max(writer.unflushed, unflushed)
        if writer.holds_data != was_dirty:
            self._mark(entry, sync=writer.holds_data)
        return Decision("ok", {"dirty": writer.holds_data, "ttl": self.timing.ttl})

    def serve(
        self,
        project: str,
        holder: Holder,
        token: int,
        address: str | None,
        key: str | None,
        now: float,
        wall: float,
    ) -> Decision:
        """The holder says where it serves the project to workers (None: it stopped). Kept with
        the writer lease, so it ends with it; synced with the next commit, not at once: a lost
        address costs workers a retry, never data."""
        entry = self._touch(project, now, wall, create=False)
        writer = entry.writer if entry is not None else None
        if (
            entry is None
            or writer is None
            or writer.holder.key != holder.key
            or writer.token != token
            or entry.state is LeaseState.FREE
        ):
            return Decision("lost", self._loss_for(entry, holder, token))
        self._resume(entry, writer, holder, now, wall, writer.unflushed)
        serving = {"address": address, "key": key} if address else None
        if writer.serving != serving:
            writer.serving = serving
            self._mark(entry)
        return Decision("ok", {"serve": address, "serve_key": key if address else None})

    def report(
        self, project: str, holder: Holder, token: int, kind: str, now: float, wall: float, **fields: Any
    ) -> Decision:
        """A holder's agent reports what happened on its host (a flush, a fence refusal, a
        deployment): recorded as it is, whoever holds the lease now, since a fenced host is
        exactly the one that has something to report."""
        entry = self._touch(project, now, wall, create=False)
        work = entry.writer.work if entry is not None and entry.writer is not None else None
        if entry is not None and entry.writer is not None and entry.writer.token != token:
            work = None
        self.events.append(
            history.event(
                kind, project, wall, **history.holder_fields(holder.host, holder.user, token, work), **fields
            )
        )
        return Decision("ok", {})

    def _log(self, entry: ProjectLeases, kind: str, at: float, writer: WriterLease, **fields: Any) -> None:
        holder = writer.holder
        self.events.append(
            history.event(
                kind,
                entry.project,
                at,
                **history.holder_fields(holder.host, holder.user, writer.token, writer.work),
                **fields,
            )
        )

    def take_events(self) -> list[dict[str, Any]]:
        """The history events recorded since the last call, oldest first."""
        events, self.events = self.events, []
        return events

    def _lease_fields(self, entry: ProjectLeases, writer: WriterLease, now: float) -> dict[str, Any]:
        return {
            "mode": "write",
            "project": entry.project,
            "token": writer.token,
            "since": writer.since,
            "ttl": self.timing.ttl,
            "takeover_by": writer.takeover_by,
        }

    def _enqueue(self, entry: ProjectLeases, holder: Holder, now: float, *, front: bool = False) -> None:
        deadline = now + self.timing.ttl
        for waiter in entry.queue:
            if waiter.holder.key == holder.key:
                waiter.expires = deadline
                waiter.holder = holder
                if front:
                    # A takeover place, whether it moves to the head or is there already.
                    waiter.takeover = True
                    if entry.queue[0] is not waiter:
                        entry.queue.remove(waiter)
                        entry.queue.insert(0, waiter)
                return
        waiter = Waiter(holder, deadline, takeover=front)
        if front:
            entry.queue.insert(0, waiter)
        else:
            entry.queue.append(waiter)

    def _dequeue(self, entry: ProjectLeases, key: str) -> None:
        entry.queue = [w for w in entry.queue if w.holder.key != key]

    def _queued(self, entry: ProjectLeases, holder: Holder, now: float) -> Decision:
        position = next(i for i, w in enumerate(entry.queue) if w.holder.key == holder.key)
        return Decision("queued", {"position": position + 1, **self._refusal(entry, now)})

    def _refusal(self, entry: ProjectLeases, now: float) -> dict[str, Any]:
        fields: dict[str, Any] = {"state": str(entry.state), "holder": None, "retry_after": None}
        writer = entry.writer
        if writer is not None:
            fields["holder"] = {
                "host": writer.holder.host,
                "user": writer.holder.user,
                "since": writer.since,
                "token": writer.token,
                "unflushed": writer.unflushed,
                "dirty": writer.holds_data,
                **work_fields(writer.work, writer.serving),
            }
        if entry.state is LeaseState.LOCK_DELAY:
            fields["retry_after"] = max(0.0, entry.free_at - now)
        elif entry.state is LeaseState.FREE and entry.queue:
            fields["queue_length"] = len(entry.queue)
        return fields

    def _loss_for(self, entry: ProjectLeases | None, holder: Holder, token: int) -> dict[str, Any]:
        if entry is None:  # a project never granted here
            return {"reason": "released", "at": None, "current_token": 0}
        loss = entry.loss
        if loss is not None and loss.holder == holder.key and loss.token == token:
            return {"reason": loss.reason, "at": loss.at, "current_token": entry.last_token}
        if entry.last_token > token:
            return {"reason": "superseded", "at": None, "current_token": entry.last_token}
        return {"reason": "released", "at": None, "current_token": entry.last_token}

    def _grace_left(self, now: float) -> float:
        return max(0.0, self.grace_until - now)

    def _mark(self, entry: ProjectLeases, *, sync: bool = False) -> None:
        self.changed.add(entry.project)
        self.must_sync = self.must_sync or sync

    def take_changes(self) -> tuple[list[dict[str, Any]], bool]:
        """The durable records changed since the last call, and whether they must be synced."""
        records = [self.projects[p].durable() for p in sorted(self.changed)]
        must_sync = self.must_sync
        self.changed.clear()
        self.must_sync = False
        return records, must_sync
