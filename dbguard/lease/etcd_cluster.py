"""A real etcd cluster on this machine's loopback, for `dbguard up --etcd` and for the tests.

Every member is an `etcd` process with its own client and peer port on one loopback address.
The cluster's directory holds all that a later process needs to find and control it:

    cluster.json     host, ports, member names and the cluster token (written before a start)
    member-<i>/      the member's data directory (etcd's WAL and database)
    member-<i>.log   what the member printed; each start appends after a marker line
    member-<i>.pid   the pid of the member while it runs

Members are children of the process that starts them and are reaped there. Detached members
(`start(detached=True)`, as `dbguard up` does) run in a session of their own and outlive it;
any process finds them through their pid files. A pid is trusted only while the process behind
it still runs etcd on that member's data directory, so a recycled pid is never signalled.

Only etcd's grpc-gateway JSON API (under /v3/, etcd 3.4 and later) is spoken here, over HTTP
with the standard library, so this module adds no dependency.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

from dbguard.errors import EtcdClusterError

ETCD_BINARY = "etcd"  # looked up on PATH
LAYOUT_FILE = "cluster.json"
_LAYOUT_FORMAT = 1

# The grpc-gateway's JSON API lives under /v3/ from etcd 3.4 on (3.3 had /v3beta/).
_OLDEST_VERSION = (3, 4)

# Seconds. A paused member accepts connections (the kernel queues them) but never answers, so
# every request gives up quickly rather than hold up leader() or a start.
_REQUEST_TIMEOUT = 0.5
_STOP_TIMEOUT = 10.0
_KILL_TIMEOUT = 10.0
_POLL_INTERVAL = 0.05

_LOG_TAIL_LINES = 25
_START_MARKER = "----- dbguard starts "

# What a member that is starting, stopping, paused or without quorum gives instead of an answer:
# a refused or reset connection or a timeout (OSError, which includes urllib's URLError and its
# HTTPError for an error status), a reply cut off mid-way (HTTPException) or a body that is not
# a JSON object (ValueError).
_NO_ANSWER = (OSError, http.client.HTTPException, ValueError)

# Lab machines often set http_proxy, and urllib follows it by default; a loopback member must be
# asked directly.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def etcd_unavailable() -> str | None:
    """Why a local etcd cluster cannot be started here, or None if it can."""
    path = shutil.which(ETCD_BINARY)
    if path is None:
        return (
            f"the {ETCD_BINARY} command is not on PATH; install the Debian package etcd-server "
            "(apt-get install etcd-server)"
        )
    try:
        probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} --version failed ({exc}); reinstall the Debian package etcd-server"
    found = re.search(r"etcd Version: (\d+)\.(\d+)", probe.stdout)
    if probe.returncode != 0 or found is None:
        output = (probe.stderr or probe.stdout).strip()
        return f"{path} --version exited with {probe.returncode} ({output}); reinstall etcd-server"
    version = (int(found[1]), int(found[2]))
    if version < _OLDEST_VERSION:
        return (
            f"{path} is etcd {version[0]}.{version[1]}, which lacks the /v3/ JSON API; "
            "install etcd 3.4 or newer (the Debian package etcd-server)"
        )
    return None


@dataclass(frozen=True)
class _Layout:
    """What cluster.json records: enough for another process to control the same cluster."""

    host: str
    token: str
    client_ports: list[int]
    peer_ports: list[int]
    heartbeat_ms: int
    election_ms: int
    detached: bool

    def dump(self) -> str:
        return json.dumps({"format": _LAYOUT_FORMAT, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def read(cls, directory: Path) -> _Layout | None:
        path = directory / LAYOUT_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise _damaged(path, str(exc)) from exc
        if not isinstance(data, dict) or data.get("format") != _LAYOUT_FORMAT:
            raise _damaged(path, f"not a format {_LAYOUT_FORMAT} cluster description")
        try:
            layout = cls(
                host=str(data["host"]),
                token=str(data["token"]),
                client_ports=[int(port) for port in data["client_ports"]],
                peer_ports=[int(port) for port in data["peer_ports"]],
                heartbeat_ms=int(data["heartbeat_ms"]),
                election_ms=int(data["election_ms"]),
                detached=bool(data["detached"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(path, f"bad or missing field {exc}") from exc
        if len(layout.client_ports) != len(layout.peer_ports) or not layout.client_ports:
            raise _damaged(path, "client and peer ports do not pair up")
        return layout


def _damaged(path: Path, why: str) -> EtcdClusterError:
    return EtcdClusterError(
        f"cannot use the etcd cluster description {path}: {why}; restore it, or remove "
        f"{path.parent} to make a new cluster there (its data is lost)",
        directory=str(path.parent),
    )


class EtcdCluster:
    """An etcd cluster of `size` members on `host`, kept in `directory`.

    A directory that already describes a cluster (cluster.json) is taken as it is: its ports and
    token are baked into the members' data, so a `size`, `host` or `client_ports` that disagrees
    is an error. `heartbeat_ms` and `election_ms` apply from the next start of each member.
    """

    def __init__(
        self,
        directory: Path,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        client_ports: list[int] | None = None,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
    ) -> None:
        # Resolved, so every process spells the data directories (matched in `ps`) the same way.
        self.directory = Path(directory).resolve()
        if size < 1:
            raise EtcdClusterError(f"an etcd cluster needs at least one member, not {size}")
        if client_ports is not None and len(client_ports) != size:
            raise EtcdClusterError(
                f"{len(client_ports)} client ports given for {size} members; give one per member"
            )
        # etcd itself refuses anything shorter (its config check), but only in its log.
        if election_ms < 5 * heartbeat_ms:
            raise EtcdClusterError(
                f"an election timeout of {election_ms} ms is too short for a heartbeat of "
                f"{heartbeat_ms} ms; etcd needs at least five heartbeats ({5 * heartbeat_ms} ms)"
            )
        recorded = _Layout.read(self.directory)
        if recorded is None:
            chosen = client_ports or _free_ports(host, size, avoid=())
            self._layout = _Layout(
                host=host,
                token=f"dbguard-{uuid.uuid4().hex[:16]}",
                client_ports=list(chosen),
                peer_ports=_free_ports(host, size, avoid=chosen),
                heartbeat_ms=heartbeat_ms,
                election_ms=election_ms,
                detached=False,
            )
        else:
            if (size, host) != (len(recorded.client_ports), recorded.host) or (
                client_ports is not None and client_ports != recorded.client_ports
            ):
                raise EtcdClusterError(
                    f"{self.directory} already holds a {len(recorded.client_ports)}-member etcd "
                    f"cluster on {recorded.host} ports {recorded.client_ports}, not the one asked for; "
                    "use EtcdCluster.existing() for it, or another directory for a new cluster",
                    directory=str(self.directory),
                )
            self._layout = _Layout(
                **{**asdict(recorded), "heartbeat_ms": heartbeat_ms, "election_ms": election_ms}
            )
        self.size = size
        self.host = host
        self.names = [f"m{index}" for index in range(size)]
        self.client_ports = list(self._layout.client_ports)
        self.peer_ports = list(self._layout.peer_ports)
        self.token = self._layout.token
        self.endpoints = [f"{host}:{port}" for port in self.client_ports]
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def existing(cls, directory: Path) -> EtcdCluster | None:
        """The cluster that directory/cluster.json describes, or None if there is none."""
        layout = _Layout.read(Path(directory).resolve())
        if layout is None:
            return None
        return cls(
            directory,
            len(layout.client_ports),
            host=layout.host,
            heartbeat_ms=layout.heartbeat_ms,
            election_ms=layout.election_ms,
        )

    # -- where things are

    def url(self, prefix: str | None = None) -> str:
        """The broker address of this cluster: etcd://host:port,host:port[/prefix]."""
        url = "etcd://" + ",".join(self.endpoints)
        if prefix and prefix.strip("/"):
            url += "/" + prefix.strip("/")
        return url

    def data_dir(self, index: int) -> Path:
        return self.directory / f"member-{self._check(index)}"

    def log_path(self, index: int) -> Path:
        return self.directory / f"member-{self._check(index)}.log"

    def pid_path(self, index: int) -> Path:
        return self.directory / f"member-{self._check(index)}.pid"

    def log(self, index: int) -> str:
        """Everything member `index` has printed, over all its starts."""
        try:
            return self.log_path(index).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- starting

    def start(self, *, detached: bool = False, timeout: float = 30.0) -> None:
        """Start every member that is not running, and return once the cluster has a leader and
        answers a linearizable read. With `detached`, members outlive this process.

        On failure the members started here are stopped again and EtcdClusterError says which
        member failed, with the end of its log.
        """
        deadline = time.monotonic() + timeout
        self._require_etcd()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._layout = _Layout(**{**asdict(self._layout), "detached": detached})
        _write_atomically(self.directory / LAYOUT_FILE, self._layout.dump())
        started = [index for index in range(self.size) if self._pid(index) is None]
        try:
            for index in started:
                self._launch(index)
            self._wait_serving(started, deadline, timeout)
        except BaseException:
            self._stop_members(started)
            raise

    def start_member(self, index: int, timeout: float = 30.0) -> None:
        """Start member `index` again on its data directory, and return once it answers.

        A member serves clients only after it has rejoined the cluster, which needs a majority
        of members running, itself included.
        """
        deadline = time.monotonic() + timeout
        self._require_etcd()
        pid = self._pid(index)
        if pid is not None:
            raise EtcdClusterError(
                f"etcd member {index} of {self.directory} is already running (pid {pid}); "
                "kill or stop it first",
                directory=str(self.directory),
                member=index,
            )
        self._launch(index)
        while self._status(index) is None:
            self._check_alive([index])
            if time.monotonic() >= deadline:
                self._stop_members([index])
                raise self._failure(
                    index,
                    f"did not answer within {timeout:g}s; it serves clients only once a majority "
                    f"({self.size // 2 + 1} of {self.size}) of members run",
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        """Stop every member: SIGTERM (after SIGCONT, for paused ones), then SIGKILL for any
        still running after a grace period. Data directories and cluster.json stay."""
        self._stop_members(range(self.size))

    # -- state

    def running(self) -> list[int]:
        """Indexes of the members whose process is alive (paused ones included)."""
        return [index for index in range(self.size) if self._pid(index) is not None]

    def status(self, index: int) -> dict[str, Any] | None:
        """Member `index`'s answer to /v3/maintenance/status, or None if it gives none quickly."""
        pid = self._pid(index)
        if pid is None or self._paused(pid):
            return None
        return self._status(index)

    def leader(self) -> int | None:
        """The index of the member that leads now, or None if no answering member does.

        Only a member's claim about itself counts: a follower goes on naming a leader that died
        until its election timeout passes. A leader that has lost its majority steps down within
        an election timeout (etcd runs raft with CheckQuorum). Should two members both claim the
        lead (an old leader just resumed), the one with the higher raft term is the leader.
        """
        answering = [
            index
            for index in range(self.size)
            if (pid := self._pid(index)) is not None and not self._paused(pid)
        ]
        # Asked all at once: a member that is starting accepts the connection but answers only
        # once it has joined, so asking in turn would add a request timeout per such member.
        with ThreadPoolExecutor(max_workers=self.size) as pool:
            statuses = list(pool.map(self._status, answering))
        claims: list[tuple[int, int]] = []
        for index, status in zip(answering, statuses, strict=True):
            if status is None:
                continue
            header = status.get("header", {})
            # uint64 ids and terms come as JSON strings; a member that knows no leader reports
            # "0" or, as the gateway leaves zero values out, nothing at all.
            member_id = str(header.get("member_id", "0"))
            if member_id != "0" and str(status.get("leader", "0")) == member_id:
                claims.append((int(header.get("raft_term", 0)), index))
        return max(claims)[1] if claims else None

    def wait_for_leader(self, timeout: float = 30.0, exclude: int | None = None) -> int:
        """Wait until some member other than `exclude` leads, and return its index."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None and leader != exclude:
                return leader
            if time.monotonic() >= deadline:
                running = self.running()
                raise EtcdClusterError(
                    f"no member{'' if exclude is None else f' other than {exclude}'} of the etcd "
                    f"cluster in {self.directory} led within {timeout:g}s (leader now: {leader}, "
                    f"running: {running}); a leader needs a majority ({self.size // 2 + 1} of "
                    f"{self.size}) of members running\n{self._tails(running)}",
                    directory=str(self.directory),
                )
            time.sleep(_POLL_INTERVAL)

    # -- internals

    def _check(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"member index {index} out of range for a {self.size}-member cluster")
        return index

    def _require_etcd(self) -> None:
        why = etcd_unavailable()
        if why is not None:
            raise EtcdClusterError(
                f"cannot start an etcd cluster in {self.directory}: {why}", directory=str(self.directory)
            )

    def _argv(self, index: int) -> list[str]:
        layout = self._layout
        client = f"http://{self.host}:{self.client_ports[index]}"
        peers = [f"http://{self.host}:{port}" for port in self.peer_ports]
        return [
            shutil.which(ETCD_BINARY) or ETCD_BINARY,
            "--name",
            self.names[index],
            "--data-dir",
            str(self.data_dir(index)),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peers[index],
            "--initial-advertise-peer-urls",
            peers[index],
            "--initial-cluster",
            ",".join(f"{name}={peer}" for name, peer in zip(self.names, peers, strict=True)),
            # etcd reads the --initial-* flags only while a data directory is empty; a member
            # restarted on its data takes membership from its WAL, so "new" fits every start.
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            layout.token,
            "--heartbeat-interval",
            str(layout.heartbeat_ms),
            "--election-timeout",
            str(layout.election_ms),
            # etcd keeps every revision until compacted; a long-lived `dbguard up` would grow
            # until the space-quota alarm, after which etcd refuses every write.
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1h",
            # 3.4's default logger (capnslog) is deprecated; zap writes one JSON object a line.
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]

    def _launch(self, index: int) -> None:
        detached = self._layout.detached
        # ETCD_* variables are flags to etcd; one left in the caller's environment (say from a
        # site's /etc/default/etcd) would quietly change a member.
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        with self.log_path(index).open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            how = "detached" if detached else f"as a child of pid {os.getpid()}"
            log.write(f"{_START_MARKER}{self.names[index]} at {stamp}, {how} -----\n".encode())
            log.flush()
            process = subprocess.Popen(
                self._argv(index),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=detached,
            )
        self._children[index] = process
        _write_atomically(self.pid_path(index), f"{process.pid}\n")

    def _wait_serving(self, started: list[int], deadline: float, timeout: float) -> None:
        while True:
            self._check_alive(started)
            leader = self.leader()
            if leader is not None and self._linearizable_read(leader):
                return
            if time.monotonic() >= deadline:
                raise EtcdClusterError(
                    f"the etcd cluster in {self.directory} did not elect a leader and answer a "
                    f"read within {timeout:g}s (running: {self.running()}); see the member logs "
                    f"in {self.directory}\n{self._tails(range(self.size))}",
                    directory=str(self.directory),
                )
            time.sleep(_POLL_INTERVAL)

    def _check_alive(self, indexes: Iterable[int]) -> None:
        for index in indexes:
            child = self._children.get(index)
            if child is not None and child.poll() is not None:
                del self._children[index]
                self.pid_path(index).unlink(missing_ok=True)
                what = f"exited with status {child.returncode} while starting"
                if "address already in use" in self._tail(index):
                    what += (
                        "; another program holds one of its ports: stop that program, or make the "
                        "cluster in a new directory, which chooses free ports"
                    )
                raise self._failure(index, what)

    def _linearizable_read(self, index: int) -> bool:
        # A range without "serializable" goes through raft's ReadIndex: it succeeds only while
        # the member can confirm a leader with a majority behind it.
        body = {"key": b64encode(b"dbguard/ready").decode()}
        try:
            _post(self.endpoints[index], "/v3/kv/range", body, _REQUEST_TIMEOUT)
        except _NO_ANSWER:
            return False
        return True

    def _status(self, index: int) -> dict[str, Any] | None:
        try:
            return _post(self.endpoints[index], "/v3/maintenance/status", {}, _REQUEST_TIMEOUT)
        except _NO_ANSWER:
            return None

    def _pid(self, index: int) -> int | None:
        """The pid of member `index` if it is running, else None."""
        child = self._children.get(index)
        if child is not None and child.poll() is not None:
            del self._children[index]  # reaped by poll()
        try:
            text = self.pid_path(index).read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            return None
        try:
            process = psutil.Process(int(text))
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            argv = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        # Pid files outlive their processes and the kernel reuses pids: the pid counts only
        # while it still runs etcd on this member's data directory.
        if str(self.data_dir(index)) not in argv:
            return None
        return int(process.pid)

    def member_pid(self, index: int) -> int:
        """The pid of member `index`, which must be running."""
        pid = self._pid(index)
        if pid is None:
            raise EtcdClusterError(
                f"etcd member {index} of {self.directory} is not running; start it with start_member()",
                directory=str(self.directory),
                member=index,
            )
        return pid

    @staticmethod
    def _paused(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)
        except psutil.NoSuchProcess:
            return False

    def wait_gone(self, index: int, pid: int, timeout: float) -> bool:
        """Whether member `index`'s process `pid` exits within `timeout` (reaped if ours)."""
        deadline = time.monotonic() + timeout
        child = self._children.get(index)
        while True:
            if child is not None and child.pid == pid:
                if child.poll() is not None:
                    del self._children[index]
                    return True
            elif _gone(pid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)

    def _stop_members(self, indexes: Iterable[int]) -> None:
        wanted = set(indexes)
        # A leader told to stop first hands its lead to the follower it has heard from longest
        # (etcd's leadership transfer on shutdown) and waits up to 5 s + two election timeouts
        # for it, in vain if that follower is stopping too. Followers go first; the leader
        # notices a follower gone when a heartbeat to it fails, and with none left it hands over
        # nothing and exits at once.
        leader = self.leader() if len(wanted) > 1 else None
        self._terminate(sorted(wanted - {leader}))
        if leader in wanted:
            time.sleep(2 * self._layout.heartbeat_ms / 1000)
            self._terminate([leader])

    def _terminate(self, indexes: list[int]) -> None:
        pids = {index: pid for index in indexes if (pid := self._pid(index)) is not None}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                # A stopped process would not act on SIGTERM until continued.
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        for index, pid in pids.items():
            if not self.wait_gone(index, pid, max(0.0, deadline - time.monotonic())):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self.wait_gone(index, pid, _KILL_TIMEOUT):
                    raise self._failure(index, f"(pid {pid}) survived SIGTERM and SIGKILL")
            self.pid_path(index).unlink(missing_ok=True)

    def _failure(self, index: int, what: str) -> EtcdClusterError:
        return EtcdClusterError(
            f"etcd member {index} ({self.names[index]}, client {self.endpoints[index]}) of the "
            f"cluster in {self.directory} {what}; the end of its log {self.log_path(index)}:\n"
            f"{self._tail(index)}",
            directory=str(self.directory),
            member=index,
        )

    def _tail(self, index: int, lines: int = _LOG_TAIL_LINES) -> str:
        text = self.log(index)
        # Only the latest start matters; each start begins with a marker line.
        latest = text[max(0, text.rfind(_START_MARKER)) :]
        return "\n".join(latest.splitlines()[-lines:])

    def _tails(self, indexes: Iterable[int]) -> str:
        return "\n".join(f"--- member {index} ---\n{self._tail(index, 8)}" for index in indexes)


def _post(endpoint: str, path: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://{endpoint}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _OPENER.open(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    if not isinstance(answer, dict):
        raise ValueError(f"{path} answered {answer!r}, not a JSON object")
    return answer


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited; reaps it if it is an unwaited child of this process
    (a cluster found with existing() in the process that started it)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _free_ports(host: str, count: int, avoid: Iterable[int]) -> list[int]:
    """`count` distinct ports free on `host` now, none of them in `avoid`.

    Every probe stays bound until all are chosen, so the kernel cannot hand out one twice.
    Another program may still take a port before etcd binds it; that member's log then says so.
    """
    unwanted = set(avoid)
    with contextlib.ExitStack() as probes:
        ports: list[int] = []
        while len(ports) < count:
            probe = probes.enter_context(socket.socket())
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
            if port not in unwanted:
                ports.append(port)
        return ports


def _write_atomically(path: Path, text: str) -> None:
    # Another process may read the file at any moment (`dbguard down` while `up` writes).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
