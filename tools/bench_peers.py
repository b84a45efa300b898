"""Benchmark section `peers`: dbguard against what labs use without it, on a real network mount.

Users without dbguard write image stacks straight onto the share with h5py or mrcfile, and guard
a project with a lock file (flufl.lock). Here all of them work on one sshfs mount over loopback,
as the multi-host test bed mounts the share: a private sshd exports a directory, and two sshfs
processes mount it, one for the writing host and one for a browsing host, each with its own
client cache, as two NFS clients have. dbguard's caches stay on the local disk (the cache
refuses network filesystems); a real broker runs, and this host's agent is started on demand by
the first `dbguard.acquire`, with its periodic flush pushed out of reach so that only the timed
`dbguard.flush` writes to the share.

Each repetition uses a fresh project directory and fresh files, all removed afterwards, and
runs every side once, in an order that rotates from one repetition to the next; each timed
write starts after `os.sync()`, so no side pays for writing back another's pages. A ratio is
taken per repetition; the figure is the median of those ratios. A first, unrecorded repetition
absorbs one-time costs (the agent's start, the mounts' first connections). Images are N
distinct 256x256 float32 arrays (256 KiB each).

Writing (``<baseline's seconds> / <ours>``, higher is better for dbguard):

- ``peers.write_vs_h5py``: dbguard is `dbguard.open(project, name, "a")`, one ``append`` per
  image, close, then `dbguard.flush(project)`, which returns once the images are in a segment
  on the share, fsynced, and published in a manifest. h5py is its fastest way to stream images:
  a contiguous float32 dataset of shape (N, 256, 256) created in a new file on the mount, one
  ``dset[i] = image`` per image, close, then fsync of the file and its directory (the same
  durability as a flush).
- ``peers.write_vs_mrcfile``: mrcfile is ``mrcfile.new(path)`` and ``set_data(stack)`` of the
  N images already stacked in one array (the stacking is not timed: mrcfile's fastest way,
  faster here than ``new_mmap``), close, fsync of the file and its directory.
- ``peers.append_vs_h5py``: h5py's time against dbguard's appends alone (open, N appends,
  close): what the writing process waits for when, as in normal use, the agent flushes in the
  background.
- ``peers.write_vs_raw`` (at most about 1): the raw write is N ``write`` calls of
  the images' bytes to one new file on the mount, fsync of the file and its directory: the
  most any tool can get through this mount. Both dbguard and h5py have to push the same bytes
  through it, so neither can be much faster than the raw write; this figure shows how close
  dbguard gets.

Reading from the browsing host (``<baseline's seconds> / <ours>``, higher is better): every side
reads the N images through the browsing host's mount into one preallocated (N, 256, 256) array,
which is then checked against the images written (not timed).

- ``peers.read_vs_h5py``: dbguard is `dbguard.open(project, name, "r")` (browse, no lease) on
  the browsing host, ``out[i] = db[i]`` for each image, close; cold: its first open, which
  copies the segment from the share into that host's cache and verifies every checksum. h5py
  is ``h5py.File(path, "r")`` and ``dset.read_direct`` of each image (FUSE drops a file's page
  cache when it is opened again, so every h5py read crosses the mount, as a first one does).
- ``peers.read_vs_mrcfile``: mrcfile is ``mrcfile.open(path)``, which reads the whole stack,
  then ``out[i] = mrc.data[i]``.
- ``peers.read_warm_vs_h5py``: dbguard's second open on the browsing host, served from the
  verified local copy, against h5py's read.

Locking (``<baseline's cycle> / <ours>``, higher is better):

- ``peers.lock_vs_flufl``: one cycle of `dbguard.acquire(project)` + `dbguard.release(project)`,
  the calls users make: each goes through this host's agent to the broker (a durable grant), and
  an acquire also fences the project store with the new token and writes the writer record on
  the share, a release rewrites the record. flufl.lock's cycle is ``lock()`` + ``unlock()`` of a
  `flufl.lock.Lock` on the mount. flufl.lock decides whether it holds the lock from the lock
  file's link count, which sshfs cannot report (SFTP carries no link count: every file shows
  ``st_nlink`` 1), so unmodified it acquires the lock and then fails to release it
  (``NotLockedError``, the lock file left behind). The cycle is therefore timed with one change:
  its link-count check still stats the lock file over the mount, the same round trip, but takes
  "exists" for the two links the server really has. ``peers.flufl_unmodified_works`` records
  whether unmodified flufl.lock completed a cycle on this mount (1) or not (0).
- ``peers.lock_vs_flufl_broker``: flufl.lock's cycle against a bare broker cycle (``acquire`` +
  ``release`` sent with `dbguard.lease.client.Client`, no agent, no share), the cost of the lease
  itself.

Raw figures, medians over repetitions: ``peers.ours_write_s``, ``peers.ours_append_s``,
``peers.h5py_write_s``, ``peers.mrcfile_write_s``, ``peers.raw_write_s``,
``peers.ours_read_cold_s``, ``peers.ours_read_warm_s``, ``peers.h5py_read_s``,
``peers.mrcfile_read_s``, ``peers.raw_read_s`` (seconds for all N images);
``peers.mount_write_mib_per_s`` and ``peers.mount_read_mib_per_s`` (the raw write and read);
``peers.dbguard_cycle_ms``, ``peers.broker_cycle_ms``, ``peers.flufl_cycle_ms`` (median cycle);
and ``peers.images``, the N of this run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import dbguard
from dbguard.agent import local as local_agent
from dbguard.data.durable import fsync_dir
from dbguard.data.flushing import drop_cache
from dbguard.lease.client import Client
from tools.bench_data import Hosts, bench_hosts, make_images, quietly
from tools.bench_lease import cycle, holder
from tools.sshfs import SshServer, sshfs_unavailable

log = logging.getLogger("bench.peers")

TARGETS: dict[str, tuple[str, float]] = {
    "peers.write_vs_h5py": (">=", 2.0),
    "peers.read_vs_h5py": (">=", 1.0),
    "peers.lock_vs_flufl": (">=", 1.0),
}

SHAPE = (256, 256)
DB_NAME = "images"
MIB = 1 << 20
# Lock cycles run in blocks of this many per side, the sides taking turns, so that all three
# see the same background load.
LOCK_BLOCK = 10
# Python packages the baselines need: (import name, what to install).
BASELINE_PACKAGES = (("h5py", "h5py"), ("mrcfile", "mrcfile"), ("flufl.lock", "flufl.lock"))

Image = NDArray[np.float32]
Stack = NDArray[np.float32]
Side = tuple[str, Callable[[], Any]]  # a name and what to time


@dataclass(frozen=True)
class Plan:
    images: int  # N, per repetition
    repetitions: int  # figures are medians over these
    lock_cycles: int  # timed cycles per side per repetition


FULL = Plan(images=2000, repetitions=5, lock_cycles=100)
QUICK = Plan(images=300, repetitions=3, lock_cycles=30)
# For tests/test_bench_sections.py: runs every code path in seconds; its figures mean nothing.
TINY = Plan(images=6, repetitions=1, lock_cycles=2)


@dataclass(frozen=True)
class Peers:
    hosts: Hosts  # the broker and both hosts' settings (local cache directories)
    export: Path  # the directory the loopback sshd serves: the file server's disk
    writer_mount: Path  # the writing host's sshfs mount of ``export``
    browser_mount: Path  # the browsing host's own sshfs mount of ``export``


def run(quick: bool) -> dict[str, float]:
    return measure(QUICK if quick else FULL)


def missing() -> str | None:
    """Why this section cannot run here, naming what to install, or None if it can."""
    why = sshfs_unavailable()
    if why is not None:
        return f"the peers section needs a loopback sshfs mount: {why}"
    absent = [package for name, package in BASELINE_PACKAGES if importlib.util.find_spec(name) is None]
    if absent:
        return (
            f"the peers section's baselines need the Python packages {', '.join(absent)}; install the "
            "test extras into this environment: pip install -e '.[test]'"
        )
    return None


def measure(plan: Plan) -> dict[str, float]:
    why = missing()
    if why is not None:
        raise RuntimeError(why)
    images = make_images(plan.images)
    stack = np.stack(images)  # mrcfile's input, and what every read is checked against
    out = np.empty_like(stack)  # every read lands here
    needed = 8 * stack.nbytes  # ours (cache, segment, browser's copy), h5py, mrcfile, raw, slack
    free = shutil.disk_usage(Path(os.environ.get("TMPDIR", "/tmp"))).free
    if free < needed:
        raise RuntimeError(
            f"the peers section needs {needed / MIB:.0f} MiB free in the temporary directory for "
            f"{plan.images} images, but only {free / MIB:.0f} MiB are free"
        )
    samples: dict[str, list[float]] = defaultdict(list)
    with peer_hosts() as peers:
        works = flufl_works(peers)
        log.info(
            "unmodified flufl.lock %s a lock cycle on sshfs", "completes" if works else "cannot complete"
        )
        repetition(peers, "warm-up", 0, images, stack, out, plan)
        for rep in range(plan.repetitions):
            found = repetition(peers, f"rep-{rep}", rep + 1, images, stack, out, plan)
            for name, value in found.items():
                samples[name].append(value)
            log.info(
                "repetition %d/%d: write ours %.2fs (appends %.2fs), h5py %.2fs, mrcfile %.2fs, raw %.2fs; "
                "read ours cold %.2fs, warm %.3fs, h5py %.2fs, mrcfile %.2fs, raw %.2fs; "
                "cycle dbguard %.2f ms, broker %.2f ms, flufl %.2f ms",
                rep + 1,
                plan.repetitions,
                found["ours_write_s"],
                found["ours_append_s"],
                found["h5py_write_s"],
                found["mrcfile_write_s"],
                found["raw_write_s"],
                found["ours_read_cold_s"],
                found["ours_read_warm_s"],
                found["h5py_read_s"],
                found["mrcfile_read_s"],
                found["raw_read_s"],
                found["dbguard_cycle_ms"],
                found["broker_cycle_ms"],
                found["flufl_cycle_ms"],
            )
    figures = {f"peers.{name}": statistics.median(values) for name, values in samples.items()}
    figures["peers.images"] = float(plan.images)
    figures["peers.flufl_unmodified_works"] = 1.0 if works else 0.0
    return figures


# ------------------------------------------------------------------ setting


@contextlib.contextmanager
def peer_hosts() -> Iterator[Peers]:
    """A broker, two hosts' local settings, and each host's own sshfs mount of one export;
    unmounted, stopped and removed on exit (the mounts first, so nothing is left mounted in a
    directory about to be removed)."""
    with contextlib.ExitStack() as stack:
        hosts = stack.enter_context(bench_hosts())
        server = stack.enter_context(SshServer(hosts.root / "sshd"))
        export = hosts.root / "export"
        export.mkdir()
        writer = stack.enter_context(server.mount(export, hosts.root / "mnt-writer"))
        browser = stack.enter_context(server.mount(export, hosts.root / "mnt-browser"))
        yield Peers(hosts, export, writer.mount_point, browser.mount_point)


def repetition(
    peers: Peers, name: str, rotation: int, images: Sequence[Image], stack: Stack, out: Stack, plan: Plan
) -> dict[str, float]:
    """One of each measurement in a fresh directory of the share, removed afterwards."""
    hosts = peers.hosts
    written = peers.writer_mount / name
    project_dir = written / "project"
    project_dir.mkdir(parents=True)
    project = dbguard.init(project_dir)
    (written / "lock-project").mkdir()
    lock_project = dbguard.init(written / "lock-project")
    with contextlib.ExitStack() as stack_:
        # Unwound in reverse: release both leases, drop both hosts' copies, then remove the
        # directory on the server's side (faster than through the mount).
        stack_.callback(shutil.rmtree, peers.export / name, ignore_errors=True)
        for settings in (hosts.browser, hosts.writer):
            cache = local_agent.cache_dir(settings)
            for project_id in (project.id, lock_project.id):
                stack_.callback(quietly, "drop a cache", drop_cache, cache, project_id)
        dbguard.acquire(project_dir, settings=hosts.writer)
        stack_.callback(quietly, "release the lease", dbguard.release, project_dir, settings=hosts.writer)

        found = measure_writes(peers, written, images, stack, rotation)
        found.update(measure_reads(peers, name, stack, out, rotation))
        found.update(measure_locks(peers, written, lock_project.path, name, rotation, plan.lock_cycles))
    return found


def rotated(sides: Sequence[Side], rotation: int) -> list[Side]:
    """The sides in turn order for this repetition: each goes first as often as the others."""
    start = rotation % len(sides)
    return [*sides[start:], *sides[:start]]


# ------------------------------------------------------------------ writing


def measure_writes(
    peers: Peers, written: Path, images: Sequence[Image], stack: Stack, rotation: int
) -> dict[str, float]:
    project_dir = written / "project"
    writer = peers.hosts.writer
    seconds: dict[str, Any] = {}
    sides: list[Side] = [
        ("ours", lambda: write_ours(project_dir, writer, images)),
        ("h5py", lambda: write_h5py(written / "stack.h5", images)),
        ("mrcfile", lambda: write_mrcfile(written / "stack.mrc", stack)),
        ("raw", lambda: write_raw(written / "stack.raw", images)),
    ]
    for side, action in rotated(sides, rotation):
        os.sync()  # nothing dirty: no side pays for writing back another's pages
        seconds[side] = action()
    ours, appends = seconds["ours"]
    h5, mrc, raw = seconds["h5py"], seconds["mrcfile"], seconds["raw"]
    return {
        "write_vs_h5py": h5 / ours,
        "write_vs_mrcfile": mrc / ours,
        "append_vs_h5py": h5 / appends,
        "write_vs_raw": raw / ours,
        "ours_write_s": ours,
        "ours_append_s": appends,
        "h5py_write_s": h5,
        "mrcfile_write_s": mrc,
        "raw_write_s": raw,
        "mount_write_mib_per_s": stack.nbytes / MIB / raw,
    }


def write_ours(project_dir: Path, settings: Any, images: Sequence[Image]) -> tuple[float, float]:
    """Seconds for the appends and the flush together, and for the appends alone."""
    started = time.perf_counter()
    with dbguard.open(project_dir, DB_NAME, "a", settings=settings) as db:
        for image in images:
            db.append(image)
    appended = time.perf_counter()
    result = dbguard.flush(project_dir, settings=settings)
    done = time.perf_counter()
    if result["records"] != len(images):
        raise RuntimeError(f"the flush wrote {result['records']} records, not the {len(images)} appended")
    return done - started, appended - started


def write_h5py(path: Path, images: Sequence[Image]) -> float:
    import h5py  # type: ignore[import-untyped, unused-ignore]  # ships no type hints

    started = time.perf_counter()
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset(DB_NAME, shape=(len(images), *SHAPE), dtype=np.float32)
        for index, image in enumerate(images):
            dataset[index] = image
    sync_file(path)
    return time.perf_counter() - started


def write_mrcfile(path: Path, stack: Stack) -> float:
    import mrcfile  # type: ignore[import-untyped, unused-ignore]  # ships no type hints

    started = time.perf_counter()
    with mrcfile.new(path) as mrc:
        mrc.set_data(stack)
    sync_file(path)
    return time.perf_counter() - started


def write_raw(path: Path, images: Sequence[Image]) -> float:
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for image in images:
            handle.write(image.data)
        os.fsync(handle.fileno())
    fsync_dir(path.parent)
    return time.perf_counter() - started


def sync_file(path: Path) -> None:
    """What a flush guarantees, for a file another tool has closed: its data and its name on disk.
    Over sshfs the fsync reaches the server (fsync@openssh.com); close already waited for the
    writes to arrive there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


