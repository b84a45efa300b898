"""`dbguard run`: hold a project's writer lease for the life of a command, like flock(1) across
hosts.

The command runs in a process group of its own, so that everything it starts can be stopped
together. While it runs, this process watches the lease as the agent records it (the same
file a writing process checks, `agent.lease_check`); if the lease is lost (an operator broke
it, it expired while the host was frozen, it was taken over), the group gets SIGTERM, then
SIGKILL after the ``run_grace`` setting, and `CommandStopped` (exit 9) says what happened.
SIGINT, SIGTERM and SIGHUP sent to this process are passed on to the command, which is then
waited for; the lease is flushed and released after the command ends however it ends, unless
asked to keep it.

Inside, one writer host is guaranteed, so HDF5's own file locking (which fails on many network
filesystems: "unable to lock file, errno = 37") is switched off with HDF5_USE_FILE_LOCKING=FALSE,
unless the user set that variable.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from dbguard.agent import local as local_agent
from dbguard.agent.lease_check import WriterGuard
from dbguard.data import project as projects
from dbguard.errors import CommandStopped, GuardError, LeaseHeld, LeaseLost, UsageError
from dbguard.results import Lease, QueuePlace
from dbguard.settings import Settings

# How often the lease is looked at while the command runs: the agent records a loss within a
# heartbeat (a third of the TTL), so this adds little to how long a fenced-off command runs on.
_WATCH_INTERVAL = 0.2
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class RunResult:
    """How a command run under the lease ended."""

    lease: Lease
    returncode: int  # the command's exit status; 128 + N if signal N ended it, as a shell says
    released: bool  # False with keep=True: the lease is still held

    def to_json(self) -> dict[str, Any]:
        return {"lease": self.lease.to_json(), "returncode": self.returncode, "released": self.released}


def run_command(
    project: str | os.PathLike[str] | None,
    argv: Sequence[str],
    *,
    settings: Settings,
    acquire: Callable[..., Lease],
    release: Callable[..., dict[str, Any]],
    wait: float | None = None,
    takeover: bool = False,
    keep: bool = False,
    on_queued: Callable[[QueuePlace], None] | None = None,
) -> RunResult:
    """Acquire the project, run ``argv`` under its lease, then flush and release (unless
    ``keep``). ``acquire`` and ``release`` are the API's (passed in, as this module sits below
    it). Raises LeaseHeld when the project is held elsewhere (after ``wait``), CommandStopped
    when the lease was lost while the command ran."""
    if not argv:
        raise UsageError("no command to run: give it after the project, e.g. run(project, ['make'])")
    lease = acquire(project, wait=wait, takeover=takeover, settings=settings, on_queued=on_queued)
    target = projects.open_project(lease.path)
    watch = WriterGuard(local_agent.cache_dir(settings), target)
    environment = dict(os.environ)
    environment.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    try:
        child = subprocess.Popen(list(argv), env=environment, process_group=0)
    except OSError as exc:
        _give_back(release, lease, settings, keep)
        raise UsageError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    lost: LeaseLost | LeaseHeld | None = None
    with _passed_on(child.pid), _in_foreground(child.pid):
        # Now that the command has a pid, the lease service learns what the writer runs, so
        # that `status` on any host reads "held by job 12345 (relion_refine) of ann on node7".
        with contextlib.suppress(GuardError):
            acquire(lease.path, settings=settings, work=work_of(argv, child.pid))
        while child.poll() is None:
            time.sleep(_WATCH_INTERVAL)
            try:
                watch.check()
            except (LeaseLost, LeaseHeld) as exc:
                lost = exc
                _stop_group(child, settings.run_grace)
                break
    returncode = child.wait()
    if lost is not None:
        reason = str(getattr(lost, "reason", "") or "held by another host")
        raise CommandStopped(
            f"the writer lease of {lease.path} (token {lease.token}) was lost while {argv[0]!r} (pid "
            f"{child.pid}) ran ({reason}), so the command was stopped: SIGTERM to its process group, "
            f"SIGKILL after {settings.run_grace:g}s. What it wrote through dbguard since is kept "
            "aside on this host; files it wrote directly may be incomplete",
            project=lease.project,
            reason=reason,
        )
    _give_back(release, lease, settings, keep)
    return RunResult(lease, returncode if returncode >= 0 else 128 - returncode, released=not keep)


# The variables batch systems set in a job's environment, in the order they are looked for.
_JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")
_COMMAND_SHOWN = 200  # characters of the command line the lease service keeps


def work_of(argv: Sequence[str], pid: int) -> dict[str, Any]:
    """What the writer runs: its command line (shortened), its pid, its batch job if any."""
    command = shlex.join(argv)
    if len(command) > _COMMAND_SHOWN:
        command = command[: _COMMAND_SHOWN - 3] + "..."
    work: dict[str, Any] = {"command": command, "pid": pid}
    job = next((os.environ[name] for name in _JOB_VARIABLES if os.environ.get(name)), None)
    if job:
        work["job"] = job[:_COMMAND_SHOWN]
    return work


def _give_back(release: Callable[..., dict[str, Any]], lease: Lease, settings: Settings, keep: bool) -> None:
    if not keep:
        release(lease.path, settings=settings)  # flushes first; UnflushedData keeps the lease


def _stop_group(child: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left after ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # The group, not only the leader: what the command started must not write on either.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


@contextlib.contextmanager
def _passed_on(group: int) -> Iterator[None]:
    """Signals sent to this process go to the command's process group instead; this process
    waits for the command and then releases."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _in_foreground(group: int) -> Iterator[None]:
    """On a terminal, the command's group becomes the foreground one, as a shell does it: it
    may read the terminal, and Ctrl-C reaches it (and only it)."""
    try:
        terminal = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        yield
        return
    try:
        ours = os.tcgetpgrp(terminal)
    except OSError:
        os.close(terminal)
        yield
        return
    # A background group that sets the foreground gets SIGTTOU: ignore it meanwhile.
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(terminal, group)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(terminal, ours)
        signal.signal(signal.SIGTTOU, previous)
        os.close(terminal)
