"""Benchmark section `scale`: one broker, 100,000 projects' leases, 10,000 heartbeating hosts.

A broker process is started as an operator would run it (default TTL, so hosts heartbeat every
TTL / 3 = 10 s), and load-generator processes stand in for the hosts' agents: each simulated
host holds the writer lease of 10 projects. Hosts join in a random order during a ramp (each
sends its 10 ``acquire`` requests at once), and from one interval after its grant on, each sends
one ``renew`` of its 10 leases per interval, at its own phase: exactly the message an agent's
heartbeat sends (nothing unflushed). Sending is open-loop: a renew goes out when it is due
whether or not earlier ones were answered, and its latency is measured from when it was due to
when its reply arrived, so a slow broker cannot hide its delay by slowing the senders down.
Every reply is checked: an acquire must be granted, every lease of a renew renewed.

After the ramp and a warm-up, the load runs for several windows; per window the broker's CPU
time and the heartbeat latency percentiles are taken, and each figure is the median over the
windows. The broker's memory is sampled every second.

The whole run is made twice, each time with a fresh broker:

1. batched, as the issue defines it: each load generator sends its hosts' requests over one
   connection (one per generator process, 4 in the full run). The targets are for these figures.
2. one connection per host (``scale.per_host_*``), as real agents connect: 10,000 connections.
   libzmq keeps buffers for every connection (about 27 KiB each), and the broker's I/O thread
   serves them all, so a real site pays for these figures. A real agent holding leases even
   keeps two connections (its heartbeat thread's and its main thread's).

Figures:

- ``scale.heartbeat_p99_ms``: the 99th percentile of the renews' latency (due to answered) in
  milliseconds, at the load generators.
- ``scale.heartbeat_p50_ms``, ``scale.heartbeat_max_ms``: the median, and the longest latency
  seen in any window.
- ``scale.broker_cpu_share``: the broker process's CPU time (all its threads, user + system) per
  second of wall time: 1.0 is one core kept busy.
- ``scale.broker_rss_mb``: the broker's resident memory (MiB), the largest sample taken during
  the windows. It holds its connections' buffers in libzmq, the lease table, the reply cache (the
  last 100,000 replies, kept so that a resent request is never acted on twice) and the pages of
  its LMDB state that the process has touched.
- ``scale.broker_anon_mb``: the anonymous (private, not file-backed) part of that memory at the
  end: what the broker allocated, without the page cache of its LMDB file.
- ``scale.broker_rss_idle_mb``, ``scale.broker_rss_connected_mb``: the broker's resident memory
  when started, and once every connection is up but before any lease exists: the difference is
  what the connections alone cost.
- ``scale.renews_per_s``: renews sent per second during the windows; ``scale.failures``:
  requests refused, leases not renewed, and replies that never came (0 when all is well).
- ``scale.generator_lag_p99_ms``: how late the generators sent, 99th percentile; near 0 means
  the load was applied as scheduled, so the latency is the broker's.
- ``scale.generator_cores``, ``scale.machine_idle_share``: the CPU the generators used, and the
  share of the machine's CPU left idle, during the windows. The targets are absolute, not ratios
  to a baseline; these show what else the machine was doing while they were measured.
- ``scale.per_host_heartbeat_p99_ms``, ``scale.per_host_heartbeat_p50_ms``,
  ``scale.per_host_heartbeat_max_ms``, ``scale.per_host_broker_cpu_share``,
  ``scale.per_host_broker_rss_mb``, ``scale.per_host_broker_anon_mb``,
  ``scale.per_host_broker_rss_connected_mb``, ``scale.per_host_failures``,
  ``scale.per_host_generator_lag_p99_ms``, ``scale.per_host_machine_idle_share``: the same,
  from the run with one connection per host.
- ``scale.hosts``, ``scale.projects``: the load of this run. ``--quick`` scales it down to 2,000
  hosts and 20,000 projects (200 renews per second) and runs shorter windows; its memory figures
  then reflect a reply cache that has not yet filled.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import multiprocessing
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only if types-psutil is installed
import zmq
from numpy.typing import NDArray

from dbguard.lease import protocol
from dbguard.lease.client import Client
from dbguard.settings import Settings
from tools.bench_lease import TTL, percentile, running_broker

log = logging.getLogger("bench.scale")

TARGETS: dict[str, tuple[str, float]] = {
    "scale.heartbeat_p99_ms": ("<", 50.0),
    "scale.broker_cpu_share": ("<", 0.5),
    "scale.broker_rss_mb": ("<", 300.0),
}

MIB = 1 << 20
# running_broker starts the broker with bench_lease's TTL, which must be the default one: the
# section measures hosts heartbeating at the default interval.
DEFAULT_INTERVAL = protocol.heartbeat_interval(Settings().ttl)
# The figures also reported for one connection per host.
PER_HOST = (
    "heartbeat_p99_ms",
    "heartbeat_p50_ms",
    "heartbeat_max_ms",
    "broker_cpu_share",
    "broker_rss_mb",
    "broker_anon_mb",
    "broker_rss_connected_mb",
    "failures",
    "generator_lag_p99_ms",
    "machine_idle_share",
)
# Seconds to wait for late replies after the last window, and for processes to get ready.
DRAIN = 10.0
STARTUP_TIMEOUT = 180.0
SEED = 20240607


@dataclass(frozen=True)
class Plan:
    hosts: int
    projects_per_host: int
    interval: float  # seconds between one host's heartbeats
    acquire_rate: float  # acquire requests per second during the ramp
    warmup: float  # seconds from the end of the ramp to the first window; at least one interval
    window: float  # seconds per measured window
    repetitions: int  # windows; figures are medians over them
    generators: int  # load-generator processes
    hosts_per_connection: int = 1  # 1: each host has its own connection, as every agent has

    @property
    def ramp(self) -> float:
        return self.hosts * self.projects_per_host / self.acquire_rate


FULL = Plan(
    hosts=10_000,
    projects_per_host=10,
    interval=DEFAULT_INTERVAL,
    acquire_rate=4000.0,
    warmup=2 * DEFAULT_INTERVAL,
    window=30.0,
    repetitions=3,
    generators=4,
)
QUICK = Plan(
    hosts=2_000,
    projects_per_host=10,
    interval=DEFAULT_INTERVAL,
    acquire_rate=4000.0,
    warmup=DEFAULT_INTERVAL,
    window=10.0,
    repetitions=3,
    generators=2,
)
# For tests/test_bench_sections.py: runs every code path in seconds; its figures mean nothing.
TINY = Plan(
    hosts=20,
    projects_per_host=2,
    interval=0.5,
    acquire_rate=200.0,
    warmup=0.5,
    window=1.0,
    repetitions=1,
    generators=2,
)


def run(quick: bool) -> dict[str, float]:
    return measure(QUICK if quick else FULL)


def measure(plan: Plan) -> dict[str, float]:
    """Both ways of connecting: the hosts batched over one connection per load generator (the
    figures the targets are for), then one connection per host (``scale.per_host_*``)."""
    batched = -(-plan.hosts // plan.generators)
    figures = {
        f"scale.{name}": value
        for name, value in measure_once(replace(plan, hosts_per_connection=batched)).items()
    }
    per_host = measure_once(replace(plan, hosts_per_connection=1))
    figures.update({f"scale.per_host_{name}": per_host[name] for name in PER_HOST})
    figures["scale.hosts"] = float(plan.hosts)
    figures["scale.projects"] = float(plan.hosts * plan.projects_per_host)
    return figures


def measure_once(plan: Plan) -> dict[str, float]:
    """One run: a fresh broker, the plan's hosts connected as it says; figures without prefix."""
    if plan.warmup < plan.interval:
        raise ValueError("the warm-up must last at least one heartbeat interval")
    if plan.interval == DEFAULT_INTERVAL and protocol.heartbeat_interval(TTL) != DEFAULT_INTERVAL:
        raise RuntimeError(f"bench_lease starts brokers with TTL {TTL}s, not the default {Settings().ttl}s")
    per_generator = -(-plan.hosts // plan.generators)
    # The broker (a child) inherits this limit: one descriptor per connected host, and some.
    raise_fd_limit(plan.hosts + 256)
    windows: list[Window] = []
    with (
        tempfile.TemporaryDirectory(prefix="dbguard-bench-scale-") as tmp,
        running_broker(Path(tmp)) as broker,
    ):
        process = psutil.Process(broker.pid)
        idle_rss = process.memory_info().rss
        with Generators(broker.address, plan, per_generator) as generators:
            generators.wait_ready()
            connected_rss = wait_connected(process, -(-plan.hosts // plan.hosts_per_connection))
            log.info(
                "%d hosts connected (%d per connection): broker rss %.0f MiB idle, %.0f MiB connected",
                plan.hosts,
                plan.hosts_per_connection,
                idle_rss / MIB,
                connected_rss / MIB,
            )
            start = time.monotonic() + 1.0
            generators.start(start)
            first = start + plan.ramp + plan.warmup
            wait_until(first, generators)
            for rep in range(plan.repetitions):
                window = watch_window(process, generators, first + rep * plan.window, plan.window)
                windows.append(window)
                log.info(
                    "window %d/%d: broker %.2f cores, rss %.0f MiB, machine %.0f%% idle",
                    rep + 1,
                    plan.repetitions,
                    window.broker_cores,
                    window.peak_rss / MIB,
                    100 * window.idle_share,
                )
            anon = anon_bytes(broker.pid)
            results = generators.results(first + plan.repetitions * plan.window + DRAIN + STARTUP_TIMEOUT)
        with Client(broker.address) as client:
            projects = int(client.call_ok("hello")["projects"])
    if projects != plan.hosts * plan.projects_per_host:
        raise RuntimeError(f"the broker knows {projects} projects, not {plan.hosts * plan.projects_per_host}")
    return figures(plan, windows, results, idle_rss, connected_rss, anon)


def figures(
    plan: Plan,
    windows: list[Window],
    results: list[GeneratorResult],
    idle_rss: int,
    connected_rss: int,
    anon: int,
) -> dict[str, float]:
    p50, p99, lag99 = [], [], []
    longest = 0.0
    for rep in range(plan.repetitions):
        latencies = np.concatenate([r.latencies[rep] for r in results])
        lags = np.concatenate([r.lags[rep] for r in results])
        if not len(latencies):
            raise RuntimeError(f"no renew was answered in window {rep + 1}")
        p50.append(1000 * percentile(latencies.tolist(), 50))
        p99.append(1000 * percentile(latencies.tolist(), 99))
        lag99.append(1000 * percentile(lags.tolist(), 99))
        longest = max(longest, 1000 * float(latencies.max()))
    sent = sum(r.sent_in_windows for r in results)
    return {
        "heartbeat_p99_ms": statistics.median(p99),
        "heartbeat_p50_ms": statistics.median(p50),
        "heartbeat_max_ms": longest,
        "broker_cpu_share": statistics.median(w.broker_cores for w in windows),
        "broker_rss_mb": max(w.peak_rss for w in windows) / MIB,
        "broker_anon_mb": anon / MIB,
        "broker_rss_idle_mb": idle_rss / MIB,
        "broker_rss_connected_mb": connected_rss / MIB,
        "renews_per_s": sent / (plan.repetitions * plan.window),
        "failures": float(sum(r.failures + r.unanswered for r in results)),
        "generator_lag_p99_ms": statistics.median(lag99),
        "generator_cores": statistics.median(w.generator_cores for w in windows),
        "machine_idle_share": statistics.median(w.idle_share for w in windows),
    }


# ------------------------------------------------------------------ the parent's side


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(
            f"{needed} open files are needed (one per connected host), but the hard limit is {hard}; "
            "raise it (ulimit -Hn, or LimitNOFILE= for a service) as a site with this many hosts must"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def anon_bytes(pid: int) -> int:
    """RssAnon of a process: its resident private memory, without file-backed pages."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no RssAnon line")


def wait_connected(process: psutil.Process, connections: int) -> int:
    """Wait until the broker has this many TCP connections up; its RSS then."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while (up := established(process)) < connections:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the broker has {up} connections up, not the {connections} expected")
        time.sleep(0.2)
    time.sleep(1.0)  # the last handshakes
    return int(process.memory_info().rss)


def established(process: psutil.Process) -> int:
    return sum(1 for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED)


def wait_until(moment: float, generators: Generators) -> None:
    while (left := moment - time.monotonic()) > 0:
        generators.check()
        time.sleep(min(left, 1.0))


@dataclass
class Window:
    broker_cores: float
    generator_cores: float
    idle_share: float
    peak_rss: int


def watch_window(process: psutil.Process, generators: Generators, begin: float, length: float) -> Window:
    """CPU use over [begin, begin + length), and the broker's RSS sampled every second."""
    wait_until(begin, generators)
    loaders = generators.processes()
    started = time.monotonic()
    broker_cpu = sum(process.cpu_times()[:2])
    loader_cpu = sum(sum(p.cpu_times()[:2]) for p in loaders)
    machine = psutil.cpu_times()
    peak = 0
    while (left := begin + length - time.monotonic()) > 0:
        peak = max(peak, int(process.memory_info().rss))
        generators.check()
        time.sleep(min(left, 1.0))
    wall = time.monotonic() - started
    peak = max(peak, int(process.memory_info().rss))
    after = psutil.cpu_times()
    total = sum(after) - sum(machine)
    return Window(
        broker_cores=(sum(process.cpu_times()[:2]) - broker_cpu) / wall,
        generator_cores=(sum(sum(p.cpu_times()[:2]) for p in loaders) - loader_cpu) / wall,
        idle_share=(after.idle - machine.idle) / total if total > 0 else 0.0,
        peak_rss=peak,
    )


@dataclass
class GeneratorResult:
    latencies: list[NDArray[np.float64]]  # per window, seconds
    lags: list[NDArray[np.float64]]  # per window: how late each renew was sent
    sent_in_windows: int
    failures: int
    unanswered: int


class Generators:
    """The load-generator processes ('spawn': no zmq context is copied into a child), and a
    pipe to each for 'start at' and the results."""

    def __init__(self, address: str, plan: Plan, per_generator: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._inbox: list[list[tuple[str, Any]]] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for first in range(0, plan.hosts, per_generator):
            mine, theirs = context.Pipe()
            count = min(per_generator, plan.hosts - first)
            self._pipes.append(mine)
            self._inbox.append([])
            self._processes.append(
                context.Process(
                    target=generator_process,
                    args=(address, plan, first, count, theirs),
                    name=f"bench-scale-generator-{first}",
                    daemon=True,
                )
            )

    def __enter__(self) -> Generators:
        try:
            for process in self._processes:
                process.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(p.pid) for p in self._processes if p.pid is not None]

    def _dead(self) -> None:
        for process in self._processes:
            if process.exitcode not in (None, 0):
                raise RuntimeError(f"{process.name} exited with code {process.exitcode}")

    def _take(self, index: int) -> None:
        """Move what generator ``index`` said into its inbox; raise at once if it failed."""
        pipe = self._pipes[index]
        while not pipe.closed and pipe.poll():
            try:
                kind, value = pipe.recv()
            except EOFError:  # it has said all it will
                pipe.close()
                return
            if kind == "error":
                raise RuntimeError(f"a load generator failed: {value}")
            self._inbox[index].append((kind, value))

    def check(self) -> None:
        """Raise if a generator failed or died; keep what the others said for later."""
        for index in range(len(self._pipes)):
            self._take(index)
        self._dead()

    def _receive(self, index: int, deadline: float, expected: str) -> Any:
        while True:
            self._take(index)
            if self._inbox[index]:
                kind, value = self._inbox[index].pop(0)
                if kind != expected:
                    raise RuntimeError(f"a load generator said {kind!r}, not {expected!r}")
                return value
            self._dead()
            if self._pipes[index].closed:
                raise RuntimeError(f"{self._processes[index].name} ended without reporting {expected!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"a load generator did not report {expected!r} in time")
            self._pipes[index].poll(0.2)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for index in range(len(self._pipes)):
            self._receive(index, deadline, "ready")

    def start(self, moment: float) -> None:
        for pipe in self._pipes:
            pipe.send(("start", moment))

    def results(self, deadline: float) -> list[GeneratorResult]:
        return [GeneratorResult(**self._receive(i, deadline, "results")) for i in range(len(self._pipes))]

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                if not pipe.closed:
                    pipe.send(("stop", 0.0))
        for process in self._processes:
            if process.pid is None:
                continue  # never started
            process.join(timeout=DRAIN)
            if process.is_alive():
                process.kill()
                process.join()


# ------------------------------------------------------------------ a load generator


@dataclass
class LoadHost:
    """One simulated host: its own connection, holder, projects and lease tokens."""

    socket: zmq.Socket[bytes]
    name: str
    holder: bytes  # the holder object, JSON
    projects: list[str]
    tokens: dict[str, int] = field(default_factory=dict)
    renew_tail: bytes = b""  # the renew request after its id, once every lease is granted
    sent: int = 0


@dataclass
class Pending:
    host: LoadHost
    due: float  # monotonic; latency counts from here
    kind: str  # "acquire" or "renew"
    project: str = ""


def generator_process(address: str, plan: Plan, first: int, count: int, pipe: Connection) -> None:
    try:
        raise_fd_limit(2 * count + 256)  # a zmq socket holds a TCP connection and a mailbox
        with contextlib.closing(Generator(address, plan, first, count)) as generator:
            pipe.send(("ready", None))
            kind, moment = pipe.recv()
            if kind != "start":
                return
            pipe.send(("results", generator.run(moment)))
    except Exception as exc:
        with contextlib.suppress(OSError):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


class Generator:
    """Hosts ``first`` to ``first + count - 1`` of the plan, each with its own DEALER socket."""

    def __init__(self, address: str, plan: Plan, first: int, count: int) -> None:
        self.plan = plan
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.context.max_sockets = count + 64
        # Every generator draws the same joining order, and takes its own hosts' places in it.
        order = np.random.default_rng(SEED).permutation(plan.hosts)
        self.offsets = [plan.ramp * float(order[index]) / plan.hosts for index in range(first, first + count)]
        self.hosts: list[LoadHost] = []
        for index in range(first, first + count):
            if (index - first) % plan.hosts_per_connection == 0:
                sock = self.context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address)
            name = f"scale-host-{index:05d}"
            who = {"host": name, "user": "bench", "agent": f"scale-agent-{index}", "cache": "/bench/cache"}
            projects = [f"scale-{index:05d}-{j:02d}" for j in range(plan.projects_per_host)]
            self.hosts.append(LoadHost(sock, name, json.dumps(who).encode(), projects))
        self.pending: dict[bytes, Pending] = {}
        self.waiting: dict[zmq.Socket[bytes], int] = {}  # sockets awaiting replies, and how many
        self.failures = 0

    def close(self) -> None:
        for sock in {host.socket for host in self.hosts}:
            sock.close(linger=0)
        self.context.term()

    def run(self, start: float) -> dict[str, Any]:
        """Apply the plan's load from ``start`` (monotonic) on; what was measured, per window."""
        plan = self.plan
        first_window = start + plan.ramp + plan.warmup
        end = first_window + plan.repetitions * plan.window
        latencies: list[list[float]] = [[] for _ in range(plan.repetitions)]
        lags: list[list[float]] = [[] for _ in range(plan.repetitions)]
        sent_in_windows = 0

        def window_of(moment: float) -> int | None:
            rep = int((moment - first_window) // plan.window)
            return rep if moment >= first_window and rep < plan.repetitions else None

        # (when to act, host number, kind, when it was due): each host acquires at its offset in
        # the ramp, renews one interval after that, and every interval from then on.
        events = [
            (start + offset, number, "acquire", start + offset) for number, offset in enumerate(self.offsets)
        ]
        heapq.heapify(events)
        while True:
            now = time.monotonic()
            while events and events[0][0] <= now:
                at, number, kind, due = heapq.heappop(events)
                host = self.hosts[number]
                if kind == "acquire":
                    for project in host.projects:
                        tail = b'","op":"acquire","project":"%s","holder":%s}' % (
                            project.encode(),
                            host.holder,
                        )
                        self.send(host, tail, Pending(host, due, kind, project))
                    heapq.heappush(events, (due + plan.interval, number, "renew", due + plan.interval))
                    continue
                if not self.renew_ready(host):
                    # Its grants are not all answered yet (the ramp overloaded the broker): try
                    # again shortly, still timed from when the renew was due.
                    heapq.heappush(events, (at + 0.01, number, kind, due))
                    continue
                self.send(host, host.renew_tail, Pending(host, due, kind))
                rep = window_of(due)
                if rep is not None:
                    lags[rep].append(now - due)
                    sent_in_windows += 1
                heapq.heappush(events, (due + plan.interval, number, kind, due + plan.interval))
            if events and events[0][3] >= end:
                events.clear()  # the last window is over: only answers are still awaited
            if not events and (not self.pending or now > end + DRAIN):
                break
            next_at = events[0][0] if events else end + DRAIN
            for item, reply, answered_at in self.receive(max(0.0, min(next_at - time.monotonic(), 0.05))):
                if item.kind == "acquire":
                    if reply.get("ok") and reply.get("status") == "granted":
                        item.host.tokens[item.project] = int(reply["token"])
                    else:
                        self.failures += 1
                    continue
                if not reply.get("ok") or not all(result.get("ok") for result in reply.get("results", [])):
                    self.failures += 1
                rep = window_of(item.due)
                if rep is not None:
                    latencies[rep].append(answered_at - item.due)
        return {
            "latencies": [np.array(values, dtype=np.float64) for values in latencies],
            "lags": [np.array(values, dtype=np.float64) for values in lags],
            "sent_in_windows": sent_in_windows,
            "failures": self.failures,
            "unanswered": sum(1 for item in self.pending.values() if window_of(item.due) is not None),
        }

    def renew_ready(self, host: LoadHost) -> bool:
        if host.renew_tail:
            return True
        if len(host.tokens) < len(host.projects):
            return False
        leases = [{"project": p, "token": host.tokens[p], "unflushed": 0} for p in host.projects]
        host.renew_tail = b'","op":"renew","holder":%s,"leases":%s}' % (
            host.holder,
            json.dumps(leases).encode(),
        )
        return True

    def send(self, host: LoadHost, tail: bytes, item: Pending) -> None:
        """One request: the protocol's envelope with a fresh id, then the prepared rest."""
        host.sent += 1
        request_id = f"{host.name}-{host.sent}".encode()
        host.socket.send(b'{"v":%d,"id":"%s%s' % (protocol.VERSION, request_id, tail))
        self.pending[request_id] = item
        self.waiting[host.socket] = self.waiting.get(host.socket, 0) + 1

    def receive(self, timeout: float) -> list[tuple[Pending, dict[str, Any], float]]:
        """Replies that arrive within ``timeout`` seconds on the sockets that await one, with
        the request each answers and when it arrived."""
        if not self.waiting:
            time.sleep(timeout)
            return []
        ready, _, _ = zmq.select(list(self.waiting), [], [], timeout)
        answers = []
        for sock in ready:
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.monotonic()
                reply = protocol.decode(frame, limit=None)
                item = self.pending.pop(str(reply.get("id", "")).encode(), None)
                if item is None:
                    continue
                self.waiting[sock] -= 1
                if not self.waiting[sock]:
                    del self.waiting[sock]
                answers.append((item, reply, now))
        return answers
