"""Benchmark section `lease`: the cost of a durable acquire + release cycle on a real broker.

A broker process is started on a free port with its state in a temporary directory, exactly as
an operator would run it, and driven with `dbguard.lease.client.Client`. A cycle is one ``acquire``
of a free project followed by its ``release``; the grant is synced to disk before it is
answered, so a cycle costs at least one fdatasync of the state directory's filesystem, which is
measured in the same run (``lease.fsync_ms``) to explain the figures.

Figures (times in milliseconds, rates per second):

- ``lease.cycle_p50_ms``, ``lease.cycle_p99_ms``: one client's cycle latency.
- ``lease.cycles_per_s_1``: one client's throughput.
- ``lease.cycles_per_s_16``: 16 client processes on 16 projects, started together, each
  running for a fixed window; total cycles / window. Processes, not threads, so that the
  clients' own CPU work is not serialised by one interpreter's GIL.
- ``lease.scaling_16_vs_1``: the ratio of the two rates; the broker's group commit should let
  concurrent clients share syncs, so it should be well above 1.
- ``lease.fsync_ms``: median fdatasync of a 4 KiB overwrite beside the broker's state.
- ``lease.syncs_per_grant_16``: disk syncs the broker made per grant during the 16-client
  windows, from its own counters; below 1 means concurrent grants shared a sync (group commit).
- ``lease.broker_cpu_16``, ``lease.idle_cpu_16``: during the 16-client windows, the cores the
  broker process kept busy, and the share of the machine's CPU time left idle. They tell which
  limit the 16-client rate hit: the broker's one thread (broker near 1), or the machine, whose
  cores the clients share with the broker (idle near 0).

Each figure is the median over several repetitions, because a 2-core machine is noisy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, NamedTuple

import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only if types-psutil is installed

from dbguard.errors import BrokerUnavailable
from dbguard.lease.client import Client
from dbguard.lease.service import LeaseService

log = logging.getLogger("bench.lease")

TARGETS: dict[str, tuple[str, float]] = {
    "lease.cycle_p50_ms": ("<=", 1.0),
    "lease.scaling_16_vs_1": (">=", 5.0),
}

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 16
TTL = 30.0  # seconds; far longer than any run, so no lease expires while it is measured
# Starting a broker, or 16 interpreters that import zmq on 2 busy cores, can take a while.
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Plan:
    warmup: int  # cycles before anything is timed, per client
    cycles: int  # timed cycles of the single client, per repetition
    window: float  # seconds the concurrent clients run, per repetition
    repetitions: int  # figures are medians over these
    fsyncs: int  # fdatasync samples per repetition


FULL = Plan(warmup=200, cycles=2000, window=3.0, repetitions=3, fsyncs=200)
QUICK = Plan(warmup=50, cycles=300, window=1.0, repetitions=3, fsyncs=50)


def holder(index: int) -> dict[str, str]:
    return {
        "host": f"bench-host-{index}",
        "user": "bench",
        "agent": f"bench-{os.getpid()}",
        "cache": "/bench",
    }


def cycle(client: LeaseService, project: str, who: dict[str, str]) -> None:
    """One durable acquire + release; raise if the broker did not really grant and release."""
    granted = client.call_ok("acquire", project=project, holder=who)
    if granted.get("status") != "granted":
        raise RuntimeError(f"acquire of free project {project} answered {granted}")
    released = client.call_ok("release", project=project, holder=who, token=granted["token"])
    if not released.get("held"):
        raise RuntimeError(f"release of {project} with token {granted['token']} answered {released}")


def run(quick: bool) -> dict[str, float]:
    plan = QUICK if quick else FULL
    fsync_ms: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    rate_1: list[float] = []
    rate_16: list[float] = []
    broker_cpu: list[float] = []
    idle_cpu: list[float] = []
    syncs_per_grant: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="dbguard-bench-") as tmp,
        running_broker(Path(tmp)) as broker,
        Client(broker.address) as client,
        ClientProcesses(broker.address, CLIENTS, plan) as clients,
    ):
        broker_process = psutil.Process(broker.pid)
        who = holder(0)
        for _ in range(plan.warmup):
            cycle(client, "bench-single", who)
        clients.wait_ready()
        # One of each measurement per repetition, so the single client and the concurrent ones
        # (and the disk) see the same background load, whose drift would otherwise skew the ratio.
        for rep in range(1, plan.repetitions + 1):
            fsync_ms.append(fdatasync_ms(Path(tmp), plan.fsyncs))
            times, elapsed = single_client(client, "bench-single", who, plan.cycles)
            p50.append(1000 * percentile(times, 50))
            p99.append(1000 * percentile(times, 99))
            rate_1.append(plan.cycles / elapsed)
            before = client.call_ok("hello")["stats"]
            with CpuUse(broker_process) as use:
                rate_16.append(clients.run_round())
            after = client.call_ok("hello")["stats"]
            grants = after["grants"] - before["grants"]
            syncs_per_grant.append((after["syncs"] - before["syncs"]) / max(1, grants))
            broker_cpu.append(use.process_cores)
            idle_cpu.append(use.idle_share)
            log.info(
                "repetition %d/%d: fsync %.3f ms; 1 client: p50 %.3f ms, p99 %.3f ms, %.0f cycles/s; "
                "%d clients: %.0f cycles/s, broker %.2f cores, %.0f%% idle",
                rep,
                plan.repetitions,
                fsync_ms[-1],
                p50[-1],
                p99[-1],
                rate_1[-1],
                CLIENTS,
                rate_16[-1],
                broker_cpu[-1],
                100 * idle_cpu[-1],
            )
    one, many = statistics.median(rate_1), statistics.median(rate_16)
    return {
        "lease.cycle_p50_ms": statistics.median(p50),
        "lease.cycle_p99_ms": statistics.median(p99),
        "lease.cycles_per_s_1": one,
        "lease.cycles_per_s_16": many,
        "lease.scaling_16_vs_1": many / one,
        "lease.fsync_ms": statistics.median(fsync_ms),
        "lease.broker_cpu_16": statistics.median(broker_cpu),
        "lease.idle_cpu_16": statistics.median(idle_cpu),
        "lease.syncs_per_grant_16": statistics.median(syncs_per_grant),
    }


# ------------------------------------------------------------------ broker


def free_port() -> int:
    # Another process may take the port between this check and the broker's bind; the broker
    # then fails at once and its log says so.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class BrokerProcess(NamedTuple):
    address: str
    pid: int


@contextlib.contextmanager
def running_broker(workdir: Path) -> Iterator[BrokerProcess]:
    """A broker process with its state in ``workdir``; stopped (killed if need be) on exit."""
    address = f"tcp://127.0.0.1:{free_port()}"
    log_path = workdir / "broker.log"
    # Only the command line configures this broker: no DBGUARD_* variables or user config file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBGUARD_")}
    env["XDG_CONFIG_HOME"] = str(workdir / "config")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "dbguard", "broker", "--address", address]
    command += ["--state", str(workdir / "state"), "--ttl", str(TTL)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
        )
    try:
        wait_until_ready(process, address, log_path)
        log.info("broker pid %d ready on %s", process.pid, address)
        yield BrokerProcess(address, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_ready(process: subprocess.Popen[bytes], address: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with Client(address, timeout=0.5, attempts=1) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the broker exited with code {process.returncode} before answering; "
                    f"its log:\n{log_path.read_text(errors='replace')}"
                )
            try:
                probe.call_ok("hello")
                return
            except BrokerUnavailable:
                continue
    raise RuntimeError(
        f"the broker did not answer hello on {address} within {STARTUP_TIMEOUT:.0f}s; its log:\n"
        + log_path.read_text(errors="replace")
    )


# -------------------------------------------------------------- measuring


def percentile(samples: list[float], pct: float) -> float:
    """The nearest-rank percentile: a value that was really observed."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def fdatasync_ms(directory: Path, count: int) -> float:
    """Median time of an fdatasync after overwriting one 4 KiB block, in milliseconds."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = os.urandom(4096)
        # Allocate the block first: LMDB mostly rewrites pages it already has, so a sync that
        # also has to commit a growing file's size would overstate the baseline.
        os.pwrite(fd, block, 0)
        os.fsync(fd)
        samples = []
        for _ in range(count):
            os.pwrite(fd, block, 0)
            started = time.perf_counter()
            os.fdatasync(fd)
            samples.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return 1000 * statistics.median(samples)


class CpuUse:
    """CPU time spent while the block runs: by one process, and left idle on the machine."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.process_cores = 0.0  # CPU seconds of the process per second of wall time
        self.idle_share = 0.0  # idle CPU time / all CPU time of the machine

    def __enter__(self) -> CpuUse:
        self._wall = time.monotonic()
        self._process = sum(self.process.cpu_times()[:2])  # user + system
        self._machine = psutil.cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._wall
        self.process_cores = (sum(self.process.cpu_times()[:2]) - self._process) / wall
        machine = psutil.cpu_times()
        total = sum(machine) - sum(self._machine)
        self.idle_share = (machine.idle - self._machine.idle) / total if total > 0 else 0.0


