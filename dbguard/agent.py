"""The local agent: one per host, user and cache directory, started on demand like ssh-agent.

It holds this host's leases and renews them with one batched heartbeat per interval, reports
how many bytes each project has unflushed in the cache, answers takeover requests by releasing,
and notices when a lease it held was lost, so `dbguard status` can say so. User processes talk
to it over a ZeroMQ ipc socket inside the cache directory (0700, so only its user can connect).

The leases it holds are also written to ``leases.json`` in the cache directory, so that an
agent restarted after a crash reclaims them before their TTL runs out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from cache import CacheStore
from dbguard import protocol
from dbguard.client import Client, error_from_reply
from dbguard.errors import GuardError, LeaseHeld
from dbguard.leases import Holder
from dbguard.project import Project, token_floor, write_writer_record
from dbguard.protocol import AgentOp, ErrorKind, Op
from dbguard.settings import Settings

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

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("last_renewed")
        return data


class AgentAlreadyRunning(GuardError):
    pass


class Agent:
    def __init__(self, settings: Settings, cache_dir: Path) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self._lock_fd = self._lock()
        self.holder = Holder(settings.host, settings.user, uuid.uuid4().hex, str(cache_dir))
        self.broker = Client(settings.broker, timeout=settings.request_timeout)
        self.leases: dict[str, HeldLease] = {}
        self.notices: list[dict[str, Any]] = []
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock_path = cache_dir / SOCKET_NAME
        sock_path.unlink(missing_ok=True)  # a crashed predecessor's; we hold the lock
        self._socket.bind(socket_address(cache_dir))
        self._running = True
        self._next_heartbeat = 0.0

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
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while self._running:
                wait = max(0.0, self._next_heartbeat - time.monotonic()) if self._live_leases() else 1.0
                if poller.poll(int(wait * 1000) + 1):
                    self._serve_local()
                if self._live_leases() and time.monotonic() >= self._next_heartbeat:
                    self._heartbeat()
        finally:
            self._socket.close()
            self.broker.close()
            os.close(self._lock_fd)

    def stop(self) -> None:
        self._running = False

    def _live_leases(self) -> list[HeldLease]:
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
                continue
            try:
                self._acquire(Project(lease.project, Path(lease.path)), wait=False, takeover=False)
                self._notice(
                    lease.project,
                    f"reclaimed the lease (token {self.leases[lease.project].token}) after an agent restart",
                )
            except GuardError as exc:
                lease.state, lease.reason = "lost", f"could not reclaim after an agent restart: {exc}"
                self.leases[lease.project] = lease
                self._notice(lease.project, lease.reason)
        self._save()

    def _save(self) -> None:
        temp = self.cache_dir / f".{LEASES_NAME}.tmp"
        temp.write_text(json.dumps([lease.public() for lease in self.leases.values()], indent=1))
        os.replace(temp, self.cache_dir / LEASES_NAME)

    def _notice(self, project: str, text: str) -> None:
        log.warning("%s: %s", project, text)
        self.notices.append({"project": project, "at": time.time(), "text": text})
        del self.notices[:-50]

    # ------------------------------------------------------------ heartbeats

    def unflushed(self, project: str) -> int:
        return CacheStore.dirty_bytes_of(self.cache_dir, project)

    def _heartbeat(self) -> None:
        live = self._live_leases()
        now = time.monotonic()
        interval = min(protocol.heartbeat_interval(lease.ttl) for lease in live)
        self._next_heartbeat = now + interval
        items = [
            {"project": lease.project, "token": lease.token, "unflushed": self.unflushed(lease.project)}
            for lease in live
        ]
        try:
            reply = self.broker.call_ok(
                Op.RENEW, holder=self.holder.to_json(), leases=items, timeout=interval
            )
        except GuardError as exc:
            for lease in live:
                # Past its TTL without a renewal the broker may have let the lease go: say so
                # rather than claim it. Fencing keeps the project safe either way.
                if now - lease.last_renewed > lease.ttl and lease.state == "held":
                    lease.state, lease.reason = "uncertain", str(exc)
                    self._notice(lease.project, f"cannot reach the broker to renew: {exc}")
            return
        changed = False
        for result in reply["results"]:
            held = self.leases.get(result["project"])
            if held is None:
                continue
            if result["ok"]:
                held.state, held.reason, held.last_renewed = "held", "", now
                held.ttl = float(result["ttl"])
                if result.get("takeover_by") and held.takeover_by != result["takeover_by"]:
                    held.takeover_by = result["takeover_by"]
                    self._hand_over(held)
                    changed = True
            else:
                held.state = "lost"
                held.reason = _describe_loss(result)
                self._notice(held.project, f"lease lost: {held.reason}")
                changed = True
        if changed:
            self._save()

    def _hand_over(self, lease: HeldLease) -> None:
        """Another host asked for a takeover: give the lease up so the broker can grant it."""
        self._notice(lease.project, f"takeover requested by {lease.takeover_by}; releasing")
        self._release(lease.project)

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
                return protocol.reply_ok(req_id, **self._release(str(request["project"])))
            if op == AgentOp.LEASES:
                return protocol.reply_ok(
                    req_id,
                    leases=[lease.public() for lease in self.leases.values()],
                    notices=self.notices,
                    holder=self.holder.to_json(),
                )
            if op == AgentOp.SHUTDOWN:
                self.stop()
                return protocol.reply_ok(req_id)
            return protocol.reply_error(req_id, ErrorKind.BAD_REQUEST, f"unknown operation {op!r}")
        except LeaseHeld as exc:
            return protocol.reply_error(req_id, ErrorKind.HELD, exc.message, holder=exc.holder)
        except GuardError as exc:
            kind = ErrorKind.UNAVAILABLE if exc.exit_code == 4 else ErrorKind.INTERNAL
            return protocol.reply_error(req_id, kind, exc.message)
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
        lease.last_renewed = time.monotonic()
        previous = self.leases.get(project.id)
        self.leases[project.id] = lease
        self._save()
        if previous is None or previous.token != lease.token or previous.state != "held":
            writer = {
                "host": self.holder.host,
                "user": self.holder.user,
                "since": _wall_text(lease.since),
                "token": lease.token,
            }
            write_writer_record(project, writer=writer, token=lease.token)
        self._next_heartbeat = min(
            self._next_heartbeat, time.monotonic() + protocol.heartbeat_interval(lease.ttl)
        )
        return {"status": "granted", **lease.public()}

    def _release(self, project_id: str) -> dict[str, Any]:
        lease = self.leases.get(project_id)
        if lease is None:
            return {"released": False, "reason": "this host holds no lease on that project"}
        self.broker.call_ok(Op.RELEASE, project=project_id, holder=self.holder.to_json(), token=lease.token)
        del self.leases[project_id]
        self._save()
        if lease.state == "held":
            try:
                write_writer_record(Project(project_id, Path(lease.path)), writer=None, token=lease.token)
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
