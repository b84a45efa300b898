"""Benchmark section `data`: the image data path against the plain tools it stands in for.

Every figure compares dbguard with a baseline measured in the same run, on the same filesystem
(everything lives in one temporary directory, checked to be one device), so a slow or noisy
machine moves both sides together. Ours and the baseline run back to back, in an order that
alternates: appends every `BLOCK` images, reads every pass, flushes every repetition. Timed
writes start after `os.sync()`, so that neither side pays for writing back the other's dirty
pages. A ratio is taken per repetition; the figure is the median of those ratios. A first,
unrecorded repetition absorbs one-time costs.

The setting is the real one: a broker process, this host's agent started on demand by
`dbguard.acquire`, and a second cache directory that stands for another host browsing the
project without a lease. The agent's periodic flush is pushed out of reach (flush_interval), so
it never flushes while appends are timed. Images are 256x256 float32 (256 KiB). Each repetition
uses a fresh project and a fresh LMDB environment, so both sides start from empty files, and
deletes them afterwards, so every repetition sees the same disk and page-cache pressure.

Figures (``ours / baseline``, lower is better, unless said otherwise):

- ``data.append_vs_lmdb``: ``db.append(image)`` on a database opened "a" by the lease holder,
  vs one LMDB write transaction with one ``txn.put`` per image into an environment opened as the
  cache opens its own: same initial map size (``cache.DEFAULT_MAP_SIZE``, doubled when full),
  sync and metasync off. The baseline puts the array's own buffer without copying it: the best
  a plain LMDB user can do.
- ``data.read_vs_lmdb``: every image read once through ``with db.reading() as view: view[i]``
  vs ``numpy.frombuffer(txn.get(key)).reshape(shape)`` in one ``buffers=True`` read transaction.
  Both add one pixel of each image to a total: it touches the data and proves both read the same.
- ``data.flush_vs_cp`` (``our MiB/s / baseline MiB/s``, higher is better): ``dbguard.flush`` of
  the N dirty images into the project store vs ``cp`` of the baseline's LMDB ``data.mdb`` into
  the project directory, then ``sync`` (fsync) of the copy and its directory. Why data.mdb: it is
  the file a user without dbguard copies to the share; like a segment it holds the payloads in
  one file, and like the cache's records it is in the page cache. N .npy files would add N file
  creations to the baseline and make it easier to beat. Each side's throughput counts the bytes
  it wrote: the segment's size, the data.mdb's size (about 2 % more here: LMDB gives each value
  whole pages).
- ``data.browse_cold_vs_npy``, ``data.browse_vs_npy``: the other host opens the database "r"
  and reads every record once, open and close included; cold is its first open, which copies the
  segment into its cache and verifies it, warm is a later open. The baseline is ``numpy.load``
  of the same images stored as N .npy files. Nothing is dropped from the page cache: both read
  files written moments before.

Raw figures, so a reader sees absolute numbers (medians over repetitions):
``data.append_ms_per_image``, ``data.lmdb_put_ms_per_image``, ``data.read_us_per_image``,
``data.lmdb_get_us_per_image``, ``data.flush_mib_per_s``, ``data.cp_mib_per_s``,
``data.browse_cold_us_per_image``, ``data.browse_us_per_image``, ``data.npy_load_us_per_image``,
and ``data.images``, the N of this run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import statistics
import struct
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only if types-psutil is installed
from numpy.typing import NDArray

import dbguard
from dbguard.agent import local as local_agent
from dbguard.cache import DEFAULT_MAP_SIZE
from dbguard.data.flushing import drop_cache
from dbguard.data.imagedb import ImageDB
from dbguard.lease.protocol import AgentOp
from dbguard.settings import Settings, load
from tools.bench_lease import running_broker

log = logging.getLogger("bench.data")

TARGETS: dict[str, tuple[str, float]] = {
    "data.append_vs_lmdb": ("<=", 1.15),
    "data.read_vs_lmdb": ("<=", 1.2),
    "data.flush_vs_cp": (">=", 0.8),
    "data.browse_vs_npy": ("<=", 1.5),
}

SHAPE = (256, 256)
DTYPE = np.float32
DB_NAME = "images"
MIB = 1 << 20
# Seconds; far beyond any run, so the agent never flushes on its own while appends are timed.
FLUSH_INTERVAL = 100_000.0
# The agent's heartbeat thread may sleep up to ttl / 3 before it sees a shutdown; the agent
# waits 5 s for it, then exits.
AGENT_STOP_TIMEOUT = 15.0
_KEY = struct.Struct(">Q")  # big-endian, so the baseline's keys sort by index as the cache's do

Image = NDArray[np.float32]


@dataclass(frozen=True)
class Plan:
    images: int  # N, per repetition
    repetitions: int  # figures are medians over these
    read_passes: int  # timed passes of the cached reads (ours and baseline) per repetition
    browse_passes: int  # opens by the other host (the first cold) and numpy.load passes


FULL = Plan(images=2000, repetitions=5, read_passes=11, browse_passes=5)
QUICK = Plan(images=300, repetitions=3, read_passes=9, browse_passes=3)
# Appends alternate between ours and the baseline every BLOCK images, so that both see the same
# background load even on a busy machine, whose load changes within a second.
BLOCK = 50


@dataclass(frozen=True)
class Hosts:
    root: Path  # one filesystem holds everything: caches, project, LMDB baseline, .npy files
    writer: Settings  # this host: holds the lease, its agent runs
    browser: Settings  # another host: its own cache directory, no lease, no agent


def run(quick: bool) -> dict[str, float]:
    plan = QUICK if quick else FULL
    images = make_images(plan.images)
    samples: dict[str, list[float]] = defaultdict(list)
    with bench_hosts() as hosts:
        # Not recorded: a first repetition pays one-time costs unevenly between the sides (the
        # heap growing to hold encoded records, the agent finishing its start-up, and on a
        # virtual machine the host backing guest memory the first time the page cache uses it).
        repetition(hosts, "warm-up", True, images, plan)
        for rep in range(plan.repetitions):
            found = repetition(hosts, f"rep-{rep}", rep % 2 == 1, images, plan)
            for name, value in found.items():
                samples[name].append(value)
            log.info(
                "repetition %d/%d: append %.3f vs lmdb %.3f ms/image; read %.2f vs lmdb %.2f us/image; "
                "flush %.0f vs cp %.0f MiB/s; browse cold %.1f, warm %.1f vs npy %.1f us/image",
                rep + 1,
                plan.repetitions,
                found["append_ms_per_image"],
                found["lmdb_put_ms_per_image"],
                found["read_us_per_image"],
                found["lmdb_get_us_per_image"],
                found["flush_mib_per_s"],
                found["cp_mib_per_s"],
                found["browse_cold_us_per_image"],
                found["browse_us_per_image"],
                found["npy_load_us_per_image"],
            )
    figures = {f"data.{name}": statistics.median(values) for name, values in samples.items()}
    figures["data.images"] = float(plan.images)
    return figures


def make_images(count: int) -> list[Image]:
    # Distinct images, so no side reads one page-cache-hot source array over and over.
    rng = np.random.default_rng(20240601)
    return [rng.random(SHAPE, dtype=DTYPE) for _ in range(count)]


# ------------------------------------------------------------------ setting


@contextlib.contextmanager
def bench_hosts() -> Iterator[Hosts]:
    """A broker, two hosts' settings in one temporary directory; everything stopped and removed
    on exit, the agent (started on demand by the first acquire) included."""
    with contextlib.ExitStack() as stack:
        root = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="dbguard-bench-data-", ignore_cleanup_errors=True)
            )
        )
        stack.enter_context(isolated_environ(root))
        (root / "broker").mkdir()
        broker = stack.enter_context(running_broker(root / "broker"))

        def settings(cache: str) -> Settings:
            values = {"broker": broker.address, "cache": root / cache, "state": root / "state"}
            return load({**values, "flush_interval": FLUSH_INTERVAL})

        hosts = Hosts(root, settings("cache-writer"), settings("cache-browser"))
        # Registered after the broker, so it runs before the broker stops; stops only the agents of
        # this run's own cache directories, which only this run started.
        stack.callback(stop_agent, hosts.browser)
        stack.callback(stop_agent, hosts.writer)
        yield hosts


@contextlib.contextmanager
def isolated_environ(root: Path) -> Iterator[None]:
    """While it lasts, nothing of the user's (DBGUARD_* variables, config and state directories)
    reaches this process's settings or the agent it starts, which inherits os.environ."""
    names = [name for name in os.environ if name.startswith("DBGUARD_")]
    names += ["XDG_CONFIG_HOME", "XDG_STATE_HOME", "DBGUARD_FLUSH_INTERVAL"]
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name in names:
            os.environ.pop(name, None)
        os.environ["XDG_CONFIG_HOME"] = str(root / "config")
        os.environ["XDG_STATE_HOME"] = str(root / "xdg-state")
        os.environ["DBGUARD_FLUSH_INTERVAL"] = str(FLUSH_INTERVAL)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def stop_agent(settings: Settings) -> None:
    """Ask the agent of ``settings``' cache directory to shut down; kill it if it does not."""
    client = local_agent.running(settings)
    if client is None:
        return
    with client:
        pid = int(client.call_ok(AgentOp.HELLO)["pid"])
        client.call_ok(AgentOp.SHUTDOWN)
    if not wait_gone(pid, AGENT_STOP_TIMEOUT):
        log.warning("agent pid %d did not stop within %.0fs; killing it", pid, AGENT_STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5.0)
    # The agent is a child of this process (acquire spawned it): reap it, unless done already.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # A child that exited stays a zombie until it is reaped; exited is gone.
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def same_filesystem(*paths: Path) -> None:
    devices = {path: os.stat(path).st_dev for path in paths}
    if len(set(devices.values())) != 1:
        raise RuntimeError(f"the compared files must share one filesystem, but devices differ: {devices}")