# ------------------------------------------------------------------ reading


def measure_reads(peers: Peers, name: str, stack: Stack, out: Stack, rotation: int) -> dict[str, float]:
    seen = peers.browser_mount / name  # the same directory, through the browsing host's mount
    browser = peers.hosts.browser
    seconds: dict[str, Any] = {}
    sides: list[Side] = [
        # The browsing host's first open is cold (it copies and verifies the segment), the next warm.
        ("ours", lambda: tuple(read_ours(seen / "project", browser, out) for _ in range(2))),
        ("h5py", lambda: read_h5py(seen / "stack.h5", out)),
        ("mrcfile", lambda: read_mrcfile(seen / "stack.mrc", out)),
        ("raw", lambda: read_raw(seen / "stack.raw", out)),
    ]
    for side, action in rotated(sides, rotation):
        out.fill(0)  # a side that read nothing must not pass on what another side read
        seconds[side] = action()
        if not np.array_equal(out, stack):
            raise RuntimeError(f"{side} read back images that differ from those written")
    cold, warm = seconds["ours"]
    h5, mrc, raw = seconds["h5py"], seconds["mrcfile"], seconds["raw"]
    return {
        "read_vs_h5py": h5 / cold,
        "read_vs_mrcfile": mrc / cold,
        "read_warm_vs_h5py": h5 / warm,
        "ours_read_cold_s": cold,
        "ours_read_warm_s": warm,
        "h5py_read_s": h5,
        "mrcfile_read_s": mrc,
        "raw_read_s": raw,
        "mount_read_mib_per_s": stack.nbytes / MIB / raw,
    }


