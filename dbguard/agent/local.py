"""Finding, starting and talking to this host's agent (the ssh-agent pattern).

Commands that need the agent start it on demand in its own session, logging to ``agent.log``
in the cache directory, and wait until it answers. Two commands racing to start one are
harmless: the agent holds an exclusive lock on its cache directory, so the second one exits.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from dbguard.agent.server import LOCK_NAME, LOG_NAME, SOCKET_NAME, read_saved_leases, socket_address
from dbguard.cache import UnsafeCacheLocation, prepare_cache_dir
from dbguard.errors import BrokerUnavailable, UnsafeCachePath
from dbguard.lease.client import Client
from dbguard.lease.protocol import AgentOp
from dbguard.settings import Settings

# How long a command waits for the agent it started. A new agent imports numpy and LMDB and
# reopens its saved leases: a second on an idle machine, many on a loaded cluster node.
_START_TIMEOUT = 30.0


# A Unix socket's path fits in sun_path: 108 bytes on Linux, the last one a NUL.
_MAX_SOCKET_PATH = 107


def cache_dir(settings: Settings) -> Path:
    """The checked cache directory: never on a network filesystem, ours alone (invariant 6), and
    with a path short enough for the agent's socket inside it."""
    try:
        directory = prepare_cache_dir(settings.cache)
    except UnsafeCacheLocation as exc:
        raise UnsafeCachePath(str(exc), path=exc.path, fstype=exc.fstype) from exc
    socket_path = os.fsencode(directory / SOCKET_NAME)
    if len(socket_path) > _MAX_SOCKET_PATH:
        # Otherwise the agent could not bind, and every command would wait for it in vain.
        raise UnsafeCachePath(
            f"the cache directory {directory} has too long a path for the agent's socket in it "
            f"({len(socket_path)} bytes with {SOCKET_NAME}; a Unix socket allows {_MAX_SOCKET_PATH}): "
            "set DBGUARD_CACHE to a shorter path, such as /tmp/dbguard-$USER",
            path=str(directory),
        )
    return directory


def running(settings: Settings) -> Client | None:
    """A client of the agent if one is running, without starting one."""
    directory = cache_dir(settings)
    if not (directory / SOCKET_NAME).exists() or not _lock_held(directory / LOCK_NAME):
        return None
    client = Client(socket_address(directory), timeout=1.0, attempts=1, what="agent")
    try:
        client.call_ok(AgentOp.HELLO)
    except BrokerUnavailable:
        client.close()
        return None
    return client


def _lock_held(path: Path) -> bool:
    """Whether a live agent holds its lock: a crashed agent leaves its socket file behind, and
    asking that with a timeout would cost a second; the kernel drops a dead process's lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def revive(settings: Settings) -> Client | None:
    """The agent, started if this host has leases left to reclaim (after a crash or reboot), so
    that it renews them or learns they were lost and sets their unflushed data aside."""
    client = running(settings)
    if client is not None:
        return client
    # Only entries of the form an agent writes: nothing else is there to reclaim.
    saved = read_saved_leases(cache_dir(settings))
    if not any(lease["state"] != "lost" for lease in saved):
        return None
    return connect(settings)


def connect(settings: Settings) -> Client:
    """A client of this host's agent, starting the agent if it is not running."""
    client = running(settings)
    if client is not None:
        client.timeout = settings.request_timeout * 3  # an acquire includes a broker round trip
        return client
    directory = cache_dir(settings)
    start(settings, directory)
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        client = running(settings)
        if client is not None:
            client.timeout = settings.request_timeout * 3
            return client
        time.sleep(0.05)
    raise BrokerUnavailable(
        f"the dbguard agent did not start within {_START_TIMEOUT:.0f}s; its log is {directory / LOG_NAME}"
    )


def start(settings: Settings, directory: Path) -> None:
    env = dict(os.environ)
    env.update(
        DBGUARD_BROKER=settings.broker,
        DBGUARD_CACHE=str(directory),
        DBGUARD_REQUEST_TIMEOUT=str(settings.request_timeout),
    )
    with open(directory / LOG_NAME, "ab") as log:
        subprocess.Popen(
            # -P: the current directory (a project, perhaps holding a cache.py or a zmq/ of its
            # own) must not come first on the agent's import path.
            [sys.executable, "-P", "-m", "dbguard", "agent"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,  # outlives the command that started it, like ssh-agent
            close_fds=True,
        )


def shut_down(settings: Settings) -> bool:
    """Stop this host's agent if it runs; whether it did."""
    client = running(settings)
    if client is None:
        return False
    with client:
        client.call_ok(AgentOp.SHUTDOWN)
    return True
