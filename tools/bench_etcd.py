"""Benchmark section `etcd`: a durable lease cycle on the embedded broker, on the etcd lease
store, and as a plain etcd lock, all measured in one run on this machine.

Three ways to take and give back exclusive write access to one project, each durable before it
is answered:

- *embedded*: ``acquire`` + ``release`` sent to a real `dbguard broker` (LMDB, synced).
- *etcd store*: the same two requests answered by `dbguard.lease.etcd.EtcdLeases` on a real
  three-member etcd cluster on loopback (each member syncs its log to disk).
- *plain etcd lock*: what a site could do with etcd alone, through the same HTTP client
  (etcd3gw's): grant an etcd lease, create the lock key bound to it only if absent, delete the
  key, revoke the lease. Four requests, each a consensus write.

Figures (rates in cycles per second, one project per client so clients never contend):

- ``etcd.embedded_per_s_1``, ``etcd.store_per_s_1``, ``etcd.lock_per_s_1``: one client.
- ``etcd.embedded_per_s_16``, ``etcd.store_per_s_16``, ``etcd.lock_per_s_16``: 16 client
  processes running at once for a fixed window; total cycles / window.
- ``etcd.embedded_vs_lock_1``, ``etcd.embedded_vs_lock_16``: the embedded broker's rate over
  the plain etcd lock's; how much the embedded default gains over a site's etcd.
- ``etcd.store_vs_lock_1``, ``etcd.store_vs_lock_16``: the etcd lease store's rate over the
  plain lock's; what dbguard's rules (queue, orphan, lock-delay, fencing) cost on etcd.

Each rate is the median over the repetitions; the three systems are measured in turn within
each repetition so that they see the same background load.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import queue
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from etcd3gw.client import Etcd3Client

from dbguard.lease.client import Client
from dbguard.lease.etcd import EtcdAddress, EtcdLeases, configure
from dbguard.lease.etcd_cluster import EtcdCluster, etcd_unavailable
from tools.bench_lease import cycle, holder, running_broker

log = logging.getLogger("bench.etcd")

TARGETS: dict[str, tuple[str, float]] = {
    "etcd.embedded_vs_lock_1": (">=", 10.0),
    "etcd.embedded_vs_lock_16": (">=", 10.0),
}

CLIENTS = 16
SYSTEMS = ("embedded", "store", "lock")
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Plan:
    cycles: int  # timed cycles of the single client, per system and repetition
    window: float  # seconds the concurrent clients run, per system and repetition
    repetitions: int


FULL = Plan(cycles=300, window=3.0, repetitions=3)
QUICK = Plan(cycles=60, window=1.0, repetitions=3)


# ------------------------------------------------------------------ cycles


def cycle_maker(system: str, address: str, index: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one durable cycle, close) for client ``index`` of ``system`` at ``address``."""
    project, who = f"bench-etcd-{index}-{uuid.uuid4().hex[:8]}", holder(index)
    if system in ("embedded", "store"):
        service: Client | EtcdLeases = Client(address) if system == "embedded" else EtcdLeases(address)
        return functools.partial(cycle, service, project, who), service.close
    host, port = EtcdAddress.parse(address).endpoints[index % 3]
    client = Etcd3Client(host=host, port=port, timeout=10, api_path="/v3/")
    key = f"bench-lock/{project}"

    def lock_cycle() -> None:
        lease = client.lease(30)
        if not client.create(key, "locked", lease=lease):
            raise RuntimeError(f"the plain lock {key} was not free")
        client.delete(key)
        lease.revoke()

    return lock_cycle, client.session.close


def timed(cycle: Callable[[], None], count: int) -> float:
    """Cycles per second of ``count`` cycles in a row."""
    started = time.perf_counter()
    for _ in range(count):
        cycle()
    return count / (time.perf_counter() - started)


# ------------------------------------------------------------------- run