def read_ours(project_dir: Path, settings: Any, out: Stack) -> float:
    started = time.perf_counter()
    with dbguard.open(project_dir, DB_NAME, "r", settings=settings) as db:
        for index in range(len(out)):
            out[index] = db[index]
    return time.perf_counter() - started


def read_h5py(path: Path, out: Stack) -> float:
    import h5py  # type: ignore[import-untyped, unused-ignore]  # ships no type hints

    started = time.perf_counter()
    with h5py.File(path, "r") as handle:
        dataset = handle[DB_NAME]
        for index in range(len(out)):
            dataset.read_direct(out, np.s_[index], np.s_[index])
    return time.perf_counter() - started


def read_mrcfile(path: Path, out: Stack) -> float:
    import mrcfile  # type: ignore[import-untyped, unused-ignore]  # ships no type hints

    started = time.perf_counter()
    with mrcfile.open(path) as mrc:
        for index in range(len(out)):
            out[index] = mrc.data[index]
    return time.perf_counter() - started


def read_raw(path: Path, out: Stack) -> float:
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        for index in range(len(out)):
            view = memoryview(out[index]).cast("B")
            if handle.readinto(view) != len(view):
                raise RuntimeError(f"{path} ended before image {index}")
    return time.perf_counter() - started


# ------------------------------------------------------------------ locking


