"""Benchmark section `workers`: worker nodes appending images through the lease holder.

A cluster job's workers do not hold the project's lease: one host holds it and serves the
project (`dbguard acquire PROJECT --serve`), and every worker opens the database with
``dbguard.open(project, name, "a", remote=True)`` and appends through that host, whose server
process writes the records into its own cache. Without dbguard, each worker writes a file of
its own straight onto the share. Both run here on whole simulated hosts (`tools.testbed.SimHost`:
each its own hostname, its own /tmp, and so its own cache and agent, and its own sshfs mount of
the share, with its own client cache, over a private loopback sshd). A real broker runs. One host
holds and serves the project; each worker is a process on a host of its own, started once and
reused for every run, holding N distinct 256x256 float32 images (256 KiB each) that it made
before anything is timed.

A run starts 1, 2 or 4 workers at once: each first prepares (connects, for ours), says so, and
waits; once all are ready (and after `os.sync()`, so no run pays for writing back an earlier
one's pages) this process tells them all to go. Each worker times its own part with the
system-wide monotonic clock; a run's time is from the earliest worker's start to the last
worker's end. Its figure is the total payload of all workers (workers x N x 256 KiB) in MiB
over that time, in MiB/s, higher is better:

- ``workers.holder_mib_s_1``, ``workers.holder_mib_s_2``, ``workers.holder_mib_s_4``: each worker
  opens the project's database through the holder (``dbguard.open(..., "a", remote=True)``,
  which asks the lease service who serves the project and says hello to that host's server),
  appends its N images with one ``db.extend(images)`` (pipelined, several in flight) and
  closes; the time includes the last reply, so every image has been acknowledged by the holder:
  written into the holder's cache (LMDB, as a local writer's appends are) and marked dirty. It
  does not include a flush to the share: the holder's agent does that in the background, as
  for any writer of that host, and its periodic flush is pushed out of reach here
  (``DBGUARD_FLUSH_INTERVAL=3600``). Every run uses a fresh project (so a fresh, empty cache
  environment on the holder), served on loopback (``--address tcp://127.0.0.1:0``); all workers
  append to one database, and the indices they get back are checked to be exactly 0 to
  workers x N - 1, each once. After the run, untimed, the holder releases the project (its
  agent flushes it to the share), its cache copy is dropped and the project removed from the
  share.
- ``workers.hdf5_mount_mib_s_1``, ``workers.hdf5_mount_mib_s_2``, ``workers.hdf5_mount_mib_s_4``:
  what workers do without dbguard: each creates an HDF5 file of its own with h5py on its own
  sshfs mount of the share, a contiguous float32 dataset of shape (N, 256, 256), writes it with
  one ``dataset[i] = image`` per image, and closes the file (close waits for sshfs to get the
  writes to the server; no fsync, as the holder's appends are not fsynced either). The files
  are removed after each run.
- ``workers.tcp_loopback_mib_s``: the ceiling of the holder's transport on this machine, raw
  TCP on 127.0.0.1 in the same run: one sender process and one receiver process, the sender
  ``sendall``-ing 4 MiB buffers until it has sent as many bytes as 4 workers append
  together, the receiver ``recv_into``-ing them into a 4 MiB buffer and answering one byte once
  it has them all; timed by the sender from its first send to that answer.

Removing what a run wrote keeps every run on the same footing: on a virtual machine, page cache
that grows into memory the guest has never used costs several times more to fill (here writing
400 MiB into new page cache took about 2 s instead of 0.2 s), so runs that kept their data
would each be slower than the one before.

Ratios (higher is better), each taken within one repetition:

- ``workers.holder_vs_hdf5_4``: ``holder_mib_s_4 / hdf5_mount_mib_s_4``.
- ``workers.holder_vs_tcp_4``: ``holder_mib_s_4 / tcp_loopback_mib_s``, how close 4 workers
  through the holder come to what one TCP stream carries on loopback.

Each repetition runs, for 1, 2 and 4 workers, ours and HDF5 back to back (which goes first
alternates from one pair to the next), then the TCP stream. A first, unrecorded round (4 workers,
both sides, and TCP) absorbs one-time costs (the mounts' first large writes, the first
connections, h5py's and the link's first use). Every figure is the median over the
repetitions (a ratio: the median of the per-repetition ratios). On a machine with fewer cores
than processes (4 workers, the holder's server and agent, sshfs and sshd) everything shares the
cores, ours and the baselines alike. ``workers.images_per_worker`` is the N of this run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dbguard.data.flushing import drop_cache
from dbguard.data.project import read_identity
from tools.sshfs import SshServer, sshfs_unavailable
from tools.testbed import PYTHON, BrokerProcess, SimHost, namespaces_unavailable

log = logging.getLogger("bench.workers")

TARGETS: dict[str, tuple[str, float]] = {
    # The issue: "4 workers through the holder at least 2x the HDF5-on-the-mount total, and at
    # least half of the raw TCP figure".
    "workers.holder_vs_hdf5_4": (">=", 2.0),
    "workers.holder_vs_tcp_4": (">=", 0.5),
}

SHAPE = (256, 256)
IMAGE_BYTES = SHAPE[0] * SHAPE[1] * 4  # float32
MIB = 1 << 20
WORKER_COUNTS = (1, 2, 4)
DB_NAME = "images"
FIGURE = {"holder": "holder_mib_s", "hdf5": "hdf5_mount_mib_s"}  # a side's figures, less the count
SHARE_MOUNT = "/mnt/share"  # where every simulated host sees the share
TCP_CHUNK = 4 * MIB
# Seconds: starting interpreters that import numpy, h5py and dbguard on 2 busy cores, and making
# a worker's images, can take a while; a run of 4 x 100 MiB over a slow mount too.
STARTUP_TIMEOUT = 120.0
RUN_TIMEOUT = 600.0


@dataclass(frozen=True)
class Plan:
    images: int  # N, per worker and run
    repetitions: int  # figures are medians over these


FULL = Plan(images=400, repetitions=3)  # 100 MiB per worker, 400 MiB for 4
QUICK = Plan(images=100, repetitions=3)
# For tests/test_bench_workers.py: runs every code path in seconds; its figures mean nothing.
TINY = Plan(images=4, repetitions=1)


def run(quick: bool) -> dict[str, float]:
    return measure(QUICK if quick else FULL)


def missing() -> str | None:
    """Why this section cannot run here, naming what is missing, or None if it can."""
    why = namespaces_unavailable()
    if why is not None:
        return f"the workers section runs workers on simulated hosts: {why}"
    why = sshfs_unavailable()
    if why is not None:
        return f"the workers section needs loopback sshfs mounts: {why}"
    if importlib.util.find_spec("h5py") is None:
        return (
            "the workers section's baseline needs the Python package h5py; install the test extras "
            "into this environment: pip install -e '.[test]'"
        )
    return None


def measure(plan: Plan) -> dict[str, float]:
    why = missing()
    if why is not None:
        raise RuntimeError(why)
    most = max(WORKER_COUNTS)
    samples: dict[str, list[float]] = defaultdict(list)
    with Cluster.started(most) as cluster, Workers(cluster.workers, plan.images) as workers:
        log.info("%d workers ready, %d images (%.0f MiB) each", most, plan.images, workers.mib_each)
        # Not recorded: one-time costs (first connections, the mounts' first large writes).
        round_ = 0
        for side in ("holder", "hdf5"):
            one_run(cluster, workers, side, most, f"warm-up-{side}")
        tcp_loopback_mib_s(most * plan.images * IMAGE_BYTES)
        for rep in range(plan.repetitions):
            found: dict[str, float] = {}
            for count in WORKER_COUNTS:
                sides = ("holder", "hdf5") if round_ % 2 == 0 else ("hdf5", "holder")
                round_ += 1
                for side in sides:
                    found[f"{FIGURE[side]}_{count}"] = one_run(
                        cluster, workers, side, count, f"rep{rep}-{side}-{count}"
                    )
            found["tcp_loopback_mib_s"] = tcp_loopback_mib_s(most * plan.images * IMAGE_BYTES)
            found[f"holder_vs_hdf5_{most}"] = (
                found[f"holder_mib_s_{most}"] / found[f"hdf5_mount_mib_s_{most}"]
            )
            found[f"holder_vs_tcp_{most}"] = found[f"holder_mib_s_{most}"] / found["tcp_loopback_mib_s"]
            for name, value in found.items():
                samples[name].append(value)
            log.info(
                "repetition %d/%d (MiB/s): holder %s; hdf5 on the mount %s; tcp %.0f",
                rep + 1,
                plan.repetitions,
                ", ".join(f"{found[f'holder_mib_s_{n}']:.0f} ({n})" for n in WORKER_COUNTS),
                ", ".join(f"{found[f'hdf5_mount_mib_s_{n}']:.0f} ({n})" for n in WORKER_COUNTS),
                found["tcp_loopback_mib_s"],
            )
    figures = {f"workers.{name}": statistics.median(values) for name, values in samples.items()}
    figures["workers.images_per_worker"] = float(plan.images)
    return figures


# ------------------------------------------------------------------ setting


@dataclass
class Cluster:
    """A broker, a share exported by a loopback sshd, the host that holds and serves the
    projects, and the worker hosts; every host mounts the share at `SHARE_MOUNT`."""

    root: Path
    export: Path  # the share, as the file server's disk holds it
    holder: SimHost
    workers: list[SimHost]

    @classmethod
    @contextlib.contextmanager
    def started(cls, workers: int) -> Iterator[Cluster]:
        """Everything stopped (the hosts' processes killed: nothing written here is worth a
        flush) and removed on exit."""
        with contextlib.ExitStack() as stack:
            root = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="dbguard-bench-workers-", ignore_cleanup_errors=True)
                )
            )
            broker = BrokerProcess(root / "broker" / "state", ttl=30.0, lock_delay=5.0)
            broker.start()
            stack.callback(broker.stop)
            server = stack.enter_context(SshServer(root / "sshd"))
            export = root / "share"
            (export / "hdf5").mkdir(parents=True)
            hosts: list[SimHost] = []
            for name in ["holder", *(f"worker-{index}" for index in range(1, workers + 1))]:
                host = SimHost(name, root / "hosts", broker, server, export, SHARE_MOUNT)
                # Stopped before the server unmounts what is left, and the broker stops.
                stack.callback(host.stop)
                hosts.append(host.start())
            yield cls(root, export, hosts[0], hosts[1:])

    def serve(self, project: str) -> None:
        """Make a fresh project on the share; the holder acquires it and serves it on loopback."""
        (self.export / project).mkdir()
        path = f"{SHARE_MOUNT}/{project}"
        served = self.holder.run("acquire", path, "--serve", "--address", "tcp://127.0.0.1:0", "--json")
        if served.returncode != 0:
            raise RuntimeError(
                f"the holder could not acquire and serve {path} ({served.returncode}): "
                f"{served.stderr.strip()}\n{self.holder.agent_log()[-3000:]}"
            )

    def retire(self, project: str) -> None:
        """After a run (not timed): the holder releases the project, which stops serving it and
        flushes its records to the share; then its cache copy is dropped and the project removed
        from the share, so that the next run writes into memory this machine has used before."""
        path = f"{SHARE_MOUNT}/{project}"
        released = self.holder.run("release", path, timeout=RUN_TIMEOUT)
        if released.returncode != 0:
            raise RuntimeError(
                f"the holder could not release {path} ({released.returncode}): "
                f"{released.stderr.strip()}\n{self.holder.agent_log()[-3000:]}"
            )
        drop_cache(self.holder.cache, read_identity(self.export / project))
        shutil.rmtree(self.export / project)  # on the server's side, faster than through a mount


# ------------------------------------------------------------------ workers

# One worker, run on its host: it makes its images, then for every command on stdin prepares,
# says so, waits for "go", does its part and reports its own start and end (monotonic clock).
_WORKER = r"""
import json, sys, time
import numpy as np
import h5py
import dbguard
import dbguard.data.remote  # what dbguard.open imports for remote=True, not to be timed

