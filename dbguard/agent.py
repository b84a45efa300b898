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
restarted after a crash reclaims them, and writing processes check them there (writer_guard).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
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

from cache import CacheError, CacheStore
from dbguard import flushing, protocol
from dbguard.client import error_from_reply
from dbguard.errors import ExitCode, Fenced, GuardError, LeaseHeld
from dbguard.lease_service import LeaseService, for_broker
from dbguard.leases import Holder
from dbguard.project import Project, token_floor, write_writer_record
from dbguard.project_store import FlushResult
from dbguard.protocol import AgentOp, ErrorKind, Op
from dbguard.settings import Settings
from dbguard.units import human_size

log = logging.getLogger("dbguard.agent")

SOCKET_NAME = "agent.sock"
LOCK_NAME = "agent.lock"
LOG_NAME = "agent.log"
LEASES_NAME = "leases.json"


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
    last_renewed: float = field(default=0.0, repr=False)  # monotonic; not persisted
    last_flush: float = field(default=0.0, repr=False)  # monotonic; not persisted

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("last_renewed")
        data.pop("last_flush")
        return data

    def as_project(self) -> Project:
        return Project(self.project, Path(self.path))


class AgentAlreadyRunning(GuardError):
    pass


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
        self._renew_now = threading.Event()

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
            signal.signal(signum, lambda *_: self.stop())
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
                    self._serve_local()
                self._do_work()
                self._flush_due()
        finally:
            self._stopping.set()
            heartbeats.join(timeout=5)
            self._socket.close()
            self.broker.close()
            os.close(self._lock_fd)

    def stop(self) -> None:
        self._stopping.set()
        self._renew_now.set()  # wake the heartbeat thread instead of waiting out its interval

    def _live_leases(self) -> list[HeldLease]:
        with self._table_lock:
            return [lease for lease in self.leases.values() if lease.state != "lost"]

    def _reclaim(self) -> None:
        """Take back what the previous agent of this cache directory held."""
        try:
            saved = json.loads((self.cache_dir / LEASES_NAME).read_text())
        except (OSError, ValueError):
            return
        for item in saved:
            lease = HeldLease(**item)
            if lease.state == "lost":
                self.leases[lease.project] = lease
                continue
            try:
                self._acquire(lease.as_project(), wait=False, takeover=False)
                self._notice(
                    lease.project,
                    f"reclaimed the lease (token {self.leases[lease.project].token}) after an agent restart",
                )
            except LeaseHeld as exc:
                who = (
                    f"{exc.holder.get('user')} on {exc.holder.get('host')}" if exc.holder else "another host"
                )
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
        self._save()

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
        except CacheError as exc:
            # A damaged cache may hold unflushed records: say so (a lease that then expires is
            # orphaned, not freed) and keep renewing, rather than let the heartbeat thread die.
            if project not in self._damaged:
                self._damaged.add(project)
                self._notice(project, str(exc))
            return 1

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
                self._heartbeat(client, self._live_leases(), interval)
        finally:
            client.close()

    def _heartbeat(self, client: LeaseService, live: list[HeldLease], interval: float) -> None:
        if not live:
            return
        now = time.monotonic()
        items = [
            {"project": lease.project, "token": lease.token, "unflushed": self.unflushed(lease.project)}
            for lease in live
        ]
        try:
            reply = client.call_ok(Op.RENEW, holder=self.holder.to_json(), leases=items, timeout=interval)
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
        try:
            result = flushing.flush_project(
                self.cache_dir, lease.as_project(), lease.token, writer=self._writer()
            )
        except Fenced as exc:
            with self._table_lock:
                lease.state, lease.reason = "lost", "a newer writer's token fenced this host's flush"
            self._notice(lease.project, f"flush refused, data kept aside: {exc}")
            self._save()
            return None
        except (GuardError, CacheError) as exc:
            self._notice(lease.project, f"flush failed, will retry: {exc}")
            return None
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
        return result

    def _hand_over(self, lease: HeldLease) -> None:
        """Another host asked for a takeover: flush, then give the lease up."""
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
        """A lost lease's unflushed data must neither be flushed over the new writer nor deleted."""
        with flushing.flush_lock(self.cache_dir, lease.project):
            dirty = self.unflushed(lease.project)
            if dirty:
                where = flushing.set_aside(self.cache_dir, lease.project, lease.token, lease.reason)
                self._notice(
                    lease.project,
                    f"kept {human_size(dirty)} of unflushed data aside in {where}; see `dbguard recover`",
                )

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
                project = Project(str(request["project"]), Path(str(request["path"])))
                result = self._acquire(
                    project, wait=bool(request.get("wait")), takeover=bool(request.get("takeover"))
                )
                return protocol.reply_ok(req_id, **result)
            if op == AgentOp.RELEASE:
                return protocol.reply_ok(req_id, **self._flush_and_release(str(request["project"])))
            if op == AgentOp.LEASES:
                with self._table_lock:
                    leases = [lease.public() for lease in self.leases.values()]
                    notices = list(self.notices)
                return protocol.reply_ok(req_id, leases=leases, notices=notices, holder=self.holder.to_json())
            if op == AgentOp.SHUTDOWN:
                self.stop()
                return protocol.reply_ok(req_id)
            return protocol.reply_error(req_id, ErrorKind.BAD_REQUEST, f"unknown operation {op!r}")
        except LeaseHeld as exc:
            return protocol.reply_error(req_id, ErrorKind.HELD, exc.message, holder=exc.holder)
        except Fenced as exc:
            return protocol.reply_error(req_id, ErrorKind.INTEGRITY, exc.message)
        except GuardError as exc:
            kinds = {ExitCode.UNREACHABLE: ErrorKind.UNAVAILABLE, ExitCode.INTEGRITY: ErrorKind.INTEGRITY}
            return protocol.reply_error(req_id, kinds.get(exc.exit_code, ErrorKind.INTERNAL), exc.message)
        except CacheError as exc:  # a damaged cache: the command exits 6 and names it
            return protocol.reply_error(req_id, ErrorKind.INTEGRITY, str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return protocol.reply_error(req_id, ErrorKind.BAD_REQUEST, f"malformed request: {exc!r}")

    def _acquire(self, project: Project, *, wait: bool, takeover: bool) -> dict[str, Any]:
        reply = self.broker.call(
            Op.ACQUIRE,
            project=project.id,
            holder=self.holder.to_json(),
            wait=wait,
            takeover=takeover,
            floor=token_floor(project),
            unflushed=self.unflushed(project.id),
        )
        if not reply["ok"]:
            raise error_from_reply(reply, self.settings.broker)
        if reply["status"] == "queued":
            return {"status": "queued", "position": reply["position"], "holder": reply.get("holder")}
        lease = HeldLease(project.id, str(project.path), reply["token"], float(reply["ttl"]), reply["since"])
        lease.last_renewed = lease.last_flush = time.monotonic()
        with self._table_lock:
            previous = self.leases.get(project.id)
            self.leases[project.id] = lease
        if previous is None or previous.token != lease.token or previous.state != "held":
            try:
                # The store learns the new token at once (a fence), so an earlier holder that
                # wakes up cannot flush over this one even before it writes anything.
                flushing.adopt_store(self.cache_dir, project, lease.token, self._writer())
                writer = {**self._writer(), "since": _wall_text(lease.since), "token": lease.token}
                write_writer_record(project, writer=writer, token=lease.token)
            except (GuardError, CacheError):
                self._release(project.id)
                raise
        self._save()
        self._renew_now.set()
        return {"status": "granted", **lease.public()}

    def _flush_and_release(self, project_id: str) -> dict[str, Any]:
        with self._table_lock:
            lease = self.leases.get(project_id)
        if lease is not None and lease.state == "held" and self.unflushed(project_id):
            result = self._flush(lease)
            if result is None and self.unflushed(project_id):
                raise GuardError(
                    "not released: this host's unflushed data could not be flushed (see `dbguard status`); "
                    "fix the cause and run `dbguard release` again"
                )
        return self._release(project_id)

    def _release(self, project_id: str) -> dict[str, Any]:
        with self._table_lock:
            lease = self.leases.get(project_id)
        if lease is None:
            return {"released": False, "reason": "this host holds no lease on that project"}
        self.broker.call_ok(Op.RELEASE, project=project_id, holder=self.holder.to_json(), token=lease.token)
        with self._table_lock:
            self.leases.pop(project_id, None)
        self._save()
        if lease.state == "held":
            try:
                write_writer_record(lease.as_project(), writer=None, token=lease.token)
            except OSError as exc:
                log.warning("could not update the writer record of %s: %s", lease.path, exc)
        return {"released": True, "token": lease.token, "state": lease.state}


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
