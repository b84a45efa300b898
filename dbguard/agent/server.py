"""The local agent: one per host, user and cache directory, started on demand like ssh-agent.

It holds this host's leases and renews them with one batched heartbeat per interval, reports
how many bytes each project has unflushed in the cache, flushes dirty data periodically and on
release, answers takeover requests by flushing and releasing, and notices when a lease it held
was lost, setting that lease's unflushed data aside. User processes talk to it over a ZeroMQ
ipc socket inside the cache directory (0700, so only its user can connect).

Two threads: the heartbeat thread only renews (a flush of many gigabytes must never delay a
renewal past the TTL), and the main thread serves local requests and does the long work:
flushes, hand-overs and setting data aside. They share the lease table under one lock.

The leases it holds are also written to ``leases.json`` in the cache directory: an agent
restarted after a crash reclaims them, and writing processes check them there (agent.lease_check).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import json
import logging
import math
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from dbguard.agent.serving import Servers
from dbguard.cache import CacheError, CacheStore
from dbguard.data import flushing
from dbguard.data.project import Project, read_identity, token_floor, write_writer_record
from dbguard.data.store import FlushResult
from dbguard.errors import (
    AgentAlreadyRunning,
    Fenced,
    GuardError,
    IntegrityError,
    LeaseHeld,
    LeaseLost,
    UnflushedData,
    UsageError,
    cache_disk_full,
    from_cache_error,
    share_failure,
)
from dbguard.lease import protocol, requests
from dbguard.lease.client import error_from_reply
from dbguard.lease.protocol import AgentOp, ErrorKind
from dbguard.lease.rules import Holder, RenewItem
from dbguard.lease.service import LeaseService, for_broker
from dbguard.names import PLAIN_NAME_RULE, is_plain_name
from dbguard.settings import Settings
from dbguard.stage import records
from dbguard.stage import sync as syncing
from dbguard.units import human_size

log = logging.getLogger("dbguard.agent.server")

SOCKET_NAME = "agent.sock"
LOCK_NAME = "agent.lock"
LOG_NAME = "agent.log"
LEASES_NAME = "leases.json"

# How often the agent looks for a dirty-marked lease whose cache is clean (a database opened
# for writing and left unwritten; a flush whose SETTLE request was lost), and how long after
# marking one dirty it leaves it be: the writer that asked writes right after the answer, and
# withdrawing the mark before that would only make it ask again. Flushes settle at once (the
# agent's own, and `flush` through AgentOp.SETTLE): looking reads the cache's state, which a
# busy writer should not pay for every fraction of a second.
_SETTLE_INTERVAL = 2.0
_SETTLE_AFTER_MARK = 1.0


def socket_address(cache_dir: Path) -> str:
    return f"ipc://{cache_dir / SOCKET_NAME}"


@dataclass
class HeldLease:
    project: str  # the project's UUID
    path: str  # the project directory as this host sees it
    token: int
    ttl: float
    since: float
    state: str = "held"  # held, lost, uncertain (broker not answering)
    reason: str = ""  # why it was lost
    takeover_by: str | None = None
    # Whether the lease service may believe this host holds unflushed data of the project: set
    # before a writer's first unflushed write goes through (and, to be safe, on every grant),
    # cleared once a flush has emptied the cache and the lease service was told so.
    marked: bool = True
    # Where this host serves the project to workers (`dbguard serve`), as bound: a restarted
    # agent serves it there again, so workers find it where they left it.
    serve: str | None = None
    serve_bind: str | None = None  # what its server bound (tcp://0.0.0.0:PORT), to bind it again
    # Whether the project is deployed on this host (`dbguard deploy`): its folder there may hold
    # work not on the share yet, so the lease stays dirty (invariant 7) and is synced periodically.
    deployed: bool = False
    last_renewed: float = field(default=0.0, repr=False)  # monotonic; not persisted
    last_flush: float = field(default=0.0, repr=False)  # monotonic; not persisted
    settle_after: float = field(default=0.0, repr=False)  # monotonic; not persisted

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("last_renewed")
        data.pop("last_flush")
        data.pop("settle_after")
        return data

    def as_project(self) -> Project:
        return Project(self.project, Path(self.path))

    @classmethod
    def from_saved(cls, item: Any) -> HeldLease | None:
        """The lease an entry of a saved table describes, if it has the form `public` gives it;
        None for anything else (the table is this agent's own file, but a crash, a full disk or
        a hand may have left anything in it)."""
        if not isinstance(item, dict) or not is_plain_name(item.get("project")):
            return None
        fields = {name: item[name] for name in _SAVED_FIELDS if name in item}
        try:
            lease = cls(**fields)
        except TypeError:  # a field missing
            return None
        numbers = (lease.ttl, lease.since)
        if (
            type(lease.token) is not int
            or lease.token < 0
            or not all(type(n) in (int, float) and math.isfinite(n) and n >= 0 for n in numbers)
            or lease.ttl <= 0
            or not isinstance(lease.path, str)
            or not os.path.isabs(lease.path)
            or lease.state not in _LEASE_STATES
            or not isinstance(lease.reason, str)
            or not isinstance(lease.takeover_by, (str, type(None)))
            or not isinstance(lease.marked, bool)
            or not (
                lease.serve is None or (isinstance(lease.serve, str) and lease.serve.startswith("tcp://"))
            )
            or not all(
                value is None or (isinstance(value, str) and value.startswith("tcp://"))
                for value in (lease.serve, lease.serve_bind)
            )
            or not isinstance(lease.deployed, bool)
        ):
            return None
        return lease


_LEASE_STATES = ("held", "lost", "uncertain")
_SAVED_FIELDS = (
    "project",
    "path",
    "token",
    "ttl",
    "since",
    "state",
    "reason",
    "takeover_by",
    "marked",
    "serve",
    "serve_bind",
    "deployed",
)


def read_saved_leases(cache_dir: Path) -> list[dict[str, Any]]:
    """The lease table the agent of ``cache_dir`` saved (`Agent._save`), the entries of the form
    it writes only: what commands and writers read of it, as the agent itself does."""
    try:
        saved = json.loads((cache_dir / LEASES_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(saved, list):
        return []
    return [lease.public() for lease in map(HeldLease.from_saved, saved) if lease is not None]


class Agent:
    def __init__(self, settings: Settings, cache_dir: Path) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self._lock_fd = self._lock()
        self.holder = Holder(settings.host, settings.user, uuid.uuid4().hex, str(cache_dir))
        self.broker = for_broker(settings)
        self.leases: dict[str, HeldLease] = {}
        self.notices: list[dict[str, Any]] = []
        self._damaged: set[str] = set()  # projects whose cache could not be read, noticed once
        self._table_lock = threading.RLock()
        self._work: queue.Queue[Callable[[], None]] = queue.Queue()
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        (cache_dir / SOCKET_NAME).unlink(missing_ok=True)  # a crashed predecessor's; we hold the lock
        self._socket.bind(socket_address(cache_dir))
        self._stopping = threading.Event()
        self._signalled = False
        self._renew_now = threading.Event()
        self._next_settle = 0.0
        self.servers = Servers(cache_dir)
        self._next_serve_check = 0.0
        self._next_sync = time.monotonic() + settings.sync_interval
        self._syncing: set[str] = set()
        # History events for the lease service (flushes, fence refusals, deployments), sent by
        # the main loop, which owns self.broker: sync threads and local requests only queue them.
        self._reports: collections.deque[tuple[float, requests.Report]] = collections.deque(maxlen=1000)
        self._next_report = 0.0

    def _lock(self) -> int:
        fd = os.open(self.cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AgentAlreadyRunning(f"an agent already serves {self.cache_dir}") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    # ------------------------------------------------------------- lifecycle

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info(
            "agent %s for %s serving %s", self.holder.agent, self.holder.key, socket_address(self.cache_dir)
        )
        self._reclaim()
        heartbeats = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeats.start()
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if poller.poll(200):
                    self._carry_on(self._serve_local)
                for step in (
                    self._do_work,
                    self._flush_due,
                    self._settle_clean,
                    self._keep_serving,
                    self._sync_due,
                    self._send_reports,
                ):
                    self._carry_on(step)
        finally:
            self._stopping.set()
            self.servers.stop_all()
            heartbeats.join(timeout=5)
            self._socket.close()
            self.broker.close()
            os.close(self._lock_fd)

    @staticmethod
    def _carry_on(step: Callable[[], None]) -> None:
        """Run one step of a loop; whatever it meets is logged, and the loop goes on. Projects
        live on a share that anyone may have left anything in: one of them must not stop the
        agent from serving and renewing the others."""
        try:
            step()
        except Exception:
            log.exception("%s failed; the agent carries on", getattr(step, "__name__", step))

    def _on_signal(self, signum: int, frame: object) -> None:
        # Once only: a second signal arriving inside Event.set below would wait forever for
        # the lock that the first one holds (PDEATHSIG and a kill can come together).
        if not self._signalled:
            self._signalled = True
            self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._renew_now.set()  # wake the heartbeat thread instead of waiting out its interval

    def _live_leases(self) -> list[HeldLease]:
        with self._table_lock:
            return [lease for lease in self.leases.values() if lease.state != "lost"]

    def _reclaim(self) -> None:
        """Take back what the previous agent of this cache directory held. One project that
        cannot be taken back (its cache damaged, its directory broken) is reported, and the
        others are taken back all the same: the agent must never die at start-up over one."""
        for item in read_saved_leases(self.cache_dir):
            lease = HeldLease.from_saved(item)
            assert lease is not None  # read_saved_leases keeps only these
            try:
                self._reclaim_one(lease)
            except Exception as exc:
                log.exception("reclaiming %s failed", lease.project)
                self._notice(lease.project, f"could not reclaim the lease after an agent restart: {exc}")
        self._save()

    def _reclaim_one(self, lease: HeldLease) -> None:
        if lease.state == "lost":
            self.leases[lease.project] = lease
            return
        try:
            self._acquire(lease.as_project(), wait=False, takeover=False, reclaiming=lease.token)
            resumed = self.leases[lease.project]
            if resumed.token == lease.token:  # served before: `_keep_serving` serves it again
                resumed.serve, resumed.serve_bind = lease.serve, lease.serve_bind
            self._notice(
                lease.project,
                f"reclaimed the lease (token {self.leases[lease.project].token}) after an agent restart",
            )
        except LeaseHeld as exc:
            who = f"{exc.holder.get('user')} on {exc.holder.get('host')}" if exc.holder else "another host"
            lease.state, lease.reason = "lost", f"lost while this agent was down: {who} holds it now"
            self.leases[lease.project] = lease
            self._notice(lease.project, lease.reason)
            self._set_aside(lease)
        except GuardError as exc:
            lease.state, lease.reason = "lost", f"could not reclaim it after an agent restart: {exc}"
            self.leases[lease.project] = lease
            self._notice(lease.project, lease.reason)
            # Before serving anyone: whoever started this agent (recover, status) then sees it.
            self._set_aside(lease)

    def _save(self) -> None:
        with self._table_lock:
            data = json.dumps([lease.public() for lease in self.leases.values()], indent=1)
        temp = self.cache_dir / f".{LEASES_NAME}.{threading.get_ident()}"
        temp.write_text(data)
        os.replace(temp, self.cache_dir / LEASES_NAME)

    def _notice(self, project: str, text: str) -> None:
        log.warning("%s: %s", project, text)
        with self._table_lock:
            self.notices.append({"project": project, "at": time.time(), "text": text})
            del self.notices[:-50]

    # ------------------------------------------------------------ heartbeats

    def unflushed(self, project: str) -> int:
        try:
            return CacheStore.dirty_bytes_of(self.cache_dir, project)
        except (CacheError, OSError) as exc:
            # A damaged cache may hold unflushed records: say so (a lease that then expires is
            # orphaned, not freed) and keep renewing, rather than let the heartbeat thread die.
            if project not in self._damaged:
                self._damaged.add(project)
                self._notice(project, str(exc))
            return 1

    def _announced(self, project: str) -> bool:
        """Whether the project's cache is announced dirty: gated writes then go through without
        asking, so a lease granted now must be dirty from the start (a writer announced and the
        cache was flushed since, but the agent had not settled it yet; or a predecessor agent
        never did). A damaged cache counts as announced."""
        try:
            store = CacheStore(self.cache_dir, project, create=False)
        except FileNotFoundError:
            return False
        except CacheError:
            return True
        try:
            return store.announced()
        except CacheError:
            return True
        finally:
            store.close()

    def _heartbeat_loop(self) -> None:
        client = for_broker(self.settings)
        try:
            next_beat = 0.0
            while not self._stopping.is_set():
                live = self._live_leases()
                if not live:
                    self._renew_now.wait(0.5)
                    self._renew_now.clear()
                    continue
                interval = min(protocol.heartbeat_interval(lease.ttl) for lease in live)
                wait = next_beat - time.monotonic()
                if wait > 0:
                    self._renew_now.wait(wait)  # a new lease wakes it early
                self._renew_now.clear()
                if self._stopping.is_set():
                    return
                next_beat = time.monotonic() + interval
                self._carry_on(functools.partial(self._heartbeat, client, self._live_leases(), interval))
        finally:
            client.close()

    def _heartbeat(self, client: LeaseService, live: list[HeldLease], interval: float) -> None:
        if not live:
            return
        now = time.monotonic()
        items = tuple(RenewItem(lease.project, lease.token, self.unflushed(lease.project)) for lease in live)
        try:
            reply = client.send_ok(requests.Renew(self.holder, items), timeout=interval)
        except GuardError as exc:
            for lease in live:
                # Past its TTL without a renewal the broker may have let the lease go: say so
                # rather than claim it. Fencing keeps the project safe either way.
                if now - lease.last_renewed > lease.ttl and lease.state == "held":
                    lease.state, lease.reason = "uncertain", str(exc)
                    self._notice(lease.project, f"cannot reach the broker to renew: {exc}")
                    self._save()
            return
        changed = False
        with self._table_lock:
            for result in reply["results"]:
                held = self.leases.get(result["project"])
                if held is None or held.state == "lost":
                    continue
                if result["ok"]:
                    if held.state != "held":
                        changed = True
                    held.state, held.reason, held.last_renewed = "held", "", now
                    held.ttl = float(result["ttl"])
                    if result.get("takeover_by") and held.takeover_by != result["takeover_by"]:
                        held.takeover_by = result["takeover_by"]
                        self._notice(
                            held.project, f"takeover requested by {held.takeover_by}; flushing and releasing"
                        )
                        self._work.put(functools.partial(self._hand_over, held))
                else:
                    held.state = "lost"
                    held.reason = _describe_loss(result)
                    self._notice(held.project, f"lease lost: {held.reason}")
                    self._work.put(functools.partial(self._set_aside, held))
                    changed = True
        if changed:
            self._save()

    # ------------------------------------------------------------ long work

    def _do_work(self) -> None:
        while True:
            try:
                job = self._work.get_nowait()
            except queue.Empty:
                return
            try:
                job()
            except Exception:
                log.exception("background work failed")

    def _flush_due(self) -> None:
        """The periodic flush: every flush_interval, whatever is dirty goes to the store."""
        now = time.monotonic()
        for lease in self._live_leases():
            if lease.state == "held" and now - lease.last_flush >= self.settings.flush_interval:
                lease.last_flush = now
                if self.unflushed(lease.project):
                    self._flush(lease)

    def _flush(self, lease: HeldLease) -> FlushResult | None:
        started = time.monotonic()
        try:
            result = flushing.flush_project(
                self.cache_dir, lease.as_project(), lease.token, writer=self._writer()
            )
        except Fenced as exc:
            with self._table_lock:
                lease.state, lease.reason = "lost", "a newer writer's token fenced this host's flush"
            self._notice(lease.project, f"flush refused, data kept aside: {exc}")
            self._report(lease.project, lease.token, "fence-refused", detail=str(exc)[:500])
            self._save()
            return None
        except (GuardError, CacheError) as exc:
            self._notice(lease.project, f"flush failed, will retry: {exc}")
            return None
        with contextlib.suppress(GuardError):
            self._settle(lease)  # the lease service hears at once that the cache is clean
        if result.records:
            try:
                if flushing.maintain_store(
                    lease.as_project(), lease.token, self._writer(), self.settings.retire_delay
                ):
                    log.info("%s: compacted the project store", lease.project)
            except GuardError as exc:
                self._notice(lease.project, f"compaction failed (the data is safe): {exc}")
            log.info(
                "%s: flushed %d records (%d bytes) as generation %d",
                lease.project,
                result.records,
                result.bytes,
                result.generation,
            )
            self._report(
                lease.project,
                lease.token,
                "flushed",
                records=result.records,
                bytes=result.bytes,
                seconds=time.monotonic() - started,
                detail=f"generation {result.generation}",
            )
        return result

    # ----------------------------------------------------------------- history

    def _report(self, project_id: str, token: int, event: str, **fields: Any) -> None:
        """Queue an event of this host for the project's history at the lease service."""
        self._reports.append(
            (time.monotonic(), requests.Report(project_id, self.holder, token, event, **fields))
        )

    def _report_for(self, request: dict[str, Any]) -> None:
        """A local process reports an event of a project (a flush it ran, a flush refused by
        the fencing token), checked field by field: the lease service refuses wrong types."""
        event = request.get("event")
        if event not in protocol.REPORTED_EVENTS:
            raise UsageError(f"cannot report {event!r}: one of {', '.join(sorted(protocol.REPORTED_EVENTS))}")
        fields: dict[str, Any] = {}
        for name in ("records", "bytes"):
            value = request.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
                fields[name] = value
        seconds = request.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 <= seconds < 1e9:
            fields["seconds"] = float(seconds)
        detail = request.get("detail")
        if isinstance(detail, str) and detail:
            fields["detail"] = detail[:500]
        self._report(_project_id(request), int(request["token"]), str(event), **fields)

    def _send_reports(self) -> None:
        """Send the queued reports. History is for people: a report the lease service cannot
        take now is tried again later, and dropped after ten minutes rather than hold anything up."""
        now = time.monotonic()
        if not self._reports or now < self._next_report:
            return
        while self._reports:
            queued, report = self._reports[0]
            if now - queued > 600:
                self._reports.popleft()
                continue
            try:
                self.broker.send_ok(report)
            except GuardError as exc:
                log.info("cannot report %s of %s yet: %s", report.event, report.project, exc)
                self._next_report = now + 10.0
                return
            self._reports.popleft()

    # ---------------------------------------------------------- dirty marks

    def _mark_dirty(self, project_id: str, token: int, unflushed: int) -> dict[str, Any]:
        """A writer of this host is about to make the project's cache dirty: tell the lease
        service (durably) first, then let the cache take gated writes (invariant 7).

        Both this and `_settle_clean` run on the main thread, so a clean mark and a dirty mark
        of one project never cross on their way to the lease service."""
        with self._table_lock:
            lease = self.leases.get(project_id)
        # An "uncertain" lease (renewals unanswered) may still stand: the lease service decides.
        if lease is None or lease.state not in ("held", "uncertain") or lease.token != token:
            reason = lease.reason if lease is not None and lease.reason else "not held by this host"
            raise LeaseLost(
                f"this host no longer holds the writer lease of {lease.path if lease else project_id} "
                f"({reason}); nothing more can be written to it here. Run `dbguard status` to see "
                "who holds it",
                project=project_id,
                reason=reason,
            )
        mark = requests.Mark(project_id, self.holder, token, dirty=True, unflushed=unflushed)
        reply = self.broker.send(mark)
        if not reply["ok"]:
            raise error_from_reply(reply, self.settings.broker)
        lease.marked = True
        lease.settle_after = time.monotonic() + _SETTLE_AFTER_MARK
        store = CacheStore(self.cache_dir, project_id)
        try:
            store.announce()
        finally:
            store.close()
        return {"marked": True}

    def _note_unflushed(self, project_id: str, token: int, size: int) -> None:
        with self._table_lock:
            lease = self.leases.get(project_id)
        if lease is None or lease.token != token or lease.state != "held":
            return
        reply = self.broker.send(requests.Mark(project_id, self.holder, token, dirty=True, unflushed=size))
        if reply.get("ok"):
            lease.marked = True  # a settle that ran in between is undone at the lease service too

    def _settle_clean(self) -> None:
        """Tell the lease service that a lease is clean again once a flush (this agent's or a
        user's `dbguard flush`) has emptied its cache: a holder that then dies frees its project
        after the lock-delay instead of orphaning it."""
        now = time.monotonic()
        if now < self._next_settle:
            return
        self._next_settle = now + _SETTLE_INTERVAL
        for lease in self._live_leases():
            if now < lease.settle_after:
                continue
            try:
                self._settle(lease)
            except GuardError as exc:
                # Still dirty at the lease service, which is the safe side; try again later
                # rather than hold up local requests while the service is away.
                log.info("%s: cannot mark the lease clean yet: %s", lease.project, exc)
                self._next_settle = time.monotonic() + protocol.heartbeat_interval(lease.ttl)
                return

    def _settle(self, lease: HeldLease) -> bool:
        """If the lease is marked dirty and its cache holds nothing unflushed, withdraw the
        cache's announcement and mark the lease clean; return whether it is clean now. Raises
        the GuardError of an unreachable lease service (the lease then stays dirty)."""
        if lease.state != "held" or not lease.marked:
            return not lease.marked
        if lease.deployed:
            return False  # the deployed folder may hold work the share has not seen
        if self.unflushed(lease.project):
            return False
        try:
            store = CacheStore(self.cache_dir, lease.project, create=False)
        except FileNotFoundError:
            clean = True  # no cache at all (never written, or dropped by `clear`)
        except CacheError:
            return False  # a damaged cache stays dirty; `unflushed` has said so
        else:
            try:
                clean = store.settle()
            except CacheError:
                clean = False
            finally:
                store.close()
        if not clean:
            return False
        # A writer that now finds the cache unannounced asks this thread to mark it dirty
        # again, after this answer: the lease service sees clean, then dirty.
        reply = self.broker.send(requests.Mark(lease.project, self.holder, lease.token, dirty=False))
        if reply.get("ok"):
            lease.marked = False
        elif reply.get("error") == ErrorKind.LOST:
            log.info("%s: not marked clean, the lease is gone: %s", lease.project, reply.get("message"))
            lease.marked = False
        return not lease.marked

    # ------------------------------------------------------------- serving

    def _serve(self, project_id: str, address: str) -> dict[str, Any]:
        """Serve a held project to workers on ``address`` (agent.serve), and record where in
        the lease service, which is how workers find it."""
        with self._table_lock:
            lease = self.leases.get(project_id)
        if lease is None or lease.state != "held":
            raise LeaseLost(
                f"this host does not hold the writer lease of {lease.path if lease else project_id}: "
                "acquire it before serving it",
                project=project_id,
                reason=lease.reason if lease else "not held",
            )
        server = self.servers.start(lease.as_project(), address)
        try:
            reply = self.broker.send(
                requests.Serve(project_id, self.holder, lease.token, server.address, server.key)
            )
            if not reply["ok"]:
                raise error_from_reply(reply, self.settings.broker)
        except GuardError:
            self.servers.stop(project_id)
            raise
        lease.serve, lease.serve_bind = server.address, server.bound
        self._save()
        return {"address": server.address, "key": server.key, "token": lease.token}

    def _unserve(self, project_id: str, *, tell: bool = True) -> bool:
        """Stop serving a project; ``tell`` the lease service (not needed when the lease ends)."""
        stopped = self.servers.stop(project_id)
        with self._table_lock:
            lease = self.leases.get(project_id)
        if lease is None or lease.serve is None:
            return stopped
        lease.serve = lease.serve_bind = None
        self._save()
        if tell and lease.state == "held":
            reply = self.broker.send(requests.Serve(project_id, self.holder, lease.token))
            if not reply["ok"]:
                log.info("%s: the lease service did not hear that serving stopped: %s", project_id, reply)
        return True

    def _keep_serving(self) -> None:
        """Serve what should be served: again after a restart of this agent (`_reclaim`) or of a
        server that died; never a lease no longer held."""
        now = time.monotonic()
        if now < self._next_serve_check:
            return
        self._next_serve_check = now + 1.0
        for lease in list(self.leases.values()):
            server = self.servers.get(lease.project)
            if lease.state == "lost" and server is not None:
                self.servers.stop(lease.project)
            if lease.state != "held" or lease.serve is None or (server is not None and server.running):
                continue
            bind = lease.serve_bind or lease.serve
            try:
                self._serve(lease.project, bind)
            except GuardError as exc:
                # Its port taken meanwhile: any free port; workers look the address up again.
                fallback = bind.rpartition(":")[0] + ":0"
                try:
                    self._serve(lease.project, fallback)
                except GuardError:
                    self._notice(lease.project, f"could not serve it to workers again: {exc}")
                    self._next_serve_check = now + 5.0

    # ----------------------------------------------------------- deployments

    def _deployed(self, project_id: str, token: int) -> dict[str, Any]:
        """`dbguard deploy` copied the project here: the lease is dirty from now on (a host that
        dies with its deployment orphans the project), and synced every sync_interval."""
        self._mark_dirty(project_id, token, 0)
        with self._table_lock:
            lease = self.leases[project_id]
            lease.deployed = True
        self._save()
        self._report(project_id, token, "deployed")
        return {"deployed": True}

    def _undeployed(self, project_id: str) -> dict[str, Any]:
        with self._table_lock:
            lease = self.leases.get(project_id)
            if lease is not None:
                lease.deployed = False
                lease.settle_after = 0.0
        self._save()
        if lease is not None:
            self._report(project_id, lease.token, "undeployed")
        return {"deployed": False}

    def _sync_due(self) -> None:
        """The periodic sync of deployed projects (stage.sync), fenced like every sync, each in
        a thread of its own: a sync of many gigabytes must not keep this loop from answering
        local requests (a writer marking its lease dirty waits for them)."""
        now = time.monotonic()
        if now < self._next_sync:
            return
        self._next_sync = now + self.settings.sync_interval
        for lease in self._live_leases():
            if lease.state == "held" and lease.deployed and lease.project not in self._syncing:
                self._syncing.add(lease.project)
                thread = threading.Thread(
                    target=self._sync_in_thread, args=(lease,), name="sync", daemon=True
                )
                thread.start()

    def _sync_in_thread(self, lease: HeldLease) -> None:
        try:
            self._sync(lease)
        finally:
            self._syncing.discard(lease.project)

    def _sync_for_hand_over(self, lease: HeldLease) -> bool:
        """A takeover of a deployed project: everything synced first, or no hand-over."""
        self._sync(lease)
        state = records.read_local(self.cache_dir, lease.project)
        if state is None:
            return True
        changed, deleted = syncing.pending(state) if state.state == "deployed" else ([], [])
        if state.state != "deployed" or changed or deleted:
            self._notice(
                lease.project,
                f"not releasing for the takeover: the deployment {state.dir} could not be synced in full",
            )
            return False
        state.state = "fenced"  # handed over: it syncs no more; recover lists it, with nothing left
        records.write_local(self.cache_dir, state)
        lease.deployed = False
        return True

    def _sync(self, lease: HeldLease) -> None:
        try:
            with flushing.flush_lock(self.cache_dir, lease.project):
                state = records.read_local(self.cache_dir, lease.project)
                if state is None or state.state != "deployed" or state.token != lease.token:
                    return
                try:
                    result = syncing.sync(self.cache_dir, state, functools.partial(self._still_held, lease))
                except (Fenced, LeaseLost, LeaseHeld) as exc:
                    state.state = "fenced"
                    records.write_local(self.cache_dir, state)
                    self._notice(lease.project, f"sync refused, the deployment {state.dir} is kept: {exc}")
                    if isinstance(exc, Fenced):
                        self._report(lease.project, lease.token, "fence-refused", detail=str(exc)[:500])
                    return
            if result.copied or result.deleted:
                self._report(
                    lease.project,
                    lease.token,
                    "synced",
                    records=result.copied,
                    bytes=result.bytes,
                    seconds=result.seconds,
                    detail=f"{result.copied} files copied, {result.deleted} deleted",
                )
                log.info(
                    "%s: synced %d files (%d bytes), %d deleted",
                    lease.project,
                    result.copied,
                    result.bytes,
                    result.deleted,
                )
        except GuardError as exc:
            self._notice(lease.project, f"sync failed, will retry: {exc}")

    def _still_held(self, lease: HeldLease) -> None:
        if lease.state == "lost" or self.leases.get(lease.project) is not lease:
            reason = lease.reason or "released"
            raise LeaseLost(f"this host lost the lease of {lease.path}: {reason}", project=lease.project)

    def _fence_deployment(self, lease: HeldLease) -> None:
        """A lost lease's deployment publishes nothing more; `recover` lists what it kept."""
        with flushing.flush_lock(self.cache_dir, lease.project):  # not under a running sync
            state = records.read_local(self.cache_dir, lease.project)
            if state is not None and state.state not in ("fenced", "removing") and state.token == lease.token:
                state.state = "fenced"
                records.write_local(self.cache_dir, state)
                self._notice(lease.project, f"the deployment {state.dir} is kept; see `dbguard recover`")

    def _hand_over(self, lease: HeldLease) -> None:
        """Another host asked for a takeover: flush, then give the lease up."""
        self._unserve(lease.project)  # no worker writes into what is being flushed
        if lease.deployed and not self._sync_for_hand_over(lease):
            return
        if self._flush(lease) is None and self.unflushed(lease.project):
            self._notice(
                lease.project, "not releasing for the takeover: the flush failed and data is unflushed"
            )
            return
        try:
            self._release(lease.project)
        except GuardError as exc:
            self._notice(lease.project, f"release for the takeover failed: {exc}")

    def _set_aside(self, lease: HeldLease) -> None:
        """A lost lease's unflushed data must neither be flushed over the new writer nor deleted.
        A cache that cannot be moved (damaged, its disk full) stays where it is, said so: no
        writer of this host can write it under the lost lease anyway."""
        self.servers.stop(lease.project)  # nothing more from workers into what is moved aside
        if lease.deployed:
            self._carry_on(lambda: self._fence_deployment(lease))
        try:
            with flushing.flush_lock(self.cache_dir, lease.project):
                dirty = self.unflushed(lease.project)
                if dirty:
                    where = flushing.set_aside(self.cache_dir, lease.project, lease.token, lease.reason)
                    self._notice(
                        lease.project,
                        f"kept {human_size(dirty)} of unflushed data aside in {where}; see `dbguard recover`",
                    )
        except (GuardError, CacheError, OSError) as exc:
            self._notice(lease.project, f"could not set the unflushed data of the lost lease aside: {exc}")

    def _writer(self) -> dict[str, str]:
        return {"host": self.holder.host, "user": self.holder.user}

    # ----------------------------------------------------------- local calls

    def _serve_local(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            envelope, payload = frames[:-1], frames[-1]
            self._socket.send_multipart([*envelope, protocol.encode(self._answer(payload))])

    def _answer(self, payload: bytes) -> dict[str, Any]:
        try:
            request = protocol.decode(payload)
            req_id = str(request.get("id", ""))
            op = request.get("op")
        except protocol.ProtocolError as exc:
            return protocol.reply_error("", ErrorKind.BAD_REQUEST, str(exc))
        try:
            if op == AgentOp.HELLO:
                return protocol.reply_ok(
                    req_id, pid=os.getpid(), **self.holder.to_json(), broker=self.settings.broker
                )
            if op == AgentOp.ACQUIRE:
                project = Project(_project_id(request), Path(str(request["path"])))
                result = self._acquire(
                    project,
                    wait=bool(request.get("wait")),
                    takeover=bool(request.get("takeover")),
                    work=_work(request.get("work")),
                )
                return protocol.reply_ok(req_id, **result)
            if op == AgentOp.RELEASE:
                return protocol.reply_ok(req_id, **self._flush_and_release(_project_id(request)))
            if op == AgentOp.SETTLE:
                with self._table_lock:
                    lease = self.leases.get(str(request["project"]))
                return protocol.reply_ok(req_id, clean=lease is not None and self._settle(lease))
            if op == AgentOp.NOTE_UNFLUSHED:
                project_id, token = _project_id(request), int(request["token"])
                self._note_unflushed(project_id, token, int(request.get("unflushed", 0)))
                return protocol.reply_ok(req_id)
            if op == AgentOp.MARK_DIRTY:
                result = self._mark_dirty(
                    _project_id(request), int(request["token"]), int(request.get("unflushed", 0))
                )
                return protocol.reply_ok(req_id, **result)
            if op == AgentOp.SERVE:
                return protocol.reply_ok(req_id, **self._serve(_project_id(request), _address(request)))
            if op == AgentOp.UNSERVE:
                return protocol.reply_ok(req_id, stopped=self._unserve(_project_id(request)))
            if op == AgentOp.DEPLOYED:
                return protocol.reply_ok(
                    req_id, **self._deployed(_project_id(request), int(request["token"]))
                )
            if op == AgentOp.UNDEPLOYED:
                return protocol.reply_ok(req_id, **self._undeployed(_project_id(request)))
            if op == AgentOp.REPORT:
                self._report_for(request)
                return protocol.reply_ok(req_id)
            if op == AgentOp.LEASES:
                with self._table_lock:
                    leases = [lease.public() for lease in self.leases.values()]
                    notices = list(self.notices)
                return protocol.reply_ok(req_id, leases=leases, notices=notices, holder=self.holder.to_json())
            if op == AgentOp.SHUTDOWN:
                self.stop()
                return protocol.reply_ok(req_id)
            return protocol.reply_error(req_id, ErrorKind.BAD_REQUEST, f"unknown operation {op!r}")
        except GuardError as exc:  # each class says how it travels (dbguard.errors)
            return exc.to_reply(req_id)
        except CacheError as exc:  # the cache knows nothing of dbguard: translated at this boundary
            return from_cache_error(exc).to_reply(req_id)
        except OSError as exc:
            # The agent's own files (its lease table, lock files) live in the cache directory: a
            # full disk there is said as such. Nothing else may kill the agent either.
            error = cache_disk_full(self.cache_dir, exc)
            if error is None:
                log.exception("request %s failed", op)
                error = GuardError(f"the dbguard agent failed on this request: {exc}; see its log {LOG_NAME}")
            return error.to_reply(req_id)
        except (KeyError, TypeError, ValueError) as exc:
            return protocol.reply_error(req_id, ErrorKind.BAD_REQUEST, f"malformed request: {exc!r}")
        except Exception as exc:  # nothing a request meets may kill the agent
            log.exception("request %s failed", op)
            return GuardError(
                f"the dbguard agent failed on this request: {exc!r}; see its log {LOG_NAME}"
            ).to_reply(req_id)

    def _acquire(
        self,
        project: Project,
        *,
        wait: bool,
        takeover: bool,
        reclaiming: int | None = None,
        work: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Ask the lease service for the writer lease, and take it up (`_take_up`). ``reclaiming``
        is the token of the lease this agent's predecessor held, when it takes that back."""
        unflushed = self.unflushed(project.id)
        reply = self.broker.send(
            requests.Acquire(
                project.id,
                self.holder,
                wait=wait,
                takeover=takeover,
                floor=token_floor(project),
                unflushed=unflushed,
                dirty=unflushed > 0 or self._announced(project.id),
                # For people reading status, the log and the status page (the service keys by id).
                path=str(project.path).encode(errors="replace").decode(),
                **(work or {}),
            )
        )
        if not reply["ok"]:
            raise error_from_reply(reply, self.settings.broker)
        if reply["status"] == "queued":
            return {"status": "queued", "position": reply["position"], "holder": reply.get("holder")}
        lease = HeldLease(project.id, str(project.path), reply["token"], float(reply["ttl"]), reply["since"])
        lease.last_renewed = lease.last_flush = time.monotonic()
        with self._table_lock:
            previous = self.leases.get(project.id)
            if previous is not None and previous.token == lease.token:  # a resume: still served
                lease.serve, lease.serve_bind = previous.serve, previous.serve_bind
            self.leases[project.id] = lease
        if previous is None or previous.token != lease.token or previous.state != "held":
            try:
                self._take_up(project, lease)
            except GuardError as exc:
                if reclaiming != lease.token:
                    self._give_back(project.id, lease, previous)
                    raise
                # The predecessor's own lease, resumed: the store was fenced and the record
                # written under this token when it was granted, and the cache may hold its
                # unflushed data. Given back, the project would be free with that data here;
                # kept, it is renewed as holding unflushed data until the cause is fixed.
                if isinstance(exc.__cause__, CacheError):
                    self._damaged.add(project.id)
                self._notice(project.id, f"kept the lease (token {lease.token}), but: {exc}")
        try:
            self._save()
        except OSError as exc:
            self._give_back(project.id, lease, previous)
            raise self._cache_failure(exc, _AFTER_GRANT) from exc
        self._renew_now.set()
        return {"status": "granted", **lease.public()}

    def _take_up(self, project: Project, lease: HeldLease) -> None:
        """What a new grant needs before anyone writes under it: the store learns the new token
        at once (a fence), so an earlier holder that wakes up cannot flush over this one even
        before it writes anything; the cache is made fit for it; the writer record says who
        writes. Whatever fails is a GuardError naming the file: exit 6 for damage (a file where
        a directory belongs, a damaged cache), 7 for what the share or the disk refused."""
        try:
            # The directory must still be the project (a share not mounted, another project
            # mounted or moved there): nothing is fenced or recorded in anyone else's directory.
            found = read_identity(project.path)
            if found != project.id:
                raise IntegrityError(
                    f"{project.path} now holds project {found}, not {project.id}: the share mounted there, "
                    f"or the directory, changed. Nothing was written to it; {_AFTER_GRANT}",
                    path=str(project.meta_dir),
                )
            flushing.adopt_store(self.cache_dir, project, lease.token, self._writer())
            writer = {**self._writer(), "since": _wall_text(lease.since), "token": lease.token}
            write_writer_record(project, writer=writer, token=lease.token)
        except GuardError:
            raise
        except CacheError as exc:
            raise from_cache_error(exc) from exc
        except OSError as exc:
            in_cache = exc.filename is not None and Path(str(exc.filename)).is_relative_to(self.cache_dir)
            if in_cache:
                raise self._cache_failure(exc, _AFTER_GRANT) from exc
            raise share_failure(project.meta_dir, exc, _AFTER_GRANT) from exc
        except Exception as exc:
            log.exception("taking up the lease of %s failed", project.path)
            raise GuardError(
                f"taking up the writer lease of {project.path} failed ({exc!r}); {_AFTER_GRANT}"
            ) from exc

    def _cache_failure(self, exc: OSError, then: str) -> GuardError:
        """A failure of this agent's own files in the cache directory, as a GuardError."""
        full = cache_disk_full(self.cache_dir, exc)
        if full is not None:
            return full
        where = exc.filename or self.cache_dir
        return IntegrityError(
            f"{where} in the cache directory cannot be used ({exc.strerror or exc}); move it aside "
            f"(dbguard makes it anew); {then}",
            path=str(where),
        )

    def _give_back(self, project_id: str, lease: HeldLease, previous: HeldLease | None) -> None:
        """Undo a grant this agent could not take up: the lease service frees it again, and the
        table holds what it held before (a lost lease stays listed; nothing is renewed)."""
        with self._table_lock:
            if self.leases.get(project_id) is lease:
                if previous is not None and previous.state == "lost":
                    self.leases[project_id] = previous
                else:
                    del self.leases[project_id]
        try:
            self.broker.send_ok(requests.Release(project_id, self.holder, token=lease.token))
        except GuardError as exc:
            self._notice(
                project_id,
                f"could not give back the lease (token {lease.token}) it could not take up: {exc}; "
                f"unrenewed, it ends by itself within {lease.ttl:.0f}s",
            )
        with contextlib.suppress(OSError):
            self._save()

    def _flush_and_release(self, project_id: str) -> dict[str, Any]:
        with self._table_lock:
            lease = self.leases.get(project_id)
        if lease is not None and lease.deployed and lease.state == "held":
            # Its folder on this host may hold work the share has not seen: undeploy syncs it,
            # checks it, and then releases; a plain release would strand it.
            raise UnflushedData(
                f"not released: {lease.path} is deployed on this host, and its folder may hold work "
                f"not synced yet. Run `dbguard undeploy {lease.path}` (last sync, check, release)",
                project=project_id,
                unflushed=0,
            )
        # Workers stop first: what they wrote so far is in the cache, and is flushed below.
        self._unserve(project_id)
        if lease is not None and lease.state == "held" and self.unflushed(project_id):
            result = self._flush(lease)
            unflushed = self.unflushed(project_id)
            if result is None and unflushed:
                with self._table_lock:
                    why = next(
                        (n["text"] for n in reversed(self.notices) if n["project"] == project_id),
                        "see `dbguard status`",
                    )
                raise UnflushedData(
                    f"not released: {human_size(unflushed)} of {lease.path} are unflushed on this host and "
                    f"could not be flushed ({why}). Nothing was lost and the lease is still held: fix the "
                    "cause and run `dbguard release` again",
                    project=project_id,
                    unflushed=unflushed,
                )
        return self._release(project_id)

    def _release(self, project_id: str) -> dict[str, Any]:
        with self._table_lock:
            lease = self.leases.get(project_id)
        if lease is None:
            return {"released": False, "reason": "this host holds no lease on that project"}
        self.broker.send_ok(requests.Release(project_id, self.holder, token=lease.token))
        with self._table_lock:
            self.leases.pop(project_id, None)
        self._save()
        if lease.state == "held":
            try:
                write_writer_record(lease.as_project(), writer=None, token=lease.token)
            except (OSError, GuardError) as exc:  # advisory: the broker is the authority
                log.warning("could not update the writer record of %s: %s", lease.path, exc)
        return {"released": True, "token": lease.token, "state": lease.state}


# What to do after a grant that could not be taken up (`Agent._take_up`): it was given back.
_AFTER_GRANT = (
    "then run `dbguard acquire` again. This host did not become the writer: the lease was given back"
)


def _project_id(request: dict[str, Any]) -> str:
    """A request's project id, which becomes a file name in the cache directory: a plain name."""
    project = request["project"]
    if not is_plain_name(project):
        raise ValueError(f"project id {project!r} is not a plain name ({PLAIN_NAME_RULE})")
    return str(project)


def _address(request: dict[str, Any]) -> str:
    address = request["address"]
    if not isinstance(address, str) or not address.startswith("tcp://"):
        raise ValueError(f"address {address!r} is not tcp://HOST:PORT")
    return address


def _describe_loss(result: dict[str, Any]) -> str:
    reason = result.get("reason", "unknown")
    texts = {
        "expired": "it expired without heartbeats (nothing was unflushed)",
        "orphaned": "it expired without heartbeats while data was unflushed; it is orphaned",
        "broken": "an operator broke it with `dbguard break --force`",
        "superseded": f"another holder has been granted token {result.get('current_token')}",
        "released": "it was released",
    }
    return texts.get(str(reason), str(reason))


def _wall_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def _work(value: Any) -> dict[str, Any] | None:
    """What a writer says it runs ({"command", "pid", "job"}), checked field by field: the lease
    service refuses an acquire whose fields have the wrong type."""
    if not isinstance(value, dict):
        return None
    work: dict[str, Any] = {}
    for name, kind in (("command", str), ("pid", int), ("job", str)):
        item = value.get(name)
        if isinstance(item, kind) and not isinstance(item, bool) and item != "":
            work[name] = item
    return work or None
