"""Starting and stopping this machine's lease service processes: the broker, or a local
etcd cluster (`dbguard up` and `dbguard down`). The agent's own process is started on demand
by `dbguard.agent.local`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dbguard.errors import BrokerUnavailable, UsageError
from dbguard.lease import requests
from dbguard.lease.service import for_broker
from dbguard.settings import Settings


def bind_address(address: str) -> str:
    """The address a broker listens on: tcp://host:port only."""
    if not address.startswith("tcp://"):
        raise UsageError(f"the broker listens on tcp://host:port addresses, not {address}")
    return address


def start_etcd(settings: Settings) -> tuple[bool, Settings]:
    """A local three-member etcd cluster in the state directory, started unless it runs; the
    site's timing is stored in it, and the settings returned point at it."""
    from dbguard.lease.etcd import configure
    from dbguard.lease.etcd_cluster import EtcdCluster, etcd_unavailable

    directory = settings.state / "etcd"
    cluster = EtcdCluster.existing(directory)
    started = False
    if cluster is None or len(cluster.running()) < len(cluster.endpoints):
        why = etcd_unavailable()
        if why:
            raise UsageError(f"cannot start a local etcd cluster: {why}")
        settings.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cluster is None:
            cluster = EtcdCluster(directory)
            cluster.start(detached=True)
        else:
            for index in set(range(len(cluster.endpoints))) - set(cluster.running()):
                cluster.start_member(index)
        started = True
    address = cluster.url()
    configure(address, ttl=settings.ttl, lock_delay=settings.lock_delay, timeout=settings.request_timeout)
    return started, dataclasses.replace(settings, broker=address)


def start_broker(settings: Settings) -> bool:
    """A broker on the configured address, started unless one answers there; whether this call
    started it. A site's etcd (an etcd:// address) is not ours to start and is only checked."""
    if settings.broker.startswith("etcd://"):
        # The site's etcd is not ours to start: check it answers, and say why if it does not.
        with for_broker(settings, timeout=2.0, attempts=1) as etcd:
            etcd.send_ok(requests.Hello())
        return False
    with for_broker(settings, timeout=1.0, attempts=1) as probe:
        try:
            probe.send_ok(requests.Hello())
            return False
        except BrokerUnavailable:
            pass
    settings.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = settings.state / "broker.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-P",  # not the current directory first on the import path (see dbguard.agent.local.start)
                "-m",
                "dbguard",
                "broker",
                "--address",
                bind_address(settings.broker),
                "--state",
                str(settings.state),
                "--ttl",
                str(settings.ttl),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (settings.state / "broker.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 10
    with for_broker(settings, timeout=0.5, attempts=1) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                probe.send_ok(requests.Hello())
                return True
            except BrokerUnavailable:
                continue
    tail = log_path.read_text(errors="replace").splitlines()[-5:]
    raise BrokerUnavailable(
        f"the broker did not start on {settings.broker}; last lines of {log_path}:\n  " + "\n  ".join(tail)
    )


def stop(settings: Settings) -> list[str]:
    """Stop the etcd cluster and the broker that `start_etcd` or `start_broker` started on
    this state directory; the names of those that were running."""
    stopped = []
    etcd_dir = settings.state / "etcd"
    if (etcd_dir / "cluster.json").exists():
        from dbguard.lease.etcd_cluster import EtcdCluster

        cluster = EtcdCluster.existing(etcd_dir)
        if cluster is not None and cluster.running():
            cluster.stop()
            stopped.append("etcd")
    pid_file = settings.state / "broker.pid"
    if pid_file.exists():
        pid = _broker_pid(pid_file, settings.state)
        if pid and terminate(pid):
            stopped.append("broker")
        pid_file.unlink(missing_ok=True)
    return stopped


def _broker_pid(pid_file: Path, state: Path) -> int | None:
    """The pid of the broker `up` started on ``state``, if it still runs. Pid files outlive their
    processes and pids are reused (a reboot, a damaged file): a pid counts only while it runs a
    broker on this state directory, so `down` never signals another process."""
    import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

    try:
        text = pid_file.read_text(errors="replace").strip()
        if not text.isascii() or not text.isdigit():
            return None
        process = psutil.Process(int(text))
        argv = process.cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return int(process.pid) if "broker" in argv and str(state) in argv else None


def terminate(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM, then wait up to ``timeout`` for it to end; False if it was not running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return True
