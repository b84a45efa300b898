"""Benchmark section `cli`: how long the ``dbguard`` command takes to start and to answer.

Every figure is one whole process, timed from this process from its start to its exit (with
``time.perf_counter`` around `subprocess.run`, its output captured and checked), as a user at a
shell prompt pays it. dbguard is run through its console script, ``dbguard`` beside the
interpreter running this section (``.venv/bin/dbguard``, installed by ``pip install``), which is
what users run; Python is the same interpreter. Every command gets an environment of its own:
the caller's ``DBGUARD_*`` variables removed, then ``DBGUARD_BROKER`` set to a broker of this
section's own on a free loopback port, and ``DBGUARD_CACHE``, ``XDG_STATE_HOME`` and
``XDG_CONFIG_HOME`` set to folders of a temporary directory, so that no user's broker, agent,
cache or config file is touched. Python's bytecode is cached as in any installation (pip compiles
what it installs), in a folder of that directory (``PYTHONPYCACHEPREFIX``; a
``PYTHONDONTWRITEBYTECODE`` of the caller's is removed): otherwise every start of an editable
install would compile dbguard's modules from their source again, some 200 ms on its own.

Setting (not timed): ``dbguard up`` starts that broker and this host's agent, ``dbguard init
DIR`` makes a new folder of the temporary directory a project and ``dbguard acquire DIR`` makes
this host its writer. At the end ``dbguard release DIR`` and ``dbguard down`` stop everything
(and whatever ``down`` could not stop is terminated). Each command then runs a few times
untimed, so that the disk's page cache holds Python's and dbguard's modules and their bytecode;
the figures are warm starts. The three commands are timed round by round, in an order that
rotates from round to round, so that a machine whose load drifts weighs on all of them alike.

Figures, in milliseconds (lower is better), each the median over the rounds (FULL: 21 rounds,
``--quick``: 5):

- ``cli.python_ms``: ``python -c pass``, the same interpreter with the same start-up (its
  ``site`` module and the ``.pth`` files of its site-packages): the floor of any Python command.
- ``cli.startup_ms``: ``dbguard --version``: Python's start, importing ``dbguard.cli`` (and all
  it imports), click parsing the command line, the version looked up in the package metadata.
- ``cli.status_ms``: ``dbguard status DIR`` of the project this host holds: all of the above,
  the settings loaded, one request to the broker (over TCP) and one to this host's agent (over
  its Unix socket), the answer printed as text.
- ``cli.import_ms``: inside a fresh ``python -c`` process, the time ``import dbguard.cli``
  itself takes (``time.perf_counter`` before and after it): the part of ``cli.startup_ms`` that
  is importing; not a whole process, to explain the others.

Ratios (lower is better), each taken within one round, the median over the rounds:

- ``cli.startup_vs_python``: ``startup_ms / python_ms``: how many bare interpreter starts one
  ``dbguard --version`` costs.
- ``cli.status_vs_python``: ``status_ms / python_ms``, likewise.

Also ``cli.rounds``, the rounds of this run. The targets are a command that feels instant at a
shell prompt: ``dbguard --version`` within 120 ms, ``dbguard status`` within 200 ms.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only if types-psutil is installed

from tools.testbed import free_port

log = logging.getLogger("bench.cli")

TARGETS: dict[str, tuple[str, float]] = {
    "cli.startup_ms": ("<=", 120.0),
    "cli.status_ms": ("<=", 200.0),
}

# Seconds one timed command may take; `up` waits for a broker and an agent to start.
RUN_TIMEOUT = 60.0
SETUP_TIMEOUT = 120.0
# Printed by `python -c` for cli.import_ms: milliseconds spent in `import dbguard.cli`.
IMPORT_SCRIPT = (
    "import time; started = time.perf_counter(); import dbguard.cli; "
    "print((time.perf_counter() - started) * 1000)"
)


@dataclass(frozen=True)
class Plan:
    rounds: int  # figures are medians over these
    warm_up: int  # untimed runs of each command before the first round


FULL = Plan(rounds=21, warm_up=3)
QUICK = Plan(rounds=5, warm_up=1)


def run(quick: bool) -> dict[str, float]:
    return measure(QUICK if quick else FULL)


def console_script() -> Path:
    """The ``dbguard`` command installed beside this interpreter."""
    return Path(sys.executable).parent / "dbguard"


def missing() -> str | None:
    """Why this section cannot run here, naming what is missing, or None if it can."""
    script = console_script()
    if not os.access(script, os.X_OK):
        return (
            f"the cli section runs the console script {script}, which this interpreter has not got: "
            "run it with the interpreter of an environment where dbguard is installed (.venv/bin/python)"
        )
    return None


def measure(plan: Plan) -> dict[str, float]:
    why = missing()
    if why is not None:
        raise RuntimeError(why)
    samples: dict[str, list[float]] = defaultdict(list)
    with Bed.started() as bed:
        commands: dict[str, Sequence[str]] = {
            "python": [sys.executable, "-c", "pass"],
            "startup": [str(console_script()), "--version"],
            "status": [str(console_script()), "status", str(bed.project)],
        }
        for _ in range(plan.warm_up):
            for name, argv in commands.items():
                bed.timed(name, argv)
            bed.import_ms()
        for round_ in range(plan.rounds):
            names = list(commands)
            shift = round_ % len(names)
            took: dict[str, float] = {}
            for name in names[shift:] + names[:shift]:
                took[name] = bed.timed(name, commands[name])
            for name, ms in took.items():
                samples[f"{name}_ms"].append(ms)
            samples["import_ms"].append(bed.import_ms())
            samples["startup_vs_python"].append(took["startup"] / took["python"])
            samples["status_vs_python"].append(took["status"] / took["python"])
            log.info(
                "round %d/%d: python %.1f ms, dbguard --version %.1f ms, dbguard status %.1f ms, "
                "import dbguard.cli %.1f ms",
                round_ + 1,
                plan.rounds,
                took["python"],
                took["startup"],
                took["status"],
                samples["import_ms"][-1],
            )
    figures = {f"cli.{name}": statistics.median(values) for name, values in samples.items()}
    figures["cli.rounds"] = float(plan.rounds)
    return figures


# ------------------------------------------------------------------ setting


@dataclass
class Bed:
    """A broker and an agent of this section's own, and a project this host holds."""

    root: Path
    env: dict[str, str]
    project: Path

    @classmethod
    @contextlib.contextmanager
    def started(cls) -> Iterator[Bed]:
        """The broker and the agent stopped, and everything removed, on exit."""
        with tempfile.TemporaryDirectory(prefix="dbguard-bench-cli-", ignore_cleanup_errors=True) as tmp:
            root = Path(tmp)
            env = {key: value for key, value in os.environ.items() if not key.startswith("DBGUARD_")}
            env.update(
                DBGUARD_BROKER=f"tcp://127.0.0.1:{free_port()}",
                DBGUARD_CACHE=str(root / "cache"),
                XDG_STATE_HOME=str(root / "state"),
                XDG_CONFIG_HOME=str(root / "config"),
                # Bytecode compiled once (in the warm-up) and then read, as in any installation:
                # pip compiles a wheel's modules when it installs them. Kept out of the checkout.
                PYTHONPYCACHEPREFIX=str(root / "bytecode"),
            )
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            bed = cls(root, env, root / "project")
            bed.project.mkdir()
            try:
                bed.dbguard("up", timeout=SETUP_TIMEOUT)
                bed.dbguard("init", str(bed.project))
                bed.dbguard("acquire", str(bed.project))
                yield bed
            finally:
                bed.stop()

    def command(self, argv: Sequence[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            env=self.env,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def dbguard(self, *args: str, timeout: float = RUN_TIMEOUT) -> str:
        """Run ``dbguard ARGS`` (not timed); its output, or raise if it failed."""
        done = self.command([str(console_script()), *args], timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"dbguard {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-3000:]}"
                + self.logs()
            )
        return done.stdout

    def timed(self, name: str, argv: Sequence[str]) -> float:
        """Milliseconds ``argv`` took, start to exit; raise if it failed or answered wrong."""
        started = time.perf_counter()
        done = self.command(argv)
        ms = (time.perf_counter() - started) * 1000
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-3000:]}")
        if name == "startup" and not done.stdout.startswith("dbguard, version "):
            raise RuntimeError(f"dbguard --version answered {done.stdout!r}")
        if name == "status" and f"this host holds {self.project}" not in done.stdout:
            raise RuntimeError(f"dbguard status does not say this host holds {self.project}: {done.stdout}")
        return ms

    def import_ms(self) -> float:
        done = self.command([sys.executable, "-c", IMPORT_SCRIPT])
        if done.returncode != 0:
            raise RuntimeError(f"import dbguard.cli failed: {done.stderr.strip()[-3000:]}")
        ms = float(done.stdout.strip())
        if not math.isfinite(ms) or ms <= 0:
            raise RuntimeError(f"import dbguard.cli took {ms!r} ms")
        return ms

    def logs(self) -> str:
        found = ""
        for path in (self.root / "cache" / "agent.log", self.state / "broker.log"):
            with contextlib.suppress(OSError):
                found += f"\n----- {path.name} -----\n{path.read_text(errors='replace')[-3000:]}"
        return found

    @property
    def state(self) -> Path:
        """The broker's state directory, where `dbguard up` puts it (see dbguard.settings)."""
        return self.root / "state" / "dbguard" / "broker"

    def stop(self) -> None:
        """Release, then `dbguard down`; then terminate whichever of this bed's agent and broker
        still runs (a failed setting may have left them), found by their pid files."""
        pids = self.pids()
        for args in (("release", str(self.project)), ("down",)):
            try:
                done = self.command([str(console_script()), *args])
            except subprocess.TimeoutExpired:
                log.warning("dbguard %s timed out", " ".join(args))
                continue
            if done.returncode != 0:
                log.warning(
                    "dbguard %s failed (%d): %s", " ".join(args), done.returncode, done.stderr.strip()
                )
        for process in pids:
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    log.warning("terminating pid %d, which dbguard down left running", process.pid)
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(10)
                    except psutil.TimeoutExpired:
                        process.kill()

    def pids(self) -> list[psutil.Process]:
        """This bed's agent and broker, if they run: a pid from a pid file counts only while it
        runs dbguard with this bed's cache or state directory, so no other process is signalled."""
        found = []
        for pid_file, mark in (
            (self.root / "cache" / "agent.lock", str(self.root / "cache")),
            (self.state / "broker.pid", str(self.state)),
        ):
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                process = psutil.Process(int(pid_file.read_text().strip()))
                ours = mark in process.cmdline() or process.environ().get("DBGUARD_CACHE") == mark
                if ours and "dbguard" in " ".join(process.cmdline()):
                    found.append(process)
        return found