index, count = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(20240601 + index)
images = [rng.random((256, 256), dtype=np.float32) for _ in range(count)]

def say(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()

def holder(project, name):
    started = time.monotonic()
    with dbguard.open(project, name, "a", remote=True) as db:
        indices = db.extend(images)
    return started, time.monotonic(), indices

def hdf5(path):
    started = time.monotonic()
    with h5py.File(path, "w") as handle:
        dataset = handle.create_dataset("images", shape=(count, 256, 256), dtype=np.float32)
        for i, image in enumerate(images):
            dataset[i] = image
    return started, time.monotonic(), []

say(ready=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    command = json.loads(line)
    if command["side"] == "quit":
        break
    say(prepared=True)
    if sys.stdin.readline().strip() != "go":
        break
    try:
        if command["side"] == "holder":
            started, ended, indices = holder(command["project"], command["db"])
        else:
            started, ended, indices = hdf5(command["path"])
    except Exception as exc:
        say(error=f"{type(exc).__name__}: {exc}")
    else:
        say(start=started, end=ended, indices=indices)
"""


class Worker:
    """One worker process on its own simulated host, talked to over its stdin and stdout."""

    def __init__(self, host: SimHost, index: int, images: int) -> None:
        self.host = host
        self.index = index
        self.log_path = host.tmp / "bench-worker.log"
        env = dict(host.env)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
        )
        with open(self.log_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [*host.enter(), PYTHON, "-c", _WORKER, str(index), str(images)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put(None)  # the process closed its stdout: it is ending

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"worker {self.index} did not answer within {timeout:.0f}s") from None
        if line is None:
            self.process.wait(10)
            raise RuntimeError(
                f"worker {self.index} exited with code {self.process.returncode}: {self.stderr()}"
            )
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"worker {self.index} on {self.host.name} failed: {message['error']}")
        return message

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.send(json.dumps({"side": "quit"}))
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Workers:
    """A worker process on each worker host, each holding ``images`` images of its own."""

    def __init__(self, hosts: Sequence[SimHost], images: int) -> None:
        self.hosts = list(hosts)
        self.images = images
        self.mib_each = images * IMAGE_BYTES / MIB
        self.started: list[Worker] = []

    def __enter__(self) -> Workers:
        try:
            for index, host in enumerate(self.hosts, start=1):
                self.started.append(Worker(host, index, self.images))
            for worker in self.started:
                worker.receive(STARTUP_TIMEOUT)  # ready: imported, images made
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self.started:
            worker.stop()

    def run(self, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Give the first len(commands) workers one command each, start them all at once when
        all are prepared, and return what each reported."""
        chosen = self.started[: len(commands)]
        for worker, command in zip(chosen, commands, strict=True):
            worker.send(json.dumps(command))
        for worker in chosen:
            worker.receive(STARTUP_TIMEOUT)  # prepared
        os.sync()  # nothing dirty: no run pays for writing back an earlier one's pages
        for worker in chosen:
            worker.send("go")
        return [worker.receive(RUN_TIMEOUT) for worker in chosen]


def one_run(cluster: Cluster, workers: Workers, side: str, count: int, label: str) -> float:
    """One run of ``count`` workers on one side; total MiB/s from the first start to the last end."""
    if side == "holder":
        project = f"p-{label}"
        cluster.serve(project)
        commands = [{"side": "holder", "project": f"{SHARE_MOUNT}/{project}", "db": DB_NAME}] * count
        reports = workers.run(commands)
        # Not after a failure: then the whole cluster is torn down, which discards the project.
        cluster.retire(project)
        indices = sorted(index for report in reports for index in report["indices"])
        if indices != list(range(count * workers.images)):
            raise RuntimeError(
                f"{count} workers appending {workers.images} images each through the holder got back "
                f"{len(indices)} indices, not each of 0..{count * workers.images - 1} once"
            )
    else:
        names = [f"{label}-w{index}.h5" for index in range(1, count + 1)]
        try:
            reports = workers.run([{"side": "hdf5", "path": f"{SHARE_MOUNT}/hdf5/{name}"} for name in names])
            for name in names:
                size = (cluster.export / "hdf5" / name).stat().st_size
                if size < workers.images * IMAGE_BYTES:
                    raise RuntimeError(f"{name} holds {size} bytes, less than the images written")
        finally:
            for name in names:  # removed on the server's side, faster than through a mount
                (cluster.export / "hdf5" / name).unlink(missing_ok=True)
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return count * workers.images * IMAGE_BYTES / MIB / seconds


# ------------------------------------------------------------------ raw TCP

_RECEIVER = r"""
import socket, sys
total, chunk = int(sys.argv[1]), int(sys.argv[2])
with socket.create_server(("127.0.0.1", 0)) as listener:
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    with conn:
        buffer = memoryview(bytearray(chunk))
        got = 0
        while got < total:
            n = conn.recv_into(buffer, min(chunk, total - got))
            if n == 0:
                sys.exit(f"the sender closed after {got} of {total} bytes")
            got += n
        conn.sendall(b"k")
"""

_SENDER = r"""
import os, socket, sys, time
port, total, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = memoryview(os.urandom(chunk))
with socket.create_connection(("127.0.0.1", port)) as conn:
    started = time.perf_counter()
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        conn.sendall(data[:n])
        sent += n
    if conn.recv(1) != b"k":
        sys.exit("the receiver did not acknowledge")
    print(time.perf_counter() - started, flush=True)
"""


def tcp_loopback_mib_s(total: int) -> float:
    """MiB/s of one TCP stream of ``total`` bytes from one process to another on 127.0.0.1."""
    receiver = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER, str(total), str(TCP_CHUNK)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        port = receiver.stdout.readline().strip()
        if not port.isdigit():
            receiver.wait(10)
            raise RuntimeError(
                f"the TCP receiver did not start: {receiver.stderr.read() if receiver.stderr else ''}"
            )
        sender = subprocess.run(
            [sys.executable, "-c", _SENDER, port, str(total), str(TCP_CHUNK)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        if sender.returncode != 0:
            raise RuntimeError(f"the TCP sender failed: {sender.stderr.strip()[-2000:]}")
        receiver.wait(30)
        if receiver.returncode != 0:
            raise RuntimeError(
                f"the TCP receiver failed: {receiver.stderr.read() if receiver.stderr else ''}"
            )
        return total / MIB / float(sender.stdout.strip())
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
