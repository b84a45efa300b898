"""One rule book, checked twice (issue 13): the embedded broker and the etcd service answer the
same generated request sequences alike.

The lease rules exist twice: `dbguard.lease.rules.LeaseTable` behind the embedded broker, and
`dbguard.lease.etcd.EtcdLeases`, which re-implements them as etcd transactions. The steps of
tests/lease_sequences.py, the ones tests/test_lease_model.py checks the table with, go here as
wire requests to both: to a `Broker` in this process with a fresh LMDB state, through a `Client`
as any host asks it, and to `EtcdLeases.call` on the real three-member etcd cluster of the
``etcd_cluster`` fixture, under a key prefix of each example's own. Every reply, and after every
step the status of every project, must be the same from both, up to what legitimately differs:

- tokens: the broker counts grants while etcd's tokens are revisions of its key space, so a
  token is compared by its rank among the tokens that service granted for the project; each
  service's own tokens must strictly increase and exceed the floor it was sent;
- times: ``since`` and ``at`` (wall clock) and the durations ``ttl_left``, ``retry_after`` and
  ``free_in`` are compared by whether they are given (and positive), not by value;
- error messages (the error kind is compared), and the order in which readers are listed.

Time. The broker takes its clock from the `time` module that dbguard.lease.broker imports, which
this test replaces with a clock that moves only when a step says so. etcd counts real seconds,
so both services get a TTL (60 s) and a lock-delay (30 s) far longer than an example lasts, and
time passes in one kind of step only, `expire_all`: every holder, reader and waiter stops
renewing for longer than a TTL. The broker's clock moves one TTL and a second on, past every
deadline (no deadline is more than a TTL ahead of the clock); in etcd every etcd lease that a
key under the example's prefix is bound to is revoked, which is what etcd itself does to a lease
whose TTL has run out: its keys go with it (writer sessions, readers, queue places). Optionally
the lock-delays that the expiry starts then run out too: the clock moves one lock-delay on and
etcd's lock-delay leases are revoked. As the clock never moves between requests otherwise,
every lease granted or renewed in between lapses at the next expiry, in both services.

etcd starts a lock-delay when it first sees the expired lease (whoever looks first), the table
counts it from the expiry; the status comparison right after the expiry looks at once, so both
lock-delays run from the same step. What depends on when within a TTL something happened (a
heartbeat that extends one lease and not another, a restart's grace period, which etcd does not
have) is left to tests/test_lease_model.py and the end-to-end tests.
"""

from __future__ import annotations

import base64
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from dbguard.lease import broker as broker_module
from dbguard.lease.client import Client
from dbguard.lease.etcd import EtcdLeases, configure
from dbguard.lease.etcd_cluster import EtcdCluster
from dbguard.lease.rules import Holder, Timing
from dbguard.lease.store import LmdbLeaseStore
from tests import lease_sequences as steps
from tests.lease_sequences import ANN, ANN_SCRATCH, BOB

# Far longer than an example takes, so that nothing in etcd lapses unless a step revokes it.
TIMING = Timing(ttl=60.0, lock_delay=30.0, grace=60.0)
WALL_EPOCH = 1_700_000_000.0
SERVICES = ("broker", "etcd")

# Reply fields that are clock readings or durations: compared by presence (and sign), not value.
_WALL_TIMES = frozenset({"since", "at"})
_DURATIONS = frozenset({"ttl_left", "retry_after", "free_in"})
_TOKENS = frozenset({"token", "current_token"})
_IGNORED = frozenset({"v", "id", "message"})


