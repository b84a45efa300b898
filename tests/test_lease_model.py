"""Property tests of the lease state machine (dbguard/lease/rules.py) against DESIGN.md's rules.

A model kept in this file predicts every decision from what the test itself did: who was granted
which token and when, the deadlines that follow from the TTL, and what each holder last reported
as unflushed. After every step the model is compared with what the table reports through
``status()``, and the invariants are checked on the model's own history: recorded hold intervals
of different holders never overlap, tokens only grow (across restarts too), nothing new is granted
during a restart's grace period, a dirty lapsed lease is orphaned and a clean one passes through
the lock-delay, queues are served first come first served, and grants are synced to disk.

The steps come from tests/lease_sequences.py, which tests/test_lease_rules_etcd.py shares: there
the same sequences drive the embedded broker and the etcd service side by side, so the etcd
re-implementation of these rules cannot drift from the table that this model checks.

Clock values are whole numbers held in floats, so the deadlines computed here and in the table
agree exactly whatever the offset between the test's global clock and the broker's monotonic one
(a rebooted broker machine starts its monotonic clock again).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dbguard.lease.rules import Decision, Holder, LeaseState, LeaseTable, RenewItem, Timing
from tests import lease_sequences as steps
from tests.lease_sequences import ANN, BOB, PROJECTS

WALL_EPOCH = 1_700_000_000.0

# ttl, lock_delay, grace. The third and fifth have a lock-delay longer than the grace period,
# which the settings allow (grace defaults to one TTL whatever the lock-delay).
TIMINGS = [
    Timing(ttl=10, lock_delay=3, grace=10),
    Timing(ttl=10, lock_delay=0, grace=25),
    Timing(ttl=8, lock_delay=20, grace=8),
    Timing(ttl=5, lock_delay=5, grace=12),
    Timing(ttl=6, lock_delay=15, grace=6),
]


def restart_table(timing: Timing, records: list[dict[str, Any]], now: float) -> LeaseTable:
    """A fresh table loaded the way the broker loads one (dbguard/lease/broker.py, Broker.__init__)."""
    table = LeaseTable(timing)
    table.load(copy.deepcopy(records), now)
    live = any(r["state"] in (LeaseState.HELD, LeaseState.LOCK_DELAY) for r in records)
    if not live:
        table.grace_until = now
    return table


# --------------------------------------------------------------------------- the model


@dataclass
class Owner:
    """The writer lease of a project as the model predicts it (times on the global clock)."""

    holder: Holder
    token: int
    start: float  # when this holder's continuous hold began
    deadline: float  # the lease lapses here unless renewed (the table's ``expires``)
    unflushed: int  # what the holder last reported
    dirty: bool = False  # what the holder last marked (only a mark changes it, never a heartbeat)
    # A lapsed state loaded from a durable record; the lapse happened before the restart.
    forced: LeaseState | None = None
    free_at: float = 0.0  # with forced LOCK_DELAY: when the table frees it
    expired_at: float = 0.0  # with a forced state: when the hold really ended
    owes_lock_delay: bool = True  # False for a lease a power loss brought back after its release
    noted: bool = False  # whether the table has applied the lapse (it does when touched)
    takeover_by: str | None = None

    @property
    def key(self) -> str:
        return self.holder.key

    @property
    def holds_data(self) -> bool:
        return self.dirty or self.unflushed > 0

    def state(self, t: float, timing: Timing) -> LeaseState:
        if self.forced is LeaseState.ORPHANED:
            return LeaseState.ORPHANED
        if self.forced is LeaseState.LOCK_DELAY:
            return LeaseState.LOCK_DELAY if t < self.free_at else LeaseState.FREE
        if t < self.deadline:
            return LeaseState.HELD
        if self.holds_data:
            return LeaseState.ORPHANED
        return LeaseState.LOCK_DELAY if t < self.deadline + timing.lock_delay else LeaseState.FREE

    def free_time(self, timing: Timing) -> float:
        return self.free_at if self.forced is not None else self.deadline + timing.lock_delay

    def hold_end(self) -> float:
        """When the hold ends if nobody renews, releases or breaks it."""
        return self.deadline if self.forced is None else self.expired_at


@dataclass
class Waiting:
    holder: Holder
    expires: float
    takeover: bool


@dataclass
class ProjectModel:
    last_token: int = 0
    owner: Owner | None = None
    queue: list[Waiting] = field(default_factory=list)
    readers: dict[str, float] = field(default_factory=dict)
    loss: tuple[str, int, str] | None = None  # holder key, token, reason
    intervals: list[tuple[str, float, float]] = field(default_factory=list)  # closed holds
    # The holder of the last hold that ended, and before when nobody else may be granted.
    ended_key: str | None = None
    free_after: float = float("-inf")


def _loss_tuple(loss: dict[str, Any] | None) -> tuple[str, int, str] | None:
    return None if loss is None else (loss["holder"], int(loss["token"]), loss["reason"])


class LeaseClockMachine(RuleBasedStateMachine):
    """Writers, heartbeats, clock steps and broker restarts against one LeaseTable.

    Few kinds of step, so that random sequences often reach the lapses, lock-delays and
    restarts in between; `LeaseTableMachine` adds the rest of the requests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timing = TIMINGS[0]
        self.t = 0.0  # the test's global clock; it never goes back
        self.offset = 0.0  # table's now = t - offset
        self.table = LeaseTable(self.timing)
        self.grace_until = float("-inf")  # global clock
        self.models = {p: ProjectModel() for p in PROJECTS}
        self.tokens: dict[tuple[str, str], int] = {}  # (project, holder key) -> last token granted
        # project -> newest durable record, as the broker's LMDB store keeps it; and the state
        # as of the last sync, what survives a power loss (the store commits without syncing).
        self.store: dict[str, dict[str, Any]] = {}
        self.synced: dict[str, dict[str, Any]] = {}
        self.expect_sync = False
        self.steps_since_restart = 0

    # ------------------------------------------------------------------ helpers

    @property
    def now(self) -> float:
        return self.t - self.offset

    @property
    def wall(self) -> float:
        return WALL_EPOCH + self.t

    def state_of(self, pm: ProjectModel) -> LeaseState:
        return LeaseState.FREE if pm.owner is None else pm.owner.state(self.t, self.timing)

    def touch(self, project: str) -> ProjectModel:
        """Apply what the clock decided since the last look, as the table does on every request."""
        pm = self.models[project]
        o = pm.owner
        if o is not None and o.forced is None and not o.noted and self.t >= o.deadline:
            o.noted = True
            o.takeover_by = None
            pm.loss = (o.key, o.token, "orphaned" if o.holds_data else "expired")
        if o is not None and o.state(self.t, self.timing) is LeaseState.FREE:
            # Only a clean lease lapses to free, and only after the lock-delay (invariant 4).
            assert not o.holds_data, "a lease with unflushed data lapsed to free instead of orphaned"
            self.close(pm, o.hold_end(), free_after=o.hold_end() + self.timing.lock_delay)
        pm.queue = [w for w in pm.queue if w.expires > self.t]
        pm.readers = {k: e for k, e in pm.readers.items() if e > self.t}
        return pm

    def close(self, pm: ProjectModel, end: float, *, free_after: float) -> None:
        o = pm.owner
        assert o is not None
        if not o.owes_lock_delay:
            free_after = end
        pm.intervals.append((o.key, o.start, end))
        pm.ended_key, pm.free_after = o.key, free_after
        pm.owner = None

    def enqueue(self, pm: ProjectModel, holder: Holder, *, front: bool) -> int:
        deadline = self.t + self.timing.ttl
        for i, w in enumerate(pm.queue):
            if w.holder.key == holder.key:
                w.expires, w.holder = deadline, holder
                if front:
                    w.takeover = True
                    pm.queue.insert(0, pm.queue.pop(i))
                    return 1
                return i + 1
        if front:
            pm.queue.insert(0, Waiting(holder, deadline, True))
            return 1
        pm.queue.append(Waiting(holder, deadline, False))
        return len(pm.queue)

    def dequeue(self, pm: ProjectModel, key: str) -> None:
        pm.queue = [w for w in pm.queue if w.holder.key != key]

    def pick_token(self, project: str, holder: Holder, choice: str) -> int:
        last = self.models[project].last_token
        return {
            "mine": self.tokens.get((project, holder.key), 0),
            "newest": last,
            "older": max(0, last - 1),  # tokens here count grants: mostly the one before the newest
            "zero": 0,
            "future": last + 1,
        }[choice]

    def resume(self, pm: ProjectModel, holder: Holder, unflushed: int, *, dirty: bool = False) -> None:
        """The lease resumes; an acquire's ``dirty`` sets its dirty mark, a heartbeat's bytes never
        clear it."""
        o = pm.owner
        assert o is not None
        if o.state(self.t, self.timing) is not LeaseState.HELD:
            pm.loss = None
            self.expect_sync = True  # the lease is live again: durable before the answer
        if (unflushed > 0 or dirty) and not o.holds_data:
            self.expect_sync = True  # becoming dirty decides orphaned vs free: durable too
        o.dirty = o.dirty or dirty
        o.forced = None
        o.noted = False
        o.holder = holder
        o.deadline = max(o.deadline, self.t + self.timing.ttl)
        o.unflushed = unflushed

    def new_grant(
        self,
        project: str,
        holder: Holder,
        decision: Decision,
        floor: int,
        unflushed: int,
        dirty: bool = False,
    ) -> None:
        """Check a grant of a fresh token against invariants 1 to 5, then record it."""
        pm = self.models[project]
        assert decision.kind == "granted", decision
        token = decision.fields["token"]
        assert token > pm.last_token, f"token {token} does not exceed the earlier {pm.last_token}"
        assert token > floor, f"token {token} does not exceed the floor {floor}"
        assert self.t >= self.grace_until, "a new writer was granted during the grace period"
        assert not self.table.in_grace(self.now)
        assert holder.key == pm.ended_key or self.t >= pm.free_after, (
            f"granted at {self.t} before the lock-delay of {pm.ended_key} ended ({pm.free_after})"
        )
        assert pm.owner is None
        for key, start, end in pm.intervals:
            assert end <= self.t, f"hold of {key} [{start}, {end}) overlaps the grant at {self.t}"
        assert not pm.queue or pm.queue[0].holder.key == holder.key, "granted past the queue's head"
        pm.last_token = token
        pm.owner = Owner(holder, token, self.t, self.t + self.timing.ttl, unflushed, dirty)
        self.dequeue(pm, holder.key)
        self.tokens[(project, holder.key)] = token
        self.expect_sync = True

    def persist(self) -> None:
        """Take the table's changes into the store, as the broker does after each batch."""
        records, must_sync = self.table.take_changes()
        if self.expect_sync:
            assert must_sync, "a grant, a resumed lease or new unflushed data was not synced"
        for record in records:
            project = record["project"]
            pm = self.models[project]
            previous = self.store.get(project)
            assert record["last_token"] == pm.last_token
            assert record["state"] == str(self.state_of(pm))
            writer = record["writer"]
            if pm.owner is None:
                assert writer is None
            else:
                assert writer is not None
                assert (Holder.from_json(writer["holder"]).key, writer["token"]) == (
                    pm.owner.key,
                    pm.owner.token,
                )
            assert previous is None or record["last_token"] >= previous["last_token"]
            granted = previous is None or record["last_token"] > previous["last_token"]
            revived = record["state"] == LeaseState.HELD and (
                previous is None or previous["state"] != LeaseState.HELD
            )
            was_dirty = (
                previous is not None
                and previous["writer"] is not None
                and previous["writer"]["token"] == (writer or {}).get("token")
                and (previous["writer"]["unflushed"] > 0 or previous["writer"]["dirty"])
            )
            dirtied = writer is not None and (writer["unflushed"] > 0 or writer["dirty"]) and not was_dirty
            if (granted and writer is not None) or revived or dirtied:
                assert must_sync, f"record {record} changed a grant but was not to be synced"
            self.store[project] = record
        if must_sync:
            self.synced = copy.deepcopy(self.store)
        self.expect_sync = False
        self.steps_since_restart += 1

    # -------------------------------------------------------------------- rules

    @initialize(timing=st.sampled_from(TIMINGS), start=st.sampled_from([0, 1000]))
    def setup(self, timing: Timing, start: int) -> None:
        self.timing = timing
        self.table = LeaseTable(timing)
        self.offset = -float(start)

    @steps.ACQUIRE_WRITE
    def acquire_write(
        self,
        holder: Holder,
        project: str,
        wait: bool,
        takeover: bool,
        floor_choice: str,
        unflushed: int,
        dirty: bool,
    ) -> None:
        floor = steps.pick_floor(floor_choice, self.models[project].last_token)
        decision = self.table.acquire(
            project,
            holder,
            self.now,
            self.wall,
            mode="write",
            wait=wait,
            takeover=takeover,
            floor=floor,
            unflushed=unflushed,
            dirty=dirty,
        )
        pm = self.touch(project)
        o = pm.owner
        if o is not None and o.key == holder.key:
            # A retry, a restarted agent or a returning orphan: the lease resumes, same token.
            assert decision.kind == "granted", decision
            assert decision.fields["token"] == o.token
            self.resume(pm, holder, unflushed, dirty=dirty)
        elif (
            o is None
            and self.t >= self.grace_until
            and (not pm.queue or pm.queue[0].holder.key == holder.key)
        ):
            self.new_grant(project, holder, decision, floor, unflushed, dirty)
        elif (
            takeover
            and o is not None
            and o.state(self.t, self.timing) is LeaseState.HELD
            and o.takeover_by in (None, holder.key)
        ):
            # Invariant 5: a takeover of a held lease puts its requester at the head.
            o.takeover_by = holder.key
            position = self.enqueue(pm, holder, front=True)
            assert position == 1
            assert decision.kind == "queued", decision
            assert decision.fields["position"] == 1
        elif wait or takeover:
            position = self.enqueue(pm, holder, front=False)
            assert decision.kind == "queued", decision
            assert decision.fields["position"] == position
        elif o is None and self.t < self.grace_until:
            assert decision.kind == "grace", decision
            assert decision.fields["retry_after"] == self.grace_until - self.t
        else:
            assert decision.kind == "held", decision
            assert decision.fields["state"] == str(self.state_of(pm))
            if o is not None:
                assert decision.fields["holder"]["token"] == o.token
                assert decision.fields["holder"]["host"] == o.holder.host
        self.persist()

    @steps.RENEW
    def renew(self, holder: Holder, items: list[tuple[str, str, int]]) -> None:
        requests = [
            RenewItem(p, self.pick_token(p, holder, choice), unflushed) for p, choice, unflushed in items
        ]
        results = self.table.renew(holder, requests, self.now, self.wall)
        assert [r["project"] for r in results] == [r.project for r in requests]
        for request, result in zip(requests, results, strict=True):
            pm = self.touch(request.project)
            o = pm.owner
            token = request.token
            if o is not None and o.key == holder.key and o.token == token:
                assert result["ok"], result
                assert result["takeover_by"] == (
                    o.takeover_by if o.state(self.t, self.timing) is LeaseState.HELD else None
                )
                self.resume(pm, holder, request.unflushed)
            elif holder.key in pm.readers and token == 0:
                assert result["ok"], result
                pm.readers[holder.key] = self.t + self.timing.ttl
            else:
                assert not result["ok"], result
                if pm.loss is not None and pm.loss[:2] == (holder.key, token):
                    reason = pm.loss[2]
                elif pm.last_token > token:
                    reason = "superseded"
                else:
                    reason = "released"
                assert result["reason"] == reason, (result, pm.loss)
                assert result["current_token"] == pm.last_token
        self.persist()

    @steps.MARK
    def mark(self, holder: Holder, project: str, choice: str, dirty: bool, unflushed: int) -> None:
        """The holder's agent marks its lease dirty before a write, or clean after a flush."""
        token = self.pick_token(project, holder, choice)
        decision = self.table.mark(project, holder, token, dirty, self.now, self.wall, unflushed=unflushed)
        pm = self.touch(project)
        o = pm.owner
        if o is not None and o.key == holder.key and o.token == token:
            assert decision.kind == "ok", decision
            self.resume(pm, holder, o.unflushed)
            if dirty and not o.holds_data:
                self.expect_sync = True  # the write waits for this answer: durable first
            o.dirty = dirty
            o.unflushed = max(o.unflushed, unflushed) if dirty else 0
            assert decision.fields["dirty"] == o.holds_data
        else:
            assert decision.kind == "lost", decision
        self.persist()

    @steps.STATUS
    def status(self, project: str) -> None:
        report = self.table.status(project, self.now, self.wall)
        if project in self.models:
            self.touch(project)
            self.check_status(project, report)
        else:
            assert report["state"] == "free"
            assert report["known"] is False
        self.persist()

    @rule(
        step=st.one_of(
            st.integers(0, 2),
            st.sampled_from(["ttl-1", "ttl", "ttl+1", "lock_delay", "grace", "grace+lock_delay+1", "long"]),
        )
    )
    def advance(self, step: int | str) -> None:
        if isinstance(step, str):
            ttl, lock_delay, grace = self.timing.ttl, self.timing.lock_delay, self.timing.grace
            step = int(
                {
                    "ttl-1": ttl - 1,
                    "ttl": ttl,
                    "ttl+1": ttl + 1,
                    "lock_delay": lock_delay,
                    "grace": grace,
                    "grace+lock_delay+1": grace + lock_delay + 1,
                    "long": 3 * (grace + lock_delay),
                }[step]
            )
        self.t += step

    @rule(which=st.integers(0, 5), nudge=st.sampled_from([-1, 0, 1]))
    def advance_to_deadline(self, which: int, nudge: int) -> None:
        """Move the clock to just before, at or just after a moment where something changes."""
        moments: set[float] = {self.grace_until}
        for pm in self.models.values():
            if pm.owner is not None:
                moments.update((pm.owner.deadline, pm.owner.free_time(self.timing)))
            moments.update(w.expires for w in pm.queue)
        ahead = sorted(m for m in moments if m + nudge > self.t)
        if ahead:
            self.t = ahead[which % len(ahead)] + nudge

    # Restarts are rare next to requests; back to back they would keep every project in grace.
    @precondition(lambda self: self.steps_since_restart >= 4)
    @rule(power_loss=st.booleans(), reboot=st.booleans())
    def restart(self, power_loss: bool, reboot: bool) -> None:
        """The broker stops and starts again on what its store holds.

        With a power loss, what was committed after the last sync is gone; with a reboot the
        monotonic clock starts again from a small value.
        """
        self.steps_since_restart = -1
        kept = copy.deepcopy(self.synced if power_loss else self.store)
        if reboot:
            self.offset = self.t - 5
        self.table = restart_table(self.timing, list(kept.values()), self.now)
        self.store = copy.deepcopy(kept)
        self.synced = copy.deepcopy(kept)
        live = any(r["state"] in (LeaseState.HELD, LeaseState.LOCK_DELAY) for r in kept.values())
        self.grace_until = self.t + self.timing.grace if live else self.t
        for project, pm in self.models.items():
            pm.queue, pm.readers = [], {}
            self.adopt(project, pm, kept.get(project), power_loss=power_loss)
        self.persist()

    def adopt(
        self, project: str, pm: ProjectModel, record: dict[str, Any] | None, *, power_loss: bool
    ) -> None:
        """Carry the model across a restart, checking the record against what the model knows."""
        o = pm.owner
        if record is None:
            # Every grant is durable, so a project without a record never had a writer.
            assert pm.last_token == 0 and o is None
            return
        # Grants are synced before they are answered: even a power loss keeps the newest token.
        assert record["last_token"] == pm.last_token, "a grant was lost by the restart"
        pm.loss = _loss_tuple(record["loss"])
        writer = record["writer"]
        if writer is None:
            assert o is None, "the restart lost a live lease"
            return
        holder = Holder.from_json(writer["holder"])
        assert writer["token"] == pm.last_token
        state = LeaseState(record["state"])
        start, expired_at, owes = self.t, self.t, False
        if o is not None:
            assert (o.key, o.token) == (holder.key, writer["token"])
            durable_dirty = writer["unflushed"] > 0 or writer["dirty"]
            if power_loss:
                assert durable_dirty or not o.holds_data, "new unflushed data was not synced"
            else:
                assert durable_dirty == o.holds_data
            start, expired_at, owes = o.start, min(o.hold_end(), self.t), o.owes_lock_delay
        else:
            # Only a power loss can bring back a lease that was released, broken or freed.
            assert power_loss, "the restart brought back a lease that had ended"
        pm.owner = Owner(
            holder,
            writer["token"],
            start,
            deadline=self.t + self.timing.grace,
            unflushed=writer["unflushed"],
            dirty=writer["dirty"],
            owes_lock_delay=owes,
        )
        if state is LeaseState.HELD:
            return
        assert state in (LeaseState.LOCK_DELAY, LeaseState.ORPHANED), record
        pm.owner.forced = state
        pm.owner.noted = True
        pm.owner.expired_at = expired_at
        pm.owner.free_at = self.t + max(self.timing.grace, self.timing.lock_delay)

    # --------------------------------------------------------------- invariants

    def check_status(self, project: str, report: dict[str, Any]) -> None:
        """The table's report agrees with the model (after the model's own touch)."""
        pm = self.models[project]
        o = pm.owner
        state = self.state_of(pm)
        assert report["state"] == str(state), (report, o)
        assert report["token"] == pm.last_token
        assert report["grace_left"] == max(0.0, self.grace_until - self.t)
        assert [(q["host"], q["user"]) for q in report["queue"]] == [
            (w.holder.host, w.holder.user) for w in pm.queue if w.expires > self.t
        ]
        if o is None:
            assert report["writer"] is None
            return
        writer = report["writer"]
        assert (writer["host"], writer["user"], writer["token"]) == (o.holder.host, o.holder.user, o.token)
        assert writer["unflushed"] == o.unflushed
        assert writer["dirty"] == o.holds_data
        if state is LeaseState.HELD:
            assert writer["ttl_left"] == o.deadline - self.t
            assert writer["takeover_by"] == o.takeover_by
        else:
            assert writer["ttl_left"] == 0.0
            assert writer["takeover_by"] is None
        if state is LeaseState.LOCK_DELAY:
            assert report["free_in"] == o.free_time(self.timing) - self.t
        loss = pm.loss
        if o.forced is None and not o.noted and self.t >= o.deadline:
            loss = (o.key, o.token, "orphaned" if o.holds_data else "expired")
        last = report["last_loss"]
        assert (None if last is None else (last["holder"], last["token"], last["reason"])) == loss

    @invariant()
    def table_agrees_with_the_model(self) -> None:
        # Look at a copy: observing must not change what the table does later.
        table = copy.deepcopy(self.table)
        for project in PROJECTS:
            report = table.status(project, self.now, self.wall)
            pm = self.models[project]
            if not report["known"]:
                assert report["state"] == "free" and pm.owner is None and pm.last_token == 0
                continue
            saved = copy.deepcopy(pm)
            try:
                self.touch(project)
                self.check_status(project, report)
            finally:
                self.models[project] = saved

    @invariant()
    def hold_intervals_never_overlap(self) -> None:
        for pm in self.models.values():
            holds = list(pm.intervals)
            if pm.owner is not None:
                holds.append((pm.owner.key, pm.owner.start, float("inf")))
            for i, (key_a, start_a, end_a) in enumerate(holds):
                assert start_a <= end_a
                for key_b, start_b, end_b in holds[i + 1 :]:
                    if key_a != key_b:
                        assert end_a <= start_b or end_b <= start_a, (
                            f"{key_a} [{start_a}, {end_a}) overlaps {key_b} [{start_b}, {end_b})"
                        )


