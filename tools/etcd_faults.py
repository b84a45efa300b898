"""Faults injected into a local etcd cluster's members by tests and tools: a crash (SIGKILL),
a freeze (SIGSTOP) and its end. Kept out of the product: nothing in dbguard breaks its own
lease service on purpose."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

from dbguard.errors import EtcdClusterError
from dbguard.lease.etcd_cluster import EtcdCluster

_TIMEOUT = 10.0


def kill_member(cluster: EtcdCluster, index: int) -> None:
    """SIGKILL member `index`, as a crash, and return once it is gone."""
    pid = cluster.member_pid(index)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not cluster.wait_gone(index, pid, _TIMEOUT):
        raise EtcdClusterError(
            f"etcd member {index} (pid {pid}) was still there {_TIMEOUT:g}s after SIGKILL",
            directory=str(cluster.directory),
            member=index,
        )
    cluster.pid_path(index).unlink(missing_ok=True)


def pause_member(cluster: EtcdCluster, index: int) -> None:
    """SIGSTOP member `index`: it keeps its sockets but answers nothing until resumed."""
    pid = cluster.member_pid(index)
    os.kill(pid, signal.SIGSTOP)
    # Signals are delivered asynchronously; callers expect the member frozen on return.
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                return
        time.sleep(0.01)
    raise EtcdClusterError(
        f"etcd member {index} (pid {pid}) was not stopped {_TIMEOUT:g}s after SIGSTOP",
        directory=str(cluster.directory),
        member=index,
    )


def resume_member(cluster: EtcdCluster, index: int) -> None:
    """SIGCONT member `index` after `pause_member`."""
    os.kill(cluster.member_pid(index), signal.SIGCONT)