def single_client(
    client: Client, project: str, who: dict[str, str], cycles: int
) -> tuple[list[float], float]:
    """Each cycle's latency in seconds, and the seconds all of them took."""
    # perf_counter: monotonic like time.monotonic, with the resolution a sub-millisecond needs.
    times = []
    started = time.perf_counter()
    for _ in range(cycles):
        before = time.perf_counter()
        cycle(client, project, who)
        times.append(time.perf_counter() - before)
    return times, time.perf_counter() - started


class ClientProcesses:
    """``count`` client processes, one project each, that run timed rounds all at once.

    Processes rather than threads, so that the clients' CPU work is not serialised by one GIL;
    'spawn' rather than fork, so that no zmq context is ever copied into a child. One barrier
    of count + 1 parties (the clients and this process) marks first "warmed up", then the
    start of each round.
    """

    def __init__(self, address: str, count: int, plan: Plan) -> None:
        self.count = count
        self.plan = plan
        context = multiprocessing.get_context("spawn")
        self._barrier = context.Barrier(count + 1)
        self._results: Queue[tuple[int, Any]] = context.Queue()
        self._rounds = 0
        self._processes = [
            context.Process(
                target=client_process,
                args=(address, index, plan, self._barrier, self._results),
                name=f"bench-lease-client-{index}",
                daemon=True,
            )
            for index in range(count)
        ]

    def __enter__(self) -> ClientProcesses:
        try:
            for process in self._processes:
                process.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meet(self, what: str) -> None:
        # A client that dies without a word (say, at import) would leave the barrier waiting for
        # the whole timeout; a watcher breaks it as soon as one is gone.
        met = threading.Event()
        watcher = threading.Thread(target=self._abort_if_one_dies, args=(met,), daemon=True)
        watcher.start()
        try:
            self._barrier.wait(timeout=STARTUP_TIMEOUT)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"client processes did not {what}: {self._first_failure()}") from None
        finally:
            met.set()
            watcher.join()

    def _abort_if_one_dies(self, met: threading.Event) -> None:
        while not met.wait(0.2):
            if self._dead():
                self._barrier.abort()
                return

    def _dead(self) -> str:
        # Exit code 0 is a client done with its last round, or one that reported its error.
        return ", ".join(
            f"client {index} exited with code {process.exitcode}"
            for index, process in enumerate(self._processes)
            if process.exitcode not in (None, 0)
        )

    def wait_ready(self) -> None:
        """Return once every client has connected and warmed up, and is idle."""
        self._meet("start")

    def run_round(self) -> float:
        """Start every client at once; their total cycles per second over one window."""
        if self._rounds >= self.plan.repetitions:
            raise RuntimeError(f"the clients run {self.plan.repetitions} rounds, no more")
        self._rounds += 1
        self._meet(f"begin round {self._rounds}")
        rate = 0.0
        for _ in range(self.count):
            index, outcome = self._next_result(time.monotonic() + self.plan.window + STARTUP_TIMEOUT)
            if isinstance(outcome, str):
                raise RuntimeError(f"client process {index} failed: {outcome}")
            cycles, elapsed = outcome
            # Each process's own window, so a cycle that ends just after the window closes is not
            # counted as if it fitted inside it.
            rate += cycles / elapsed
        return rate

    def _next_result(self, deadline: float) -> tuple[int, Any]:
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                return self._results.get(timeout=min(left, 0.2))
            if dead := self._dead():
                raise RuntimeError(f"client processes died during round {self._rounds}: {dead}")
        raise RuntimeError(f"client processes did not report round {self._rounds} in time")

    def _first_failure(self) -> str:
        with contextlib.suppress(queue.Empty):
            while True:
                index, outcome = self._results.get(timeout=1.0)
                if isinstance(outcome, str):
                    return f"client {index}: {outcome}"
        return self._dead() or "none reported an error or exited before the timeout"

    def close(self) -> None:
        self._barrier.abort()  # frees any client still waiting for a round that will not come
        for process in self._processes:
            if process.pid is None:
                continue  # never started
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def client_process(
    address: str, index: int, plan: Plan, barrier: Barrier, results: Queue[tuple[int, Any]]
) -> None:
    """One concurrent client: warm up, then run ``plan.window`` seconds each time the barrier opens."""
    project, who = f"bench-concurrent-{index}", holder(index + 1)
    try:
        with Client(address) as client:
            for _ in range(plan.warmup):
                cycle(client, project, who)
            barrier.wait(timeout=STARTUP_TIMEOUT)  # warmed up
            for _ in range(plan.repetitions):
                # The parent measures the single client meanwhile; this blocks without using CPU.
                barrier.wait(timeout=STARTUP_TIMEOUT * 10)
                cycles = 0
                started = time.monotonic()
                deadline = started + plan.window
                while time.monotonic() < deadline:
                    cycle(client, project, who)
                    cycles += 1
                results.put((index, (cycles, time.monotonic() - started)))
    except threading.BrokenBarrierError:
        return  # the parent gave up on this run and reports why
    except Exception as exc:
        results.put((index, f"{type(exc).__name__}: {exc}"))
        barrier.abort()