class _Clock:
    """The broker's `time` module while this test runs: time passes only when a step says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return WALL_EPOCH + self.now


class RulesAgree(RuleBasedStateMachine):
    """The same requests to the broker and to etcd; their replies must agree."""

    def __init__(self, cluster: EtcdCluster, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock
        self.state_dir = tempfile.TemporaryDirectory(prefix="dbguard-rules-")
        self.broker = broker_module.Broker(
            f"inproc://rules-{uuid.uuid4().hex}", LmdbLeaseStore(Path(self.state_dir.name)), TIMING
        )
        self.thread = threading.Thread(target=self.broker.serve_forever, daemon=True)
        self.thread.start()
        self.etcd = EtcdLeases(cluster.url(f"rules-{uuid.uuid4().hex[:12]}"))
        configure(self.etcd.address, ttl=TIMING.ttl, lock_delay=TIMING.lock_delay)
        self.services: dict[str, Any] = {
            "broker": Client(self.broker.bound_address, timeout=10.0),
            "etcd": self.etcd,
        }
        # Per service: each project's granted tokens in grant order, and each holder's last one.
        self.granted: dict[str, dict[str, list[int]]] = {s: {p: [] for p in steps.PROJECTS} for s in SERVICES}
        self.mine: dict[str, dict[tuple[str, str], int]] = {s: {} for s in SERVICES}

    def teardown(self) -> None:
        self.services["broker"].close()
        self.broker.stop()
        self.thread.join(10)
        self.state_dir.cleanup()
        self.revoke(lambda key: True)
        self.etcd.transport.delete_prefix(self.etcd.root)
        self.etcd.close()

    # ---------------------------------------------------------------- helpers

    def newest(self, service: str, project: str) -> int:
        tokens = self.granted[service][project]
        return tokens[-1] if tokens else 0

    def pick_token(self, service: str, project: str, holder: Holder, choice: str) -> int:
        tokens = self.granted[service][project]
        return {
            "mine": self.mine[service].get((project, holder.key), 0),
            "newest": self.newest(service, project),
            "older": tokens[-2] if len(tokens) > 1 else 0,
            "zero": 0,
            "future": self.newest(service, project) + 1,
        }[choice]

    def revoke(self, which: Callable[[bytes], bool]) -> None:
        """Revoke the etcd leases that this example's keys for which ``which`` holds are bound
        to: what etcd does itself when their TTL runs out."""
        kvs, _ = self.etcd.transport.range_prefix(self.etcd.root)
        leases = {
            int(kv["lease"]) for kv in kvs if int(kv.get("lease", 0)) and which(base64.b64decode(kv["key"]))
        }
        for lease in leases:
            self.etcd.transport.revoke(lease)

    def rank(self, service: str, project: str | None, token: int) -> int | str:
        """A token as its place among the project's grants by this service (0 stays 0)."""
        if token == 0:
            return 0
        tokens = self.granted[service].get(project or "", [])
        return tokens.index(token) + 1 if token in tokens else f"never granted: {token}"

    def normal(self, service: str, value: Any, project: str | None = None) -> Any:
        """A reply as it is compared: see the module's docstring."""
        if isinstance(value, list):
            return [self.normal(service, item, project) for item in value]
        if not isinstance(value, dict):
            return value
        project = value.get("project", project)
        result: dict[str, Any] = {}
        for key, item in value.items():
            if key in _IGNORED:
                continue
            if key in _WALL_TIMES:
                result[key] = item is not None
            elif key in _DURATIONS:
                result[key] = None if item is None else item > 0
            elif key in _TOKENS and isinstance(item, int):
                result[key] = self.rank(service, project, item)
            elif key == "readers":  # a set: the broker lists them as they came, etcd by key
                result[key] = sorted(item, key=lambda reader: (reader["host"], reader["user"]))
            else:
                result[key] = self.normal(service, item, project)
        return result

    def ask(self, op: str, **fields: Any) -> dict[str, dict[str, Any]]:
        """Send one request to both services. A field given as a callable is resolved for each
        service (tokens and floors are in its own numbering); a field that is None is left out."""
        replies = {}
        for service in SERVICES:
            resolved = {k: v(service) if callable(v) else v for k, v in fields.items()}
            resolved = {k: v for k, v in resolved.items() if v is not None}
            replies[service] = self.services[service].call(op, **resolved)
        return replies

    def agree(self, what: str, replies: dict[str, dict[str, Any]], project: str | None = None) -> None:
        broker, etcd = (self.normal(s, replies[s], project) for s in SERVICES)
        assert broker == etcd, (
            f"{what}: the broker and etcd disagree\n  broker: {broker}\n  etcd:   {etcd}\n"
            f"  raw broker: {replies['broker']}\n  raw etcd:   {replies['etcd']}"
        )

    def note_grant(self, service: str, reply: dict[str, Any], holder: Holder, floor: int) -> None:
        if not (reply.get("ok") and reply.get("status") == "granted" and reply.get("mode") == "write"):
            return
        project, token = reply["project"], reply["token"]
        tokens = self.granted[service][project]
        if token not in tokens:
            assert token > max([floor, *tokens]), (
                f"{service} granted token {token} after {tokens} with the floor {floor}"
            )
            tokens.append(token)
        self.mine[service][(project, holder.key)] = token

    # ------------------------------------------------------------------ steps

    @steps.ACQUIRE_WRITE
    def acquire_write(
        self,
        holder: Holder,
        project: str,
        wait: bool = False,
        takeover: bool = False,
        floor_choice: str = "zero",
        unflushed: int = 0,
        dirty: bool = False,
    ) -> None:
        floors = {s: steps.pick_floor(floor_choice, self.newest(s, project)) for s in SERVICES}
        replies = self.ask(
            "acquire",
            project=project,
            holder=holder.to_json(),
            wait=wait,
            takeover=takeover,
            floor=floors.get,
            unflushed=unflushed,
            dirty=dirty,
        )
        for service in SERVICES:
            self.note_grant(service, replies[service], holder, floors[service])
        self.agree("acquire", replies, project)

    @steps.ACQUIRE_READ
    def acquire_read(self, holder: Holder, project: str) -> None:
        replies = self.ask("acquire", project=project, holder=holder.to_json(), mode="read")
        self.agree("acquire to read", replies, project)

    @steps.RENEW
    def renew(self, holder: Holder, items: list[tuple[str, str, int]]) -> None:
        def leases(service: str) -> list[dict[str, Any]]:
            return [
                {"project": p, "token": self.pick_token(service, p, holder, choice), "unflushed": unflushed}
                for p, choice, unflushed in items
            ]

        replies = self.ask("renew", holder=holder.to_json(), leases=leases)
        self.agree("renew", replies)

    @steps.RELEASE
    def release(self, holder: Holder, project: str, choice: str | None, mode: str = "write") -> None:
        def token(service: str) -> int | None:
            return None if choice is None else self.pick_token(service, project, holder, choice)

        replies = self.ask("release", project=project, holder=holder.to_json(), token=token, mode=mode)
        self.agree("release", replies, project)

    @steps.LEAVE_QUEUE
    def leave_queue(self, holder: Holder, project: str) -> None:
        replies = self.ask("leave-queue", project=project, holder=holder.to_json())
        self.agree("leave-queue", replies, project)

    @steps.MARK
    def mark(self, holder: Holder, project: str, choice: str, dirty: bool, unflushed: int) -> None:
        replies = self.ask(
            "mark",
            project=project,
            holder=holder.to_json(),
            token=lambda service: self.pick_token(service, project, holder, choice),
            dirty=dirty,
            unflushed=unflushed,
        )
        self.agree("mark", replies, project)

    @steps.SERVE
    def serve(self, holder: Holder, project: str, choice: str, address: str | None) -> None:
        replies = self.ask(
            "serve",
            project=project,
            holder=holder.to_json(),
            token=lambda service: self.pick_token(service, project, holder, choice),
            address=address,
            key="k" * 40 if address else None,
        )
        self.agree("serve", replies, project)

    @steps.BREAK
    def break_lease(self, project: str) -> None:
        replies = self.ask("break", project=project, force=True)
        self.agree("break", replies, project)

    @steps.STATUS
    def status(self, project: str) -> None:
        self.agree("status", self.ask("status", project=project), project)

    @rule(lock_delay_ends=st.booleans())
    def expire_all(self, lock_delay_ends: bool) -> None:
        """Every holder, reader and waiter stops renewing for longer than a TTL; then, if
        ``lock_delay_ends``, the lock-delays this starts run out as well."""
        self.clock.now += TIMING.ttl + 1
        self.revoke(lambda key: True)
        # Both services see the lapse now: etcd starts its lock-delays when it first looks.
        self.every_status_agrees()
        if lock_delay_ends:
            self.clock.now += TIMING.lock_delay
            self.revoke(lambda key: key.endswith(b"/delay"))

    @invariant()
    def every_status_agrees(self) -> None:
        replies = self.ask("status")
        self.agree("status of every project", replies)