def mount_lock_class() -> type[Any]:
    """flufl.lock's Lock, with its link-count test answered by the lock file's existence, checked
    by the same stat over the mount (see the module docstring: sshfs reports no link counts)."""
    from flufl.lock import Lock

    class MountLock(Lock):
        @property
        def _linkcount(self) -> int:
            try:
                os.stat(self.lockfile)
            except FileNotFoundError:
                return -1
            return 2

    return MountLock


def flufl_works(peers: Peers) -> bool:
    """Whether unmodified flufl.lock completes lock() + unlock() on the writing host's mount."""
    from flufl.lock import Lock, LockError

    directory = peers.writer_mount / "flufl-probe"
    directory.mkdir()
    try:
        lock = Lock(str(directory / "project.lck"), lifetime=timedelta(seconds=60))
        try:
            lock.lock(timeout=timedelta(seconds=10))
            lock.unlock()
        except LockError as exc:
            log.info("unmodified flufl.lock failed on sshfs: %s: %s", type(exc).__name__, exc)
            return False
        return not (directory / "project.lck").exists()
    finally:
        # What a failed unlock leaves (the lock file and the claim file), removed on the server.
        shutil.rmtree(peers.export / "flufl-probe", ignore_errors=True)


def measure_locks(
    peers: Peers, written: Path, lock_project: Path, name: str, rotation: int, cycles: int
) -> dict[str, float]:
    writer = peers.hosts.writer
    flufl_dir = written / "flufl"
    flufl_dir.mkdir()
    flufl_lock = mount_lock_class()(str(flufl_dir / "project.lck"), lifetime=timedelta(seconds=60))
    who = holder(0)
    times: dict[str, list[float]] = defaultdict(list)
    with Client(writer.broker) as client:

        def dbguard_cycle() -> None:
            dbguard.acquire(lock_project, settings=writer)
            dbguard.release(lock_project, settings=writer)

        def flufl_cycle() -> None:
            flufl_lock.lock(timeout=timedelta(seconds=10))
            flufl_lock.unlock()

        sides: list[Side] = [
            ("dbguard", dbguard_cycle),
            ("broker", lambda: cycle(client, f"bench-peers-{name}", who)),
            ("flufl", flufl_cycle),
        ]
        for _, action in sides:  # one untimed cycle each: the first pays for opening files
            action()
        for block in range(0, cycles, LOCK_BLOCK):
            for side, action in rotated(sides, rotation + block // LOCK_BLOCK):
                for _ in range(min(LOCK_BLOCK, cycles - block)):
                    started = time.perf_counter()
                    action()
                    times[side].append(time.perf_counter() - started)
    ms = {side: 1000 * statistics.median(values) for side, values in times.items()}
    return {
        "lock_vs_flufl": ms["flufl"] / ms["dbguard"],
        "lock_vs_flufl_broker": ms["flufl"] / ms["broker"],
        "dbguard_cycle_ms": ms["dbguard"],
        "broker_cycle_ms": ms["broker"],
        "flufl_cycle_ms": ms["flufl"],
    }