def open_baseline(path: Path) -> Any:
    path.mkdir()
    # As the cache opens its environment (cache.store._open_env): no sync on commit.
    return lmdb.open(str(path), subdir=True, map_size=DEFAULT_MAP_SIZE, sync=False, metasync=False)


# -------------------------------------------------------------- repetition


def repetition(
    hosts: Hosts, name: str, ours_first: bool, images: Sequence[Image], plan: Plan
) -> dict[str, float]:
    """One of each measurement, on a fresh project and LMDB environment, removed afterwards."""
    rep_dir = hosts.root / name
    project_dir = rep_dir / "project"
    project_dir.mkdir(parents=True)
    project = dbguard.init(project_dir)
    writer_cache = local_agent.cache_dir(hosts.writer)
    browser_cache = local_agent.cache_dir(hosts.browser)
    with contextlib.ExitStack() as stack:
        # Unwound in reverse: close LMDB and the database, release, then drop both hosts' copies.
        stack.callback(shutil.rmtree, rep_dir, ignore_errors=True)
        stack.callback(quietly, "drop the browsing host's copies", drop_cache, browser_cache, project.id)
        stack.callback(quietly, "drop the writer's cache", drop_cache, writer_cache, project.id)
        dbguard.acquire(project_dir, settings=hosts.writer)
        stack.callback(quietly, "release the lease", dbguard.release, project_dir, settings=hosts.writer)
        db = stack.enter_context(dbguard.open(project_dir, DB_NAME, "a", settings=hosts.writer))
        env = open_baseline(rep_dir / "lmdb")
        stack.callback(env.close)
        same_filesystem(writer_cache, browser_cache, project_dir, rep_dir / "lmdb")

        found = measure_append(db, env, images, ours_first)
        found.update(measure_reads(db, env, images, ours_first, plan.read_passes))
        found.update(
            measure_flush(project_dir, hosts.writer, rep_dir / "lmdb" / "data.mdb", len(images), ours_first)
        )
        npy_paths = write_npy(rep_dir / "npy", images)
        found.update(
            measure_browse(project_dir, hosts.browser, npy_paths, images, ours_first, plan.browse_passes)
        )
    return found


