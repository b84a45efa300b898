"""The multi-host test bed: real broker and agent processes, hosts simulated on one machine.

A simulated host runs every command inside its own UTS namespace (`unshare --uts`), so
`socket.gethostname()` names the host, and the agent a command starts inherits that name. Each
host has its own cache directory and its own settings, and reaches the broker over loopback.
Helpers kill (SIGKILL) or pause (SIGSTOP/SIGCONT) a host's agent or the broker.

Used by the tests; usable by hand from a Python prompt as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from dbguard.errors import BrokerUnavailable
from dbguard.lease import keys as dbguard_keys
from dbguard.lease.client import Client
from dbguard.lease.etcd import EtcdLeases, configure
from dbguard.lease.etcd_cluster import EtcdCluster
from tools.etcd_faults import kill_member, pause_member, resume_member
from tools.sshfs import Mount, SshServer

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def namespaces_unavailable() -> str | None:
    """Why hosts cannot be simulated here, or None if they can."""
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = subprocess.run(
        ["unshare", "--uts", "hostname", "probe-host"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create a UTS namespace (needs root): {probe.stderr.strip()}"
    return None


class LeaseBackend(Protocol):
    """What the tests ask of a lease service, whichever implements it: the embedded broker
    (`BrokerProcess`) or an etcd cluster (`EtcdBackend`)."""

    kind: str
    address: str  # what DBGUARD_BROKER is set to

    def restart(self) -> None:
        """Crash the service (SIGKILL) and bring it back on the same durable state."""

    def lose_state(self) -> None:
        """Crash the service and bring it back with its durable lease state gone."""

    def log(self) -> str: ...


class BrokerProcess:
    """A real `dbguard broker` process on a fixed loopback port, restartable on the same state."""

    kind = "embedded"

    def __init__(
        self,
        state_dir: Path,
        *,
        ttl: float,
        lock_delay: float,
        grace: float | None = None,
        keys: Path | None = None,
        client_keys: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        # keys: the broker's keys directory (a site with CURVE); client_keys: the keys the test
        # process itself uses to ask the broker (hello, status).
        self.keys = keys
        self.client_keys = client_keys
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.ttl, self.lock_delay, self.grace = ttl, lock_delay, grace if grace is not None else ttl
        self.log_path = state_dir.parent / f"broker-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
            PYTHON,
            "-m",
            "dbguard",
            "broker",
            "--address",
            self.address,
            "--state",
            str(self.state_dir),
            "--ttl",
            str(self.ttl),
            "--lock-delay",
            str(self.lock_delay),
            "--grace",
            str(self.grace),
        ]
        env = {key: value for key, value in os.environ.items() if key != "DBGUARD_KEYS"}
        if self.keys is not None:
            env["DBGUARD_KEYS"] = str(self.keys)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client(timeout=0.3, attempts=1) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"broker exited with {self.process.returncode}:\n{self.log()}")
                with contextlib.suppress(BrokerUnavailable):
                    client.call_ok("hello")
                    return
        raise RuntimeError(f"broker did not answer within {timeout}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or closed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def lose_state(self) -> None:
        self.kill()
        shutil.rmtree(self.state_dir)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def client(self, timeout: float = 3.0, attempts: int = 3) -> Client:
        keys = dbguard_keys.client_keys(self.client_keys) if self.client_keys else None
        return Client(self.address, timeout=timeout, attempts=attempts, keys=keys)


class EtcdBackend:
    """The lease service on a real etcd cluster, under a key prefix of this test's own, so that
    tests can share one cluster; the site's timing is stored there as `dbguard up --etcd` does."""

    kind = "etcd"

    def __init__(self, cluster: EtcdCluster, prefix: str, *, ttl: float, lock_delay: float) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.address = cluster.url(prefix)
        self.ttl, self.lock_delay = ttl, lock_delay
        self._paused: set[int] = set()
        configure(self.address, ttl=ttl, lock_delay=lock_delay)

    def restart(self) -> None:
        """The leader crashes and comes back: the remaining majority carries on meanwhile."""
        leader = self.cluster.wait_for_leader()
        kill_member(self.cluster, leader)
        self.cluster.wait_for_leader(exclude=leader)
        self.cluster.start_member(leader)

    # The verbs the chaos tool uses on the broker, acted out on the member that matters most:
    # the leader.

    def kill(self) -> None:
        """SIGKILL the leader (as a crash); `start` brings it back."""
        leader = self.cluster.leader()
        if leader is not None:
            kill_member(self.cluster, leader)

    def start(self) -> None:
        for index in sorted(set(range(len(self.cluster.endpoints))) - set(self.cluster.running())):
            self.cluster.start_member(index)

    def signal(self, signum: int) -> None:
        """SIGSTOP freezes the leader; SIGCONT resumes every frozen member."""
        if signum == signal.SIGSTOP:
            leader = self.cluster.leader()
            if leader is not None:
                pause_member(self.cluster, leader)
                self._paused.add(leader)
        elif signum == signal.SIGCONT:
            for index in sorted(self._paused):
                resume_member(self.cluster, index)
            self._paused.clear()

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.cluster.stop()

    def lose_state(self) -> None:
        """Every key of this site is gone, as after restoring etcd from nothing."""
        with EtcdLeases(self.address) as leases:
            leases.transport.delete_prefix(leases.root)
        configure(self.address, ttl=self.ttl, lock_delay=self.lock_delay)

    def log(self) -> str:
        return "\n".join(
            f"----- etcd member {index} -----\n{self.cluster.log(index)[-4000:]}"
            for index in range(len(self.cluster.endpoints))
        )