class LeaseTableMachine(LeaseClockMachine):
    """Every kind of request: readers, releases, queues, takeovers and operator breaks too."""

    @steps.ACQUIRE_READ
    def acquire_read(self, holder: Holder, project: str) -> None:
        decision = self.table.acquire(project, holder, self.now, self.wall, mode="read")
        assert decision.kind == "granted"
        assert decision.fields["mode"] == "read"
        pm = self.touch(project)
        pm.readers[holder.key] = self.t + self.timing.ttl
        self.persist()

    @steps.RELEASE
    def release(self, holder: Holder, project: str, choice: str | None, mode: str) -> None:
        token = None if choice is None else self.pick_token(project, holder, choice)
        decision = self.table.release(project, holder, token, self.now, self.wall, mode=mode)
        assert decision.kind == "released"
        pm = self.touch(project)
        o = pm.owner
        if mode == "read":
            pm.readers.pop(holder.key, None)
        elif o is None or o.key != holder.key or (token is not None and token != o.token):
            assert decision.fields == {"held": False}
            self.dequeue(pm, holder.key)
        else:
            assert decision.fields == {"held": True, "token": o.token}
            self.close(pm, min(self.t, o.hold_end()), free_after=self.t)
        self.persist()

    @steps.LEAVE_QUEUE
    def leave_queue(self, holder: Holder, project: str) -> None:
        decision = self.table.leave_queue(project, holder, self.now, self.wall)
        assert decision.kind == "ok"
        pm = self.touch(project)
        self.dequeue(pm, holder.key)
        if pm.owner is not None and pm.owner.takeover_by == holder.key:
            pm.owner.takeover_by = None
        self.persist()

    @steps.BREAK
    def break_lease(self, project: str) -> None:
        decision = self.table.break_lease(project, self.now, self.wall)
        assert decision.kind == "ok"
        pm = self.touch(project)
        o = pm.owner
        if o is None:
            assert decision.fields == {"broken": None}
        else:
            assert decision.fields["broken"] == {
                "host": o.holder.host,
                "user": o.holder.user,
                "token": o.token,
                "state": str(o.state(self.t, self.timing)),
                "unflushed": o.unflushed,
                "dirty": o.holds_data,
            }
            pm.loss = (o.key, o.token, "broken")
            self.close(pm, min(self.t, o.hold_end()), free_after=self.t)
        self.persist()


LeaseClockMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestLeaseClockMachine = LeaseClockMachine.TestCase
LeaseTableMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestLeaseTableMachine = LeaseTableMachine.TestCase


# ------------------------------------------------------------------ named behaviours

TIMING = Timing(ttl=10, lock_delay=2, grace=10)


def test_renew_with_a_stale_token_is_refused_with_reason_superseded() -> None:
    table = LeaseTable(TIMING)
    first = table.acquire("p", ANN, 0, WALL_EPOCH)
    table.release("p", ANN, first.fields["token"], 1, WALL_EPOCH + 1)
    second = table.acquire("p", BOB, 2, WALL_EPOCH + 2)
    assert second.fields["token"] > first.fields["token"]

    # ann's delayed heartbeat still carries her old token
    [result] = table.renew(ANN, [RenewItem("p", first.fields["token"], 0)], 3, 0)

    assert result["ok"] is False
    assert result["reason"] == "superseded"
    assert result["current_token"] == second.fields["token"]


def test_release_of_a_lease_one_no_longer_holds_is_not_an_error() -> None:
    table = LeaseTable(TIMING)
    token = table.acquire("p", ANN, 0, WALL_EPOCH).fields["token"]
    table.break_lease("p", 1, WALL_EPOCH + 1)

    after_break = table.release("p", ANN, token, 2, WALL_EPOCH + 2)
    retried = table.release("p", ANN, token, 3, WALL_EPOCH + 3)
    never_held = table.release("other", BOB, None, 4, WALL_EPOCH + 4)

    assert after_break == retried == never_held == Decision("released", {"held": False})


