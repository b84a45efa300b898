"""The agent's side of serving: starting, watching and stopping one server process per served
project (agent.serve). The agent decides when a project is served (while it holds the lease
and the user asked for it); this module only runs the processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dbguard.data.project import Project
from dbguard.errors import GuardError, from_reply

log = logging.getLogger("dbguard.agent.serving")

# A server imports numpy, LMDB and ZeroMQ and binds: a second on an idle host.
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 5.0


@dataclass
class Server:
    project: str
    address: str  # where workers reach it
    bound: str  # what it bound (tcp://0.0.0.0:PORT): a restarted server binds it again
    key: str | None  # its CURVE public key (z85), when keys are used
    process: subprocess.Popen[bytes]

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class Servers:
    """The server processes of this agent, by project id."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._servers: dict[str, Server] = {}

    def get(self, project_id: str) -> Server | None:
        return self._servers.get(project_id)

    def start(self, project: Project, address: str) -> Server:
        """Start serving ``project`` on ``address``; returns once it listens, or raises the
        GuardError that kept it from listening."""
        self.stop(project.id)
        env = {**os.environ, "DBGUARD_CACHE": str(self.cache_dir), "DBGUARD_SERVE_PARENT": str(os.getpid())}
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "dbguard.agent.serve", project.id, str(project.path), address],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,  # its log goes where the agent's goes (stderr is inherited)
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], _START_TIMEOUT)
        line = process.stdout.readline() if ready else b""
        try:
            said = json.loads(line) if line else {}
        except ValueError:
            said = {}
        if "address" not in said:
            _end(process)
            if isinstance(said.get("error"), dict):
                raise from_reply(said["error"])
            how = (
                f"did not start within {_START_TIMEOUT:.0f}s"
                if process.returncode == -signal.SIGTERM  # `_end` stopped it: too slow
                else "stopped at start"
            )
            raise GuardError(
                f"the server for {project.path} {how} (exit {process.returncode}); see the agent's log "
                f"in {self.cache_dir}"
            )
        server = Server(project.id, str(said["address"]), str(said["bound"]), said.get("key"), process)
        self._servers[project.id] = server
        log.info("serving %s on %s (pid %d)", project.path, server.address, process.pid)
        return server

    def stop(self, project_id: str) -> bool:
        """Stop the server of ``project_id``; whether there was one."""
        server = self._servers.pop(project_id, None)
        if server is None:
            return False
        _end(server.process)
        log.info("stopped serving %s", project_id)
        return True

    def stop_all(self) -> None:
        for project_id in list(self._servers):
            self.stop(project_id)

    def exited(self) -> list[str]:
        """Projects whose server ended on its own (crashed, or refused to go on)."""
        return [project for project, server in self._servers.items() if not server.running]


def _end(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL: a server must be gone before its lease is given up, so that it
    writes nothing into a cache that is being flushed, released or set aside."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