def measure_append(db: ImageDB, env: Any, images: Sequence[Image], ours_first: bool) -> dict[str, float]:
    n = len(images)
    os.sync()  # start with nothing dirty: no writeback of earlier files during the appends
    ours = base = 0.0
    for block, start in enumerate(range(0, n, BLOCK)):
        some = images[start : start + BLOCK]
        ours_block, base_block = pair(
            (block % 2 == 0) == ours_first,
            functools.partial(append_ours, db, some),
            functools.partial(append_lmdb, env, some, start),
            sync=False,
        )
        ours += ours_block
        base += base_block
    if len(db) != n:
        raise RuntimeError(f"after {n} appends the database has {len(db)} records")
    return {
        "append_vs_lmdb": ours / base,
        "append_ms_per_image": 1000 * ours / n,
        "lmdb_put_ms_per_image": 1000 * base / n,
    }


def measure_reads(
    db: ImageDB, env: Any, images: Sequence[Image], ours_first: bool, passes: int
) -> dict[str, float]:
    n, expected = len(images), pixel_total(images)
    ours, base = [], []
    for index in range(passes):
        ours_pass, base_pass = pair(
            (index % 2 == 0) == ours_first,
            lambda: read_ours(db, n, expected),
            lambda: read_lmdb(env, n, expected),
            sync=False,  # reads of pages in the page cache; nothing was written since the last sync
        )
        ours.append(ours_pass)
        base.append(base_pass)
    return {
        "read_vs_lmdb": statistics.median(ours) / statistics.median(base),
        "read_us_per_image": 1e6 * statistics.median(ours) / n,
        "lmdb_get_us_per_image": 1e6 * statistics.median(base) / n,
    }