def run(quick: bool) -> dict[str, float]:
    why = etcd_unavailable()
    if why:
        raise RuntimeError(f"the etcd section needs etcd: {why}")
    plan = QUICK if quick else FULL
    rates: dict[tuple[str, int], list[float]] = {(s, n): [] for s in SYSTEMS for n in (1, CLIENTS)}
    with (
        tempfile.TemporaryDirectory(prefix="dbguard-bench-etcd-") as tmp,
        etcd_cluster(Path(tmp)) as cluster,
        running_broker(Path(tmp)) as broker,
    ):
        store_address = cluster.url("bench")
        configure(store_address, ttl=30.0, lock_delay=5.0)
        addresses = {"embedded": broker.address, "store": store_address, "lock": cluster.url()}
        singles = {s: cycle_maker(s, addresses[s], 0) for s in SYSTEMS}
        try:
            with ConcurrentClients(addresses, CLIENTS, plan) as clients:
                for cycle, _ in singles.values():
                    timed(cycle, 10)  # connections open, sessions granted
                for rep in range(1, plan.repetitions + 1):
                    for system in SYSTEMS:
                        rates[system, 1].append(timed(singles[system][0], plan.cycles))
                        rates[system, CLIENTS].append(clients.run_round(system))
                    log.info(
                        "repetition %d/%d: %s",
                        rep,
                        plan.repetitions,
                        ", ".join(f"{s} {rates[s, 1][-1]:.0f}/{rates[s, CLIENTS][-1]:.0f}" for s in SYSTEMS),
                    )
        finally:
            for _, close in singles.values():
                close()
    median = {key: statistics.median(values) for key, values in rates.items()}
    figures: dict[str, float] = {}
    for n in (1, CLIENTS):
        for system in SYSTEMS:
            figures[f"etcd.{system}_per_s_{n}"] = median[system, n]
        figures[f"etcd.embedded_vs_lock_{n}"] = median["embedded", n] / median["lock", n]
        figures[f"etcd.store_vs_lock_{n}"] = median["store", n] / median["lock", n]
    return figures


@contextlib.contextmanager
def etcd_cluster(workdir: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(workdir / "etcd")
    cluster.start()
    log.info("etcd cluster ready at %s", cluster.url())
    try:
        yield cluster
    finally:
        cluster.stop()


class ConcurrentClients:
    """``count`` client processes per system, all started up front; a round runs one system's
    clients together for one window. Processes, so one GIL does not serialise the clients."""

    def __init__(self, addresses: dict[str, str], count: int, plan: Plan) -> None:
        context = multiprocessing.get_context("spawn")
        self.count, self.plan = count, plan
        self._results: Queue[tuple[str, Any]] = context.Queue()
        self._barriers = {system: context.Barrier(count + 1) for system in addresses}
        self._processes = [
            context.Process(
                target=client_process,
                args=(system, address, index, plan, self._barriers[system], self._results),
                daemon=True,
            )
            for system, address in addresses.items()
            for index in range(count)
        ]

    def __enter__(self) -> ConcurrentClients:
        for process in self._processes:
            process.start()
        for barrier in self._barriers.values():
            barrier.wait(timeout=STARTUP_TIMEOUT * 2)  # every client connected and warmed up
        return self

    def __exit__(self, *exc: object) -> None:
        for barrier in self._barriers.values():
            barrier.abort()
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()

    def run_round(self, system: str) -> float:
        self._barriers[system].wait(timeout=STARTUP_TIMEOUT)
        total = 0.0
        deadline = time.monotonic() + self.plan.window + STARTUP_TIMEOUT
        for _ in range(self.count):
            try:
                _, outcome = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"the {system} clients did not report a round in time") from None
            if isinstance(outcome, str):
                raise RuntimeError(f"a {system} client failed: {outcome}")
            total += outcome
        return total


def client_process(
    system: str, address: str, index: int, plan: Plan, barrier: Barrier, results: Queue[tuple[str, Any]]
) -> None:
    """One concurrent client: warm up, then one window per round, reporting cycles per second."""
    try:
        cycle, close = cycle_maker(system, address, index + 1)
        try:
            timed(cycle, 5)
            barrier.wait(timeout=STARTUP_TIMEOUT * 2)
            for _ in range(plan.repetitions):
                barrier.wait(timeout=STARTUP_TIMEOUT * 20)
                cycles, started = 0, time.monotonic()
                while time.monotonic() - started < plan.window:
                    cycle()
                    cycles += 1
                results.put((system, cycles / (time.monotonic() - started)))
        finally:
            close()
    except threading.BrokenBarrierError:
        return
    except Exception as exc:
        results.put((system, f"{type(exc).__name__}: {exc}"))
        barrier.abort()