class _AgentOnHost:
    """What both kinds of simulated host share: running commands with the host's settings, and
    reaching its agent; ``cache`` is where the host keeps it."""

    cache: Path
    name: str
    env: dict[str, str]

    def _run(
        self, argv: list[str], timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def _popen(self, argv: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def agent_pid(self) -> int | None:
        """The pid of this host's agent, or None. A pid written by an agent that has ended may
        be anyone's now (another test's command, which `kill_agent` would SIGKILL): it counts
        only if that process is an agent started for this host (`_ours`)."""
        try:
            text = (self.cache / "agent.lock").read_text().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        # Hosts share the pid namespace, so the pid the agent wrote is valid here too.
        try:
            process = psutil.Process(int(text))
            if process.status() == psutil.STATUS_ZOMBIE or "agent" not in process.cmdline():
                return None
            return int(text) if self._ours(process) else None
        except psutil.Error:
            return None

    def _ours(self, process: psutil.Process) -> bool:
        """Whether ``process`` was started for this host (an agent is given its cache)."""
        return bool(process.environ().get("DBGUARD_CACHE") == str(self.cache))

    def signal_agent(self, signum: int) -> None:
        pid = self.agent_pid()
        if pid is None:
            raise RuntimeError(f"host {self.name} has no agent running")
        os.kill(pid, signum)

    def kill_agent(self) -> None:
        """SIGKILL the agent and wait until it is gone."""
        pid = self.agent_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)

    def agent_log(self) -> str:
        try:
            return (self.cache / "agent.log").read_text(errors="replace")
        except OSError:
            return ""


class Host(_AgentOnHost):
    """A simulated host: its own hostname, cache directory, settings and agent."""

    def __init__(self, name: str, root: Path, broker: LeaseBackend, **settings: str) -> None:
        self.name = name
        self.root = root / name
        self.cache = self.root / "cache"
        self.root.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.env = {
            **os.environ,
            "DBGUARD_BROKER": broker.address,
            "DBGUARD_CACHE": str(self.cache),
            "DBGUARD_REQUEST_TIMEOUT": "3",
            # Keep the user's own state and config out of the tests.
            "XDG_STATE_HOME": str(self.root / "state"),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            **{f"DBGUARD_{key.upper()}": value for key, value in settings.items()},
        }

    def on_host(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host: unshare gives it (and any agent it starts) a UTS namespace
        of its own; the shell names the host and then becomes the command."""
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]

    def command(self, args: Sequence[str]) -> list[str]:
        return self.on_host([PYTHON, "-m", "dbguard", *args])

    def run(
        self, *args: str, timeout: float = 60.0, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `dbguard ARGS` on this host and return its result (never raises on exit codes)."""
        return self._run(self.command(args), timeout, cwd=cwd)

    def python(self, script: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a Python script on this host (its hostname, cache and settings)."""
        return self._run(self.on_host([PYTHON, "-c", script]), timeout)

    def popen_python(self, script: str) -> subprocess.Popen[str]:
        return self._popen(self.on_host([PYTHON, "-c", script]))

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return self._popen(self.command(args))

    def stop(self) -> None:
        self.kill_agent()


MARK = "DBGUARD_TEST_SIMHOST"  # the environment variable that marks a SimHost's processes


def _alive(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # A killed daemon stays a zombie until whoever adopted it reaps it; dead is dead.
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)


def wait_for(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass; return the last result."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        result = bool(predicate())
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _needed_under_tmp() -> list[Path]:
    """The checkout and the Python installation, where they lie under /tmp (a CI clone, a
    worktree, a venv in either): a host with its own /tmp must still run them."""
    candidates = {
        Path(__file__).resolve().parent.parent,
        Path(sys.prefix).resolve(),
        Path(sys.base_prefix).resolve(),
    }
    candidates |= {Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    under = sorted(p for p in candidates if p.is_relative_to("/tmp") and p != Path("/tmp"))
    # Nested paths ride along with their outermost directory.
    return [p for p in under if not any(p != q and p.is_relative_to(q) for q in under)]


class SimHost(_AgentOnHost):
    """A whole simulated host: its own hostname, a private /tmp (so its own default cache and
    agent), and its own sshfs mount of the shared project directory at a path of its own.

    An init process holds the host's UTS and mount namespaces; every command of the host joins
    them with nsenter, so commands, the agent they start and the sshfs mount share one view.
    Killing or pausing the host signals every process in its namespaces, sshfs included, as a
    crash or a frozen machine would.
    """

    def __init__(
        self,
        name: str,
        root: Path,
        broker: BrokerProcess,
        server: SshServer,
        shared: Path,
        mount_path: str,
        **settings: str,
    ) -> None:
        self.name = name
        # The host's /tmp, kept across crashes and restarts like a disk-backed /tmp: the data a
        # crashed writer had not flushed is still there when it comes back.
        self.tmp = root / name / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.tmp.chmod(0o1777)
        self.broker = broker
        self.server = server
        self.shared = shared
        self.project = Path(mount_path)  # where this host sees the shared project directory
        self.env = {
            key: value for key, value in os.environ.items() if not key.startswith(("DBGUARD_", "XDG_"))
        }
        # Agents flush only when told to unless a setting says otherwise: periodic flushes would
        # make "unflushed" figures depend on timing.
        self.env.update(
            DBGUARD_BROKER=broker.address,
            DBGUARD_REQUEST_TIMEOUT="3",
            DBGUARD_FLUSH_INTERVAL="3600",
            HOME="/tmp/home",
        )
        self.env.update({f"DBGUARD_{key.upper()}": value for key, value in settings.items()})
        # Every process started for this host carries the mark (see `processes`).
        self.mark = uuid.uuid4().hex
        self.env[MARK] = self.mark
        self.uts = ""
        self.init: subprocess.Popen[str] | None = None
        self.pid = 0
        self.mount: Mount | None = None

    def start(self) -> SimHost:
        # The mount points live on a private tmpfs over /mnt, so nothing is created outside.
        # What the host must still see of the real /tmp (a checkout or a venv there, as in CI)
        # is bound aside first and back to the same paths over the host's own /tmp.
        keep = [str(path) for path in _needed_under_tmp()]
        stash = " && ".join(
            f"mkdir -p /mnt/.keep/{n} && mount --bind {p} /mnt/.keep/{n}" for n, p in enumerate(keep)
        )
        restore = " && ".join(f"mkdir -p {p} && mount --bind /mnt/.keep/{n} {p}" for n, p in enumerate(keep))
        setup = " && ".join(
            part
            for part in (
                'hostname "$0" && mount --make-rprivate / && mount -t tmpfs tmpfs /mnt',
                stash,
                f"mount --bind {self.tmp} /tmp",
                restore,
                f"mkdir -p /tmp/home {self.project} && echo $$ && exec sleep infinity",
            )
            if part
        )
        self.init = subprocess.Popen(
            ["unshare", "--uts", "--mount", "--fork", "sh", "-c", setup, self.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert self.init.stdout is not None
        line = self.init.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(
                f"host {self.name} did not start: {self.init.stderr.read() if self.init.stderr else ''}"
            )
        self.pid = int(line)
        self.uts = os.readlink(f"/proc/{self.pid}/ns/uts")
        key = self.tmp / ".sshfs-key"
        shutil.copyfile(self.server.client_key, key)
        key.chmod(0o600)
        self.mount = self.server.mount(
            self.shared,
            self.project,
            enter=self.enter(),
            namespace_pid=self.pid,
            identity=Path("/tmp/.sshfs-key"),
        )
        return self

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-u", "-m", "--"]

    def _ours(self, process: psutil.Process) -> bool:
        # Every SimHost's agent uses the same path inside its own /tmp: the mark tells them apart.
        return bool(process.environ().get(MARK) == self.mark)

    def path(self, inside: str | Path) -> Path:
        """A path of this host as the test process can reach it (through /proc/PID/root)."""
        return Path(f"/proc/{self.pid}/root") / str(inside).lstrip("/")

    @property
    def cache(self) -> Path:
        """The host's default cache directory, as the test process reaches it."""
        return self.tmp / "dbguard-root"

    def run(
        self, *args: str, timeout: float = 60.0, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`dbguard ARGS` on this host, in the project directory unless told otherwise."""
        command = [
            *self.enter(),
            "sh",
            "-c",
            'cd "$0" && exec "$@"',
            cwd or str(self.project),
            PYTHON,
            "-m",
            "dbguard",
            *args,
        ]
        return self._run(command, timeout)

    def python(self, script: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self._run([*self.enter(), PYTHON, "-c", script], timeout)

    def popen_python(self, script: str) -> subprocess.Popen[str]:
        return self._popen([*self.enter(), PYTHON, "-c", script])

    def processes(self) -> list[psutil.Process]:
        """Every process of this host (those sharing the init's UTS namespace). Once the init
        has ended, its pid may be anyone's and its namespace's number may be reused by another
        test's host: then only processes in the namespace it had that carry this host's mark in
        their environment (everything started with its ``env``) count."""
        init_alive = self.init is not None and self.init.poll() is None
        mine = self.uts
        if init_alive:
            with contextlib.suppress(OSError):
                mine = os.readlink(f"/proc/{self.pid}/ns/uts")
        if not mine:
            return []
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if os.readlink(f"/proc/{process.pid}/ns/uts") != mine:
                    continue
                if init_alive or process.environ().get(MARK) == self.mark:
                    found.append(process)
        return found

    def pause(self) -> None:
        """SIGSTOP every process of the host, as a frozen machine."""
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.suspend()

    def resume(self) -> None:
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                process.resume()

    def crash(self) -> None:
        """SIGKILL every process of the host at once: its agent, writers, sshfs and init."""
        # Again until none is left: a process forked while the first round was listed (an agent
        # being started, a server of its) would otherwise live on past the crash. The init goes
        # last: while unshare lives, its child's pid (the namespace's sh, which it has not
        # reaped) names this host's namespace and no other.
        init_pids = {self.pid, self.init.pid if self.init is not None else 0}
        for _ in range(10):
            victims = [p for p in self.processes() if p.pid not in init_pids and _alive(p)]
            if not victims:
                break
            for process in victims:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(victims, timeout=2)
        if self.init is not None and self.init.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.init.kill()
        if self.init is not None:
            self.init.wait(10)
        self.mount = None

    def restart(self) -> SimHost:
        """Boot the host again after a crash: a fresh /tmp, a fresh mount."""
        self.crash()
        return self.start()

    def stop(self) -> None:
        if self.pid:
            self.resume()
            if self.mount is not None:
                with contextlib.suppress(Exception):
                    self.mount.unmount()
            self.crash()