def measure_flush(
    project_dir: Path, settings: Settings, data_mdb: Path, n: int, ours_first: bool
) -> dict[str, float]:
    copy_dir = project_dir / "lmdb-copy"
    copy_dir.mkdir()
    flushed: list[int] = []

    def flush() -> float:
        seconds, size = flush_ours(project_dir, settings, n)
        flushed.append(size)
        return seconds

    ours, base = pair(ours_first, flush, lambda: copy_and_sync(data_mdb, copy_dir), sync=True)
    copied = (copy_dir / data_mdb.name).stat().st_size
    log.debug("flushed a segment of %d bytes; copied a data.mdb of %d bytes", flushed[0], copied)
    return {
        "flush_vs_cp": (flushed[0] / ours) / (copied / base),
        "flush_mib_per_s": flushed[0] / MIB / ours,
        "cp_mib_per_s": copied / MIB / base,
    }


def measure_browse(
    project_dir: Path,
    settings: Settings,
    npy_paths: Sequence[Path],
    images: Sequence[Image],
    ours_first: bool,
    passes: int,
) -> dict[str, float]:
    n, expected = len(images), pixel_total(images)
    os.sync()  # the .npy files were just written
    browses, loads = [], []
    for index in range(passes):
        ours, base = pair(
            (index % 2 == 0) == ours_first,
            lambda: browse(project_dir, settings, n, expected),
            lambda: load_npy(npy_paths, expected),
            sync=False,
        )
        browses.append(ours)  # the first is the other host's first open: cold
        loads.append(base)
    cold, warm, npy = browses[0], statistics.median(browses[1:]), statistics.median(loads)
    return {
        "browse_cold_vs_npy": cold / npy,
        "browse_vs_npy": warm / npy,
        "browse_cold_us_per_image": 1e6 * cold / n,
        "browse_us_per_image": 1e6 * warm / n,
        "npy_load_us_per_image": 1e6 * npy / n,
    }