@pytest.mark.slow
def test_the_broker_and_etcd_answer_every_request_alike(etcd_cluster: EtcdCluster) -> None:
    clock = _Clock()

    class OnThisCluster(RulesAgree):
        def __init__(self) -> None:
            super().__init__(etcd_cluster, clock)

    # A few dozen examples, each on a fresh broker and etcd prefix: about 20 s on 2 cores.
    with mock.patch.object(broker_module, "time", clock):
        run_state_machine_as_test(
            OnThisCluster, settings=settings(max_examples=20, stateful_step_count=40, deadline=None)
        )


# ------------------------------------- divergences this test found, fixed: their smallest cases


@pytest.fixture
def services(etcd_cluster: EtcdCluster) -> Iterator[RulesAgree]:
    clock = _Clock()
    with mock.patch.object(broker_module, "time", clock):
        both = RulesAgree(etcd_cluster, clock)
        try:
            yield both
        finally:
            both.teardown()


def test_a_lapse_is_reported_as_the_loss_by_both(services: RulesAgree) -> None:
    """etcd once recorded a loss only when it retired the writer record (at the next grant)."""
    services.acquire_write(ANN, "p1")
    services.expire_all(lock_delay_ends=False)  # status: lock-delay, the loss "expired"


def test_a_release_after_the_lock_delay_holds_nothing_on_both(services: RulesAgree) -> None:
    """etcd once retired the lapsed writer record and answered held=true."""
    services.acquire_write(ANN, "p1")
    services.expire_all(lock_delay_ends=True)
    services.release(ANN, "p1", "mine")


def test_a_lapse_drops_the_takeover_request_on_both(services: RulesAgree) -> None:
    """etcd once kept takeover_by in the record of a lease that had lapsed."""
    services.acquire_write(BOB, "p1")
    services.acquire_write(ANN, "p1", takeover=True)
    services.expire_all(lock_delay_ends=False)


def test_a_takeover_from_the_head_of_the_queue_is_marked_on_both(services: RulesAgree) -> None:
    """The table once left a waiter already at the head of the queue unmarked as a takeover."""
    services.acquire_write(ANN_SCRATCH, "p1")
    services.acquire_write(ANN, "p1", wait=True)
    services.acquire_write(ANN, "p1", takeover=True)
    services.every_status_agrees()