def test_restart_opens_grace_only_when_a_lease_was_live() -> None:
    def durable_after(steps: list[str]) -> list[dict[str, Any]]:
        table = LeaseTable(TIMING)
        token = table.acquire("p", ANN, 0, WALL_EPOCH, unflushed=3).fields["token"]
        for step in steps:
            if step == "release":
                table.release("p", ANN, token, 1, WALL_EPOCH + 1)
            elif step == "orphan":  # no heartbeat with unflushed data: orphaned, not free
                assert table.status("p", 20, WALL_EPOCH + 20)["state"] == "orphaned"
        records, must_sync = table.take_changes()
        assert must_sync
        return records

    held = restart_table(TIMING, durable_after([]), 100)
    assert held.in_grace(100)
    assert held.acquire("p", BOB, 100, WALL_EPOCH + 100).kind == "held"
    assert held.acquire("q", BOB, 100, WALL_EPOCH + 100).kind == "grace"
    [renewed] = held.renew(ANN, [RenewItem("p", 1, 0)], 101, WALL_EPOCH + 101)
    assert renewed["ok"] is True

    released = restart_table(TIMING, durable_after(["release"]), 100)
    assert not released.in_grace(100)
    granted = released.acquire("p", BOB, 100, WALL_EPOCH + 100)
    assert granted.kind == "granted" and granted.fields["token"] == 2

    orphaned = restart_table(TIMING, durable_after(["orphan"]), 100)
    assert not orphaned.in_grace(100)
    refused = orphaned.acquire("p", BOB, 100, WALL_EPOCH + 100)
    assert refused.kind == "held" and refused.fields["state"] == "orphaned"


def test_a_cleanly_expired_lease_keeps_its_lock_delay_across_a_restart() -> None:
    # A lock-delay longer than the grace period, which the settings allow.
    timing = Timing(ttl=8, lock_delay=20, grace=8)
    table = LeaseTable(timing)
    table.acquire("p", ANN, 0, WALL_EPOCH)  # expires at 8: nobody else may have it before 28
    assert table.status("p", 8, WALL_EPOCH + 8)["state"] == "lock-delay"
    records, _ = table.take_changes()

    restarted = restart_table(timing, records, 9)

    # The grace period ends at 17; the lock-delay still holds after it.
    for now in (17, 27):
        refused = restarted.acquire("p", BOB, now, WALL_EPOCH + now)
        assert refused.kind == "held" and refused.fields["state"] == "lock-delay"
    assert restarted.acquire("p", BOB, 29, WALL_EPOCH + 29).kind == "granted"
