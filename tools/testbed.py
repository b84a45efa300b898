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
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

from dbguard.client import Client
from dbguard.errors import BrokerUnavailable

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


class BrokerProcess:
    """A real `dbguard broker` process on a fixed loopback port, restartable on the same state."""

    def __init__(self, state_dir: Path, *, ttl: float, lock_delay: float, grace: float | None = None) -> None:
        self.state_dir = state_dir
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
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=0.3, attempts=1) as client:
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

    def client(self) -> Client:
        return Client(self.address, timeout=3.0)


class Host:
    """A simulated host: its own hostname, cache directory, settings and agent."""

    def __init__(self, name: str, root: Path, broker: BrokerProcess, **settings: str) -> None:
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
        return subprocess.run(
            self.command(args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def python(self, script: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a Python script on this host (its hostname, cache and settings)."""
        return subprocess.run(
            self.on_host([PYTHON, "-c", script]),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def popen_python(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.on_host([PYTHON, "-c", script]),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(args),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )

    def agent_pid(self) -> int | None:
        try:
            text = (self.cache / "agent.lock").read_text().strip()
        except OSError:
            return None
        if not text:
            return None
        pid = int(text)
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return None
        return pid if alive else None

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

    def stop(self) -> None:
        self.kill_agent()


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
