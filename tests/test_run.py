"""`dbguard run`: the lease for the life of a command, on simulated hosts with real processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import signal
import subprocess
import termios
import time
from pathlib import Path

from tests.support import TTL, project_state
from tools.testbed import Host, wait_for

STOPPED = 9
HELD = 3


def test_the_command_runs_under_the_lease_with_hdf5_locking_off_and_its_status_becomes_runs(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a = hosts["a"]
    seen = tmp_path / "seen.json"
    script = (
        "import json, os, sys; "
        f"json.dump({{'locking': os.environ.get('HDF5_USE_FILE_LOCKING')}}, open({str(seen)!r}, 'w')); "
        "sys.exit(7)"
    )
    ran = a.run("run", str(project), "--", "python3", "-c", script)
    assert ran.returncode == 7, ran.stderr
    assert json.loads(seen.read_text()) == {"locking": "FALSE"}
    assert project_state(a, project)["state"] == "free"  # flushed and released


def test_a_held_project_is_refused_naming_the_holder_and_keep_keeps_the_lease(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    kept = a.run("run", str(project), "--keep", "--", "true")
    assert kept.returncode == 0, kept.stderr
    assert project_state(a, project)["state"] == "held"
    refused = b.run("run", str(project), "--", "true")
    assert refused.returncode == HELD and "host-a" in refused.stderr
    assert "--wait SECONDS" in refused.stderr


def test_a_broken_lease_stops_the_command_group_and_run_exits_9(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    pid_file = tmp_path / "sleeper.pid"
    a.env["DBGUARD_RUN_GRACE"] = "1"
    a.env["SLURM_JOB_ID"] = "12345"
    # The command starts a child of its own: the whole group must go.
    runner = a.popen("run", str(project), "--", "sh", "-c", f"sleep 600 & echo $! > {pid_file}; wait")
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=20)
    sleeper = int(pid_file.read_text())
    # Every host reads who writes and what: the command, its pid, its batch job.
    assert wait_for(lambda: project_state(b, project)["writer"]["pid"] is not None, timeout=10)
    writer = project_state(b, project)["writer"]
    assert writer["host"] == "host-a" and writer["job"] == "12345" and writer["command"].startswith("sh -c")
    shown = b.run("status", str(project))
    assert "job 12345 (sh) of" in shown.stdout and f"pid      {writer['pid']}" in shown.stdout
    refused = b.run("acquire", str(project))
    assert refused.returncode == HELD and "job 12345 (sh)" in refused.stderr
    broken = b.run("break", str(project), "--force")
    assert broken.returncode == 0, broken.stderr
    _, err = runner.communicate(timeout=TTL + 1 + 10)
    assert runner.returncode == STOPPED, err
    assert "was lost" in err and "stopped" in err
    assert wait_for(lambda: not _alive(sleeper), timeout=5)


def test_sigterm_to_run_reaches_the_command_and_the_lease_is_still_released(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a = hosts["a"]
    ready = tmp_path / "ready"
    runner = a.popen("run", str(project), "--", "sh", "-c", f"touch {ready}; exec sleep 600")
    assert wait_for(ready.exists, timeout=20)
    time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)
    runner.communicate(timeout=30)
    assert runner.returncode == 128 + signal.SIGTERM
    assert project_state(a, project)["state"] == "free"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purpose
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_ctrl_c_on_a_terminal_reaches_the_command_and_the_lease_is_still_released(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    """On a terminal the command's process group is the foreground one: Ctrl-C (the terminal
    driver's SIGINT to that group) ends the command, and run still flushes and releases."""
    a = hosts["a"]
    ready = tmp_path / "ready"
    controller, terminal = pty.openpty()

    def on_the_terminal() -> None:  # a session of its own, with the pty as its terminal
        os.setsid()
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)

    runner = subprocess.Popen(
        a.command(["run", str(project), "--", "sh", "-c", f"touch {ready}; exec sleep 600"]),
        env=a.env,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        preexec_fn=on_the_terminal,
    )
    os.close(terminal)
    try:
        assert wait_for(ready.exists, timeout=20)
        time.sleep(0.3)
        os.write(controller, b"\x03")  # Ctrl-C
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
        with contextlib.suppress(OSError):
            while os.read(controller, 65536):
                pass
        os.close(controller)
    assert runner.returncode == 128 + signal.SIGINT
    assert project_state(a, project)["state"] == "free"