def quietly(what: str, action: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Clean-up that must not hide the error that led to it (the temporary directory goes anyway)."""
    try:
        action(*args, **kwargs)
    except Exception as exc:
        log.warning("could not %s: %s", what, exc)


def pair(
    ours_first: bool, ours: Callable[[], float], baseline: Callable[[], float], *, sync: bool
) -> tuple[float, float]:
    """Run both timed callables (each returns seconds) in the order given; with ``sync``, each
    starts after `os.sync()`, so that neither pays for writing back the other's dirty pages."""
    results: dict[str, float] = {}
    for name in ("ours", "baseline") if ours_first else ("baseline", "ours"):
        if sync:
            os.sync()
        results[name] = (ours if name == "ours" else baseline)()
    return results["ours"], results["baseline"]


def pixel_total(images: Sequence[Image]) -> float:
    total = 0.0
    for image in images:
        total += float(image[0, 0])
    return total


def check_total(what: str, total: float, expected: float) -> None:
    if total != expected:
        raise RuntimeError(f"{what} summed pixels to {total!r}, but the images sum to {expected!r}")


# ------------------------------------------------------------ measurements
#
# Each returns seconds from time.perf_counter: monotonic, with the resolution a microsecond needs.


def append_ours(db: ImageDB, images: Sequence[Image]) -> float:
    started = time.perf_counter()
    for image in images:
        db.append(image)
    return time.perf_counter() - started


def append_lmdb(env: Any, images: Sequence[Image], first: int) -> float:
    started = time.perf_counter()
    for index, image in enumerate(images, first):
        key = _KEY.pack(index)
        while True:
            try:
                with env.begin(write=True) as txn:
                    txn.put(key, image)  # the array's own buffer: no copy before LMDB's
                break
            except lmdb.MapFullError:
                # Grown outside the (aborted) transaction, by doubling, as the cache grows its own.
                env.set_mapsize(2 * env.info()["map_size"])
    return time.perf_counter() - started


def read_ours(db: ImageDB, n: int, expected: float) -> float:
    total = 0.0
    started = time.perf_counter()
    with db.reading() as view:
        for index in range(n):
            total += float(view[index][0, 0])
    seconds = time.perf_counter() - started
    check_total("cached read", total, expected)
    return seconds


def read_lmdb(env: Any, n: int, expected: float) -> float:
    total = 0.0
    started = time.perf_counter()
    with env.begin(buffers=True) as txn:
        for index in range(n):
            image = np.frombuffer(txn.get(_KEY.pack(index)), dtype=DTYPE).reshape(SHAPE)
            total += float(image[0, 0])
    seconds = time.perf_counter() - started
    check_total("LMDB read", total, expected)
    return seconds


def flush_ours(project_dir: Path, settings: Settings, n: int) -> tuple[float, int]:
    """Seconds to flush, and the bytes of the segment written."""
    started = time.perf_counter()
    result = dbguard.flush(project_dir, settings=settings)
    seconds = time.perf_counter() - started
    if result["records"] != n:
        raise RuntimeError(f"the flush wrote {result['records']} records, not the {n} appended")
    return seconds, int(result["bytes"])


def copy_and_sync(source: Path, target_dir: Path) -> float:
    target = target_dir / source.name
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    # With file arguments, sync fsyncs each: the copy's data, then its directory entry.
    subprocess.run(["sync", str(target), str(target_dir)], check=True)
    return time.perf_counter() - started


def browse(project_dir: Path, settings: Settings, n: int, expected: float) -> float:
    total = 0.0
    started = time.perf_counter()
    with dbguard.open(project_dir, DB_NAME, "r", settings=settings) as db:
        for index in range(n):
            total += float(db[index][0, 0])
    seconds = time.perf_counter() - started
    check_total("browse", total, expected)
    return seconds


def write_npy(directory: Path, images: Sequence[Image]) -> list[Path]:
    directory.mkdir()
    paths = [directory / f"{index:06d}.npy" for index in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        np.save(path, image)
    return paths


def load_npy(paths: Sequence[Path], expected: float) -> float:
    total = 0.0
    started = time.perf_counter()
    for path in paths:
        total += float(np.load(path)[0, 0])
    seconds = time.perf_counter() - started
    check_total("numpy.load", total, expected)
    return seconds
