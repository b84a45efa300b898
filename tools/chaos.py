"""The chaos checker: writers and readers on simulated hosts, a seeded nemesis, and a checker of
the invariants of DESIGN.md over the histories they leave.

    python tools/chaos.py --hosts 3 --writers 3 --readers 2 --seconds 600 [--seed S] [--json]

Run as root (namespaces, FUSE, a tmpfs). The set-up is one broker (short TTL), one loopback sshd,
M simulated hosts (tools/testbed.py SimHost) that each mount the shared project directory at a
path of their own, and one project. The shared directory is a small tmpfs of its own, so that the
nemesis can fill it up.

Clients are Python processes on the hosts. Each appends what it does to a history file in its
host's /tmp (JSON lines, flushed and fsynced one by one, so they survive a crash of the host):

- a writer loops: acquire (queued), append records whose payload encodes (writer, incarnation,
  sequence), flush, sometimes release; it records each grant (with the broker's view from
  `dbguard.status`), each append, each flush that returned and the records it acknowledged, and
  every error;
- a reader loops: browse the newest generation read-only, check every record it reads against
  the ids embedded in it, and record the generation, the count and what it saw. A reader has a
  cache directory of its own, so what it reads comes from the project store, never from the
  unflushed cache of a writer on the same host.

Processes on a simulated host have a /tmp of their own, so they are given this checkout through
/proc/<harness pid>/root on PYTHONPATH (see `host_visible`): otherwise a checkout under /tmp
would silently run whatever dbguard the Python installation has.

The harness itself polls the broker's status many times a second (the broker's view over time)
and copies every manifest as soon as it is published (old ones are deleted after a delay).

The nemesis injects, on a seeded random schedule: SIGKILL of a writer, SIGKILL of an agent,
SIGSTOP of a whole host for less and for more than the TTL, host crash and restart at a random
moment, host crash right after a write (the harness tails the writers' histories and kills the
whole host within milliseconds of an acknowledged append that is not flushed yet, then keeps it
down for longer than TTL + lock-delay), broker SIGKILL and restart, broker SIGSTOP, a full disk
on the project store, and `dbguard break --force` by an operator while the project is orphaned.
Every kind is injected at least once early on, then kinds are drawn at random. Each host crash
notes what the store held right after the kill (its newest generation and record count).

After the run, with every process stopped, the checker reads every history, the manifests and
the final store, and decides (see `check` for exactly how):

1. never two writer hosts at overlapping times, as the broker shows them;
2. no flush accepted with a stale token;
3. no acknowledged record lost;
4. no torn read;
5. `dbguard verify` finds the final store clean;
6. no appended record vanished (a second check of invariant 5: kept in the store, a cache or
   aside);
7. a host that died holding acknowledged unflushed records leaves its project orphaned: while it
   is down, no other host is granted the project, nor does the lease service show it free,
   unless an operator broke the lease.

It prints the figures and exits 1 on any violation (`--json`: one JSON object), 2 if the harness
itself failed, 130 if interrupted.
Everything is stopped and unmounted on exit, also on Ctrl-C; the work directory is kept when the
run did not pass, and `--recheck WORKDIR` runs the checker on it again.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil
from numpy.typing import NDArray

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]

DB_NAME = "chaos"
SHAPE = (16, 16)
# First value of every payload; float32 holds integers exactly up to 2**24.
_MAGIC = 7919.0

FAULT_KINDS = (
    "kill-writer",
    "kill-agent",
    "pause-host-short",
    "pause-host-long",
    "crash-host",
    "crash-host-dirty",
    "kill-broker",
    "pause-broker",
    "disk-full",
    "break",
)
# The kinds that kill a whole host: its processes are dead from the fault's ``t_crashed`` until
# it is started again at ``t_restart``.
CRASH_KINDS = ("crash-host", "crash-host-dirty")
# How often each kind is drawn once every kind has been injected at least once.
_WEIGHTS = {
    "kill-writer": 3,
    "kill-agent": 2,
    "pause-host-short": 2,
    "pause-host-long": 2,
    "crash-host": 2,
    "crash-host-dirty": 2,
    "kill-broker": 1,
    "pause-broker": 1,
    "disk-full": 2,
    "break": 2,
}
INVARIANTS = {
    "1": "never two writer hosts at overlapping times (broker's view)",
    "2": "no flush accepted with a stale token",
    "3": "no acknowledged record lost",
    "4": "no torn read",
    "5": "dbguard verify finds the final store clean",
    "6": "no appended record vanished (kept in the store, a cache or aside)",
    "7": "a holder dead with unflushed data leaves its project orphaned",
}


# --------------------------------------------------------------------------------------------
# Payloads: every record says who wrote it, and its content follows from that.


def payload(writer: int, incarnation: int, seq: int) -> NDArray[np.float32]:
    values = np.random.default_rng([writer, incarnation, seq]).random(SHAPE[0] * SHAPE[1], dtype=np.float32)
    values[:4] = (_MAGIC, writer, incarnation, seq)
    return values.reshape(SHAPE)


def identify(array: NDArray[Any]) -> tuple[int, int, int] | None:
    """The (writer, incarnation, seq) a record embeds, if its whole content matches them."""
    if array.shape != SHAPE or array.dtype != np.float32:
        return None
    flat = array.reshape(-1)
    if flat[0] != _MAGIC or not all(0 <= v < 2**24 and v == int(v) for v in flat[1:4]):
        return None
    ids = (int(flat[1]), int(flat[2]), int(flat[3]))
    return ids if np.array_equal(payload(*ids), array) else None


def digest(data: NDArray[Any] | bytes | memoryview) -> str:
    raw = np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
    return hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------------------------
# Clients: run on a simulated host as `python -c` (see Harness.start_client).


class History:
    """JSON lines, each flushed and fsynced before the call returns."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  # lives as long as the process
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ev": event, "t": time.monotonic(), "wall": time.time(), **fields})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())


def client_main(config: dict[str, Any]) -> None:
    """Entry point of a client process on a host; ``config`` comes from the harness."""
    # The harness does not read the pipes it gave us: everything goes to a log file instead.
    log = os.open(config["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # A client never outlives the run, whatever it is blocked in.
    watchdog = threading.Timer(max(0.0, config["hard_stop"] - time.monotonic()), os._exit, args=(0,))
    watchdog.daemon = True
    watchdog.start()
    if config["role"] == "reader":
        # A browsing user with a cache of their own: what it reads comes from the store only, never
        # from a writer's unflushed cache on the same host.
        os.environ["DBGUARD_CACHE"] = config["cache"]
        _reader(config)
    else:
        _writer(config)


def _short(exc: BaseException) -> dict[str, str]:
    return {"kind": type(exc).__name__, "message": str(exc)[:400]}


def _broker_view(project: str) -> dict[str, Any]:
    """The broker's view of the project via `dbguard.status`, with when it was asked."""
    import dbguard

    s0 = time.monotonic()
    try:
        status = dbguard.status(project)
    except Exception as exc:
        return {"s0": s0, "s1": time.monotonic(), "error": _short(exc)}
    item = status["projects"][0]
    agent = status.get("agent") or {}
    return {
        "s0": s0,
        "s1": time.monotonic(),
        "state": item["state"],
        "token": item["token"],
        "writer": item["writer"],
        "agent_leases": [(lease["token"], lease["state"]) for lease in agent.get("leases", [])],
    }


class _LeaseGone(Exception):
    """This grant is over for the writer (lost, fenced, broker or agent unreachable)."""


def _writer(config: dict[str, Any]) -> None:
    import dbguard
    from dbguard.errors import BrokerUnavailable, Fenced, GuardError, LeaseHeld, LeaseLost

    history = History(Path(config["history"]))
    rng = random.Random(config["seed"])
    project, stop_at = config["project"], config["stop_at"]
    wid, inc = config["writer"], config["incarnation"]
    host = socket.gethostname()
    history.write("start", role="writer", writer=wid, incarnation=inc, host=host, pid=os.getpid())
    lease_errors = (LeaseLost, LeaseHeld, Fenced, BrokerUnavailable)
    seq = 0

    def flush(token: int, pending: list[list[Any]]) -> None:
        """Flush; on success acknowledge ``pending``. A failure that leaves the data in the cache
        (a full disk) is retried under the same grant, and a later success acknowledges it too."""
        for attempt in range(4):
            t0 = time.monotonic()
            try:
                result = dbguard.flush(project)
            except lease_errors as exc:
                history.write("flush_error", t0=t0, token=token, unacked=len(pending), **_short(exc))
                raise _LeaseGone from exc
            except GuardError as exc:
                history.write("flush_failed", t0=t0, token=token, pending=len(pending), **_short(exc))
                if attempt == 3 or time.monotonic() > stop_at:
                    raise _LeaseGone from exc
                time.sleep(rng.uniform(0.3, 1.0))
                continue
            history.write(
                "flush_ok",
                t0=t0,
                token=token,
                generation=result["generation"],
                records=result["records"],
                acked=list(pending),
            )
            pending.clear()
            return

    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        # Intents are logged before each call that can make the agent release a lease (see
        # `end_windows`): a call cut short by a crash leaves its intent without an outcome.
        history.write("acquiring", t0=t0)
        try:
            reply = dbguard.acquire(project, wait=rng.uniform(0.5, 3.0))
        except Exception as exc:
            history.write("acquire_error", t0=t0, **_short(exc))
            time.sleep(rng.uniform(0.1, 0.8))
            continue
        token = int(reply["token"])
        history.write(
            "grant",
            t0=t0,
            t1=time.monotonic(),
            token=token,
            ttl=float(reply["ttl"]),
            host=host,
            broker=_broker_view(project),
        )
        pending: list[list[Any]] = []  # [seq, index, sha] appended under this grant, not yet acked
        try:
            for _ in range(rng.randint(1, 8)):
                if time.monotonic() >= stop_at:
                    break
                with dbguard.open(project, DB_NAME, "a") as db:
                    for _ in range(rng.randint(1, 16)):
                        array = payload(wid, inc, seq)
                        index = db.append(array, attrs={"w": wid, "n": inc, "s": seq})
                        sha = digest(array)
                        history.write("append", seq=seq, index=index, sha=sha, token=token)
                        pending.append([seq, index, sha])
                        seq += 1
                if rng.random() < 0.4:
                    time.sleep(rng.uniform(0.05, 0.8))  # stay dirty for a while
                if rng.random() < 0.75:
                    flush(token, pending)
            if rng.random() < 0.5 or time.monotonic() >= stop_at:
                t0 = time.monotonic()
                history.write("releasing", t0=t0)
                try:
                    result = dbguard.release(project)
                except Exception as exc:
                    history.write("release_error", t0=t0, token=token, unacked=len(pending), **_short(exc))
                    raise _LeaseGone from exc
                # A release flushes what is dirty first; it acknowledges pending records only if
                # it released a lease that was still held under this token.
                done = bool(result.get("released")) and result.get("state") == "held"
                done = done and result.get("token") == token
                history.write("release", t0=t0, token=token, result=result, acked=pending if done else [])
                pending = []
        except _LeaseGone:
            time.sleep(rng.uniform(0.1, 0.6))
        except lease_errors as exc:
            history.write("lease_error", token=token, unacked=len(pending), **_short(exc))
            time.sleep(rng.uniform(0.1, 0.6))
        except GuardError as exc:  # e.g. a release that could not flush (a full disk)
            history.write("write_error", token=token, unacked=len(pending), **_short(exc))
            time.sleep(rng.uniform(0.1, 0.6))
        except Exception:
            history.write(
                "client_error", token=token, unacked=len(pending), trace=traceback.format_exc()[-1500:]
            )
            time.sleep(rng.uniform(0.1, 0.6))
    history.write("stop")


def _reader(config: dict[str, Any]) -> None:
    import dbguard

    history = History(Path(config["history"]))
    rng = random.Random(config["seed"])
    project, stop_at = config["project"], config["stop_at"]
    history.write("start", role="reader", reader=config["reader"], host=socket.gethostname(), pid=os.getpid())
    known: dict[int, str] = {}  # index -> sha256 seen by this process
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        bad: list[dict[str, Any]] = []
        seen: list[list[Any]] = []
        try:
            with dbguard.open(project, DB_NAME, "r") as db:
                generation, count = db.generation, len(db)
                fresh = [i for i in range(count) if i not in known]
                older = rng.sample(range(count), min(count, 24))
                for index in fresh + older:
                    array = db[index]
                    ids, sha = identify(array), digest(array)
                    attrs = db.attrs(index)
                    if ids is None:
                        bad.append({"index": index, "why": "content does not match its embedded ids"})
                    elif (attrs.get("w"), attrs.get("n"), attrs.get("s")) != ids:
                        bad.append({"index": index, "why": f"attrs {attrs} do not match the payload {ids}"})
                    if known.get(index, sha) != sha:
                        bad.append({"index": index, "why": "changed since this reader last read it"})
                    if index not in known:
                        known[index] = sha
                        seen.append([index, sha[:16]])
        except Exception as exc:
            history.write("read_error", t0=t0, **_short(exc))
            time.sleep(rng.uniform(0.1, 0.5))
            continue
        history.write(
            "read",
            t0=t0,
            generation=generation,
            count=count,
            checked=len(fresh) + len(older),
            bad=bad,
            seen=seen,
        )
        time.sleep(rng.uniform(0.05, 0.4))
    history.write("stop")


# --------------------------------------------------------------------------------------------
# The harness: set-up, clients, nemesis, observers, tear-down.


def _log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def host_visible(path: str) -> str:
    """``path`` of this process as a process on a simulated host can reach it.

    A simulated host has a /tmp (and /mnt) of its own, so a checkout under /tmp (a worktree) is
    not there: its processes would silently import whatever `dbguard` the Python installation
    has instead. /proc/PID/root of this process leads into our own mount namespace."""
    if path.startswith(("/tmp/", "/mnt/")) or path in ("/tmp", "/mnt"):
        return f"/proc/{os.getpid()}/root{path}"
    return path


class _Tail:
    """The whole lines appended to a history file since this object was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):  # the rest of a line begun before we started
                events.append(json.loads(line))
        return events


@dataclass
class Slot:
    """One client of the run, restarted as a new incarnation after it dies."""

    name: str
    role: str
    number: int
    host: int
    incarnation: int = -1
    process: subprocess.Popen[str] | None = None
    restart_at: float = 0.0
    killed: bool = False  # by the nemesis, on purpose


@dataclass
class Options:
    hosts: int = 3
    writers: int = 3
    readers: int = 2
    seconds: float = 60.0
    seed: int = 0
    ttl: float = 1.5
    lock_delay: float = 0.5
    flush_interval: float = 2.0
    retire_delay: float = 20.0
    store_mib: int = 512
    workdir: Path | None = None
    keep: bool = False
    backend: str = "embedded"  # or "etcd"


@dataclass
class HostState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    up: bool = True


class Harness:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.workdir = (
            options.workdir
            if options.workdir is not None
            else Path(tempfile.mkdtemp(prefix="dbguard-chaos-", dir="/tmp"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.export = self.workdir / "export"
        self.shared = self.export / "proj"
        self.manifest_copies = self.workdir / "manifests"
        self.faults_path = self.workdir / "faults.jsonl"
        self.status_path = self.workdir / "status.jsonl"
        self.filler = self.export / ".chaos-filler"
        self.stop = threading.Event()
        self.faults = History(self.faults_path)
        self.fault_counts: Counter[str] = Counter()
        self.nemesis_errors: list[str] = []
        self.client_failures: list[str] = []
        self.tmpfs_mounted = False
        self.broker: Any = None
        self.server: Any = None
        self.hosts: list[Any] = []
        self.host_states: list[HostState] = []
        self.slots: list[Slot] = []
        self.project_id = ""
        self.stop_at = 0.0
        self.threads: list[threading.Thread] = []
        self.broker_lock = threading.Lock()
        self.started = 0.0
        self.namespaces: set[str] = set()  # UTS namespaces of every host ever started (the sweep)
        self.rng = random.Random(options.seed + 1)  # client restart delays

    # ---------------------------------------------------------------- set-up

    def setup(self) -> None:
        from dbguard.data import project as projects
        from dbguard.lease.etcd_cluster import EtcdCluster
        from tools.sshfs import SshServer
        from tools.testbed import BrokerProcess, EtcdBackend, SimHost

        o = self.options
        self.export.mkdir(exist_ok=True)
        _run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={o.store_mib}m,mode=0755",
                "dbguard-chaos",
                str(self.export),
            ]
        )
        self.tmpfs_mounted = True
        self.shared.mkdir()
        self.project_id = projects.init(self.shared).id
        self.manifest_copies.mkdir(exist_ok=True)
        if o.backend == "etcd":
            # The lease service is a three-member etcd cluster; "kill-broker" and
            # "pause-broker" then strike its leader.
            cluster = EtcdCluster(self.workdir / "etcd")
            cluster.start()
            self.broker = EtcdBackend(cluster, "chaos", ttl=o.ttl, lock_delay=o.lock_delay)
        else:
            self.broker = BrokerProcess(self.workdir / "broker" / "state", ttl=o.ttl, lock_delay=o.lock_delay)
            self.broker.start()
        self.server = SshServer(self.workdir / "sshd").start()
        pythonpath = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        for number in range(o.hosts):
            host = SimHost(
                f"chaos-h{number}",
                self.workdir / "hosts",
                self.broker,
                self.server,
                self.shared,
                f"/mnt/site{number}/lab/proj",
                flush_interval=str(o.flush_interval),
                retire_delay=str(o.retire_delay),
            )
            host.env["PYTHONPATH"] = os.pathsep.join(host_visible(p) for p in pythonpath)
            self.hosts.append(host)
            self.host_states.append(HostState())
            self._start_host(number)
        self._check_host_code()
        for number in range(o.writers):
            self.slots.append(Slot(f"w{number}", "writer", number, number % o.hosts))
        for number in range(o.readers):
            self.slots.append(Slot(f"r{number}", "reader", number, (number + o.writers) % o.hosts))
        (self.workdir / "run.json").write_text(
            json.dumps(
                {
                    "options": {k: str(v) if isinstance(v, Path) else v for k, v in o.__dict__.items()},
                    "project": self.project_id,
                    "ttl": o.ttl,
                    "hosts": [
                        {"name": h.name, "tmp": str(h.tmp), "project": str(h.project)} for h in self.hosts
                    ],
                },
                indent=1,
            )
        )

    def _start_host(self, number: int) -> None:
        host = self.hosts[number]
        for attempt in range(3):
            try:
                host.start()
                with contextlib.suppress(OSError):
                    self.namespaces.add(os.readlink(f"/proc/{host.pid}/ns/uts"))
                return
            except Exception as exc:
                _log(f"host {host.name} did not start (attempt {attempt + 1}): {exc}")
                with contextlib.suppress(Exception):
                    host.crash()
                time.sleep(1.0)
        raise RuntimeError(f"host {host.name} could not be started")

    def _check_host_code(self) -> None:
        """The hosts must run this checkout's dbguard, not another installed copy."""
        result = self.hosts[0].python("import dbguard, tools.chaos; print(dbguard.__file__)", timeout=60)
        where = result.stdout.strip()
        expected = host_visible(str(REPO / "dbguard" / "__init__.py"))
        if where != expected:
            raise RuntimeError(
                f"hosts import dbguard from {where!r}, not {expected!r}: {result.stderr[-500:]}"
            )

    # --------------------------------------------------------------- clients

    def start_client(self, slot: Slot) -> None:
        host = self.hosts[slot.host]
        slot.incarnation += 1
        base = f"chaos-{slot.name}-{slot.incarnation}"
        config = {
            "role": slot.role,
            "writer": slot.number,
            "reader": slot.number,
            "incarnation": slot.incarnation,
            "project": str(host.project),
            "history": f"/tmp/{base}.jsonl",
            "log": f"/tmp/{base}.log",
            "cache": f"/tmp/chaos-reader-{slot.number}-cache",
            "seed": zlib.crc32(f"{self.options.seed}/{slot.name}/{slot.incarnation}".encode()),
            "stop_at": self.stop_at,
            "hard_stop": self.stop_at + 45.0,
        }
        script = (
            "import json\nfrom tools.chaos import client_main\n"
            f"client_main(json.loads({json.dumps(config)!r}))\n"
        )
        slot.process = host.popen_python(script)
        slot.killed = False

    def supervise(self) -> None:
        """Restart clients that died, on hosts that are up, until the end of the run."""
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.poll() is not None:
                self._reap(slot, process)
                slot.process = None
                slot.restart_at = now + self.rng.uniform(0.2, 1.5)
            if slot.process is None and now >= slot.restart_at and now < self.stop_at - 1.0:
                state = self.host_states[slot.host]
                if state.lock.acquire(blocking=False):
                    try:
                        if state.up:
                            self.start_client(slot)
                    finally:
                        state.lock.release()

    def _reap(self, slot: Slot, process: subprocess.Popen[str]) -> None:
        output = ""
        with contextlib.suppress(Exception):
            output = "".join(
                stream.read() for stream in (process.stdout, process.stderr) if stream is not None
            )
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        code = process.returncode
        if code != 0 and code != -signal.SIGKILL:
            tail = ""
            with contextlib.suppress(OSError):
                log = self.hosts[slot.host].tmp / f"chaos-{slot.name}-{slot.incarnation}.log"
                tail = log.read_text(errors="replace")[-800:]
            self.client_failures.append(
                f"{slot.name}.{slot.incarnation} exited {code}: {output[-400:]}{tail}"
            )

    # --------------------------------------------------------------- observers

    def _status_poller(self) -> None:
        """The broker's view over time: a status snapshot every 0.1 s, with when it was asked."""
        from dbguard.lease.protocol import Op

        history = History(self.status_path)
        with self.lease_service(timeout=0.8) as client:
            while not self.stop.is_set():
                s0 = time.monotonic()
                try:
                    item = client.call_ok(Op.STATUS, project=self.project_id)["projects"][0]
                except Exception:
                    self.stop.wait(0.1)
                    continue
                history.write(
                    "status",
                    s0=s0,
                    s1=time.monotonic(),
                    state=item["state"],
                    token=item["token"],
                    writer=item["writer"],
                )
                self.stop.wait(0.1)

    def lease_service(self, timeout: float) -> Any:
        """A connection to the lease service the hosts use, broker or etcd."""
        from dbguard.lease.service import for_broker
        from dbguard.settings import load

        settings = load({"broker": self.broker.address, "request_timeout": timeout}, environ={})
        return for_broker(settings, attempts=1)

    def _manifest_watcher(self) -> None:
        """Copy every published manifest at once: the writer deletes old ones after a delay."""
        manifests = self.shared / ".dbguard" / "store" / "manifests"
        copied: set[str] = set()
        while not self.stop.is_set():
            self.copy_manifests(manifests, copied)
            self.stop.wait(0.1)
        self.copy_manifests(manifests, copied)

    def copy_manifests(self, manifests: Path, copied: set[str]) -> None:
        try:
            names = os.listdir(manifests)
        except FileNotFoundError:
            return
        for name in names:
            if name in copied or not name.endswith(".json") or not name[:-5].isdigit():
                continue
            try:
                body = (manifests / name).read_bytes()
            except FileNotFoundError:
                continue
            (self.manifest_copies / name).write_bytes(body)
            copied.add(name)

    # ---------------------------------------------------------------- nemesis

    def status(self) -> dict[str, Any] | None:
        from dbguard.lease.protocol import Op

        try:
            with self.lease_service(timeout=1.0) as client:
                item: dict[str, Any] = client.call_ok(Op.STATUS, project=self.project_id)["projects"][0]
                return item
        except Exception:
            return None

    def _holder_host(self) -> int | None:
        item = self.status()
        writer = (item or {}).get("writer") or {}
        for number, host in enumerate(self.hosts):
            if host.name == writer.get("host"):
                return number
        return None

    def fault(self, kind: str, t0: float, **detail: Any) -> None:
        """Log a fault that was injected over [t0, now]."""
        self.fault_counts[kind] += 1
        self.faults.write("fault", kind=kind, t0=t0, t1=time.monotonic(), **detail)
        _log(f"fault {kind} {detail}")

    @contextlib.contextmanager
    def injecting(self, kind: str, **detail: Any) -> Iterator[dict[str, Any]]:
        """Log the fault when it is over (also if it ends in an error): its whole span counts."""
        t0 = time.monotonic()
        try:
            yield detail
        finally:
            self.fault(kind, t0, **detail)

    def _nemesis(self) -> None:
        rng = random.Random(self.options.seed)
        self.stop.wait(2.0)  # let the writers get going first
        to_do = list(FAULT_KINDS)
        rng.shuffle(to_do)
        while not self.stop.is_set() and time.monotonic() < self.stop_at - 1.0:
            if to_do:
                kind = to_do[0]
                gap = rng.uniform(0.2, 0.8)
            else:
                kind = rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
                gap = rng.uniform(0.5, 3.0)
            if self.stop.wait(gap):
                break
            try:
                done = self.inject(kind, rng)
            except Exception:
                done = False
                self.nemesis_errors.append(f"{kind}: {traceback.format_exc()[-1200:]}")
                _log(f"nemesis error in {kind}: {traceback.format_exc()[-600:]}")
            if done and kind in to_do:
                to_do.remove(kind)
            elif not done and kind in to_do:
                to_do.append(to_do.pop(0))  # try the others first
            self._break_if_orphaned(rng)
            self._restart_down_hosts()

    def _restart_down_hosts(self) -> None:
        """A host whose restart failed is tried again (its clients wait for it)."""
        for number, state in enumerate(self.host_states):
            if state.up:
                continue
            with state.lock:
                try:
                    self._start_host(number)
                    state.up = True
                except Exception as exc:
                    self.nemesis_errors.append(f"restarting {self.hosts[number].name}: {exc}")

    def _pick_host(self, rng: random.Random, prefer_holder: float = 0.6) -> int | None:
        holder = self._holder_host()
        if holder is not None and rng.random() < prefer_holder:
            return holder
        up = [n for n, state in enumerate(self.host_states) if state.up]
        return rng.choice(up) if up else None

    def inject(self, kind: str, rng: random.Random) -> bool:
        """Inject one fault; False if it could not be injected now (nothing counted)."""
        ttl = self.options.ttl
        t0 = time.monotonic()
        if kind == "kill-writer":
            live = [
                s
                for s in self.slots
                if s.role == "writer" and s.process is not None and s.process.poll() is None
            ]
            if not live:
                return False
            slot = rng.choice(live)
            with self.host_states[slot.host].lock:
                process = slot.process  # the supervisor may have replaced it meanwhile
                if process is None or process.poll() is not None:
                    return False
                slot.killed = True
                process.kill()
            self.fault(kind, t0, client=f"{slot.name}.{slot.incarnation}", host=self.hosts[slot.host].name)
            return True
        if kind == "kill-agent":
            candidates = [self._pick_host(rng)]
            candidates += [n for n in range(len(self.hosts)) if n not in candidates]
            for number in candidates:
                if number is None:
                    continue
                state, host = self.host_states[number], self.hosts[number]
                with state.lock:
                    pid = host.agent_pid() if state.up else None
                    if pid is None:
                        continue
                    os.kill(pid, signal.SIGKILL)
                self.fault(kind, t0, host=host.name, pid=pid)
                return True
            return False
        if kind in ("pause-host-short", "pause-host-long"):
            number = self._pick_host(rng)
            if number is None:
                return False
            seconds = (
                rng.uniform(0.15, 0.6) * ttl if kind == "pause-host-short" else rng.uniform(1.5, 3.0) * ttl
            )
            self._pause_host(number, seconds, kind)
            return True
        if kind == "crash-host":
            number = self._pick_host(rng)
            if number is None:
                return False
            state, host = self.host_states[number], self.hosts[number]
            with state.lock, self.injecting(kind, host=host.name) as detail:
                state.up = False
                self._crash(number, detail)
                self.stop.wait(rng.uniform(0.5, 2.5))
                detail["t_restart"] = time.monotonic()
                self._start_host(number)  # on failure it stays down until _restart_down_hosts
                state.up = True
            return True
        if kind == "crash-host-dirty":
            return self._crash_after_write(rng)
        if kind == "kill-broker":
            with self.broker_lock, self.injecting(kind):
                self.broker.kill()
                self.stop.wait(rng.uniform(0.0, 1.0))
                self._start_broker()
            return True
        if kind == "pause-broker":
            seconds = rng.uniform(0.2, 1.5) * ttl
            with self.broker_lock, self.injecting(kind, seconds=round(seconds, 3)):
                self.broker.signal(signal.SIGSTOP)
                try:
                    time.sleep(seconds)
                finally:
                    self.broker.signal(signal.SIGCONT)
            return True
        if kind == "disk-full":
            seconds = rng.uniform(1.0, 3.0)
            with self.injecting(kind, seconds=round(seconds, 3)) as detail:
                try:
                    detail["bytes"] = self._fill_disk()
                    self.stop.wait(seconds)
                finally:
                    self.filler.unlink(missing_ok=True)
            return True
        if kind == "break":
            return self._orphan_and_break(rng, t0)
        raise ValueError(kind)

    def _crash(self, number: int, detail: dict[str, Any]) -> None:
        """SIGKILL every process of host ``number`` (the caller holds its lock and has marked it
        down), then note in ``detail`` when it was certainly dead and what the store held then."""
        host = self.hosts[number]
        namespace = None
        with contextlib.suppress(OSError):
            namespace = os.readlink(f"/proc/{host.pid}/ns/uts")
        # As a power cut: every process is frozen before any is killed, so that none of them
        # lives on for a moment to see another one gone (a writer finding its sshfs mount dead).
        # crash() then waits until they are gone (a second or two: zombies wait to be reaped).
        victims = host.processes()
        for action in (psutil.Process.suspend, psutil.Process.kill):
            for process in victims:
                with contextlib.suppress(psutil.Error):
                    action(process)
        detail["t_killed"] = time.monotonic()
        host.crash()
        # A process forked while crash() went through the list escaped it: kill it too, so that
        # nothing of the host runs after t_crashed.
        stray = []
        for process in psutil.process_iter() if namespace else ():
            with contextlib.suppress(OSError, psutil.Error):
                if os.readlink(f"/proc/{process.pid}/ns/uts") == namespace:
                    process.kill()
                    stray.append(process)
        psutil.wait_procs(stray, timeout=10)
        detail["t_crashed"] = time.monotonic()
        if stray:
            detail["stray"] = len(stray)
        detail["store"] = self._store_head()

    def _store_head(self) -> dict[str, int] | None:
        """The newest published generation and its record count, read (after a crash) straight
        from the shared directory; None if it cannot be read. See `check_orphans` for its use."""
        manifests = self.shared / ".dbguard" / "store" / "manifests"
        try:
            names = [n for n in os.listdir(manifests) if n.endswith(".json") and n[:-5].isdigit()]
            if not names:
                return {"generation": 0, "count": 0}
            newest = max(names, key=lambda n: int(n[:-5]))
            body = json.loads((manifests / newest).read_bytes())  # published whole (link of a synced file)
            return {
                "generation": int(body["generation"]),
                "count": int(body["databases"].get(DB_NAME, {}).get("count", 0)),
            }
        except FileNotFoundError:
            return {"generation": 0, "count": 0}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log(f"could not read the store's newest manifest: {exc}")
            return None

    def _crash_after_write(self, rng: random.Random) -> bool:
        """Kill a whole host right after one of its writers was acknowledged an append that no
        flush of that writer has covered yet, and keep it down past the TTL and the lock-delay.

        The writers' histories (fsynced line by line) are tailed every few milliseconds: the
        first new line that is an append, with no flush or release recorded after it, fires the
        crash. Whether the record was still unflushed when the host died (the agent flushes by
        itself too) is decided by the checker from the store's count read right after the kill
        (`check_orphans`), not assumed here."""
        o = self.options
        tails: dict[Path, _Tail] = {}
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not self.stop.is_set():
            for slot in self.slots:
                if slot.role != "writer" or slot.process is None or not self.host_states[slot.host].up:
                    continue
                path = self.hosts[slot.host].tmp / f"chaos-{slot.name}-{slot.incarnation}.jsonl"
                if path not in tails:
                    tails[path] = _Tail(path)  # from its end as it is now: only new writes count
                    continue
                events = [e for e in tails[path].read() if e.get("ev") in ("append", "flush_ok", "release")]
                if not events or events[-1]["ev"] != "append":
                    continue
                append = events[-1]
                state, host = self.host_states[slot.host], self.hosts[slot.host]
                with state.lock:  # held by the supervisor for no longer than a client start
                    if not state.up:
                        continue
                    seen = time.monotonic()
                    fields = {k: append[k] for k in ("seq", "index", "token", "t")}
                    client = f"{slot.name}.{slot.incarnation}"
                    with self.injecting(
                        "crash-host-dirty", host=host.name, client=client, append=fields
                    ) as detail:
                        state.up = False
                        self._crash(slot.host, detail)
                        detail["seen_after"] = round(seen - append["t"], 4)
                        detail["killed_after"] = round(detail["t_killed"] - append["t"], 4)
                        # Long enough for its lease to expire (etcd times that in whole seconds)
                        # and for a lock-delay to pass: a project wrongly left free shows.
                        down = o.ttl + o.lock_delay + rng.uniform(1.5, 2.5)
                        self._stay_down(slot.host, detail["t_killed"] + down, rng)
                        detail["t_restart"] = time.monotonic()
                        self._start_host(slot.host)  # on failure it stays down until _restart_down_hosts
                        state.up = True
                return True
            time.sleep(0.005)
        return False

    def _stay_down(self, number: int, until: float, rng: random.Random) -> None:
        """Wait while host ``number`` is down, until ``until``; now and then an operator breaks
        the orphaned project meanwhile (`dbguard break --force` from another host)."""
        breaks = rng.random() < 0.25
        orphaned_since = None
        while not self.stop.is_set() and time.monotonic() < until:
            if breaks and (self.status() or {}).get("state") == "orphaned":
                orphaned_since = orphaned_since or time.monotonic()
            # Not at once: the status poller sees the orphan first, as the checker's figures expect.
            if orphaned_since is not None and time.monotonic() - orphaned_since >= 0.3:
                breaks, orphaned_since = False, None
                try:
                    self._break(rng, exclude=number, t0=time.monotonic(), frozen=None)
                except Exception as exc:
                    self.nemesis_errors.append(f"break while {self.hosts[number].name} was down: {exc}")
            self.stop.wait(0.1)

    def _pause_host(self, number: int, seconds: float, kind: str) -> None:
        state, host = self.host_states[number], self.hosts[number]
        with state.lock:
            if not state.up:
                return
            with self.injecting(kind, host=host.name, seconds=round(seconds, 3)):
                host.pause()
                host.pause()  # again: a process forked during the first pass is caught now
                try:
                    self.stop.wait(seconds)
                finally:
                    host.resume()

    def _start_broker(self) -> None:
        for attempt in range(3):
            try:
                self.broker.start()
                return
            except Exception as exc:
                _log(f"broker did not start (attempt {attempt + 1}): {exc}")
                self.broker.kill()
                time.sleep(1.0)
        raise RuntimeError("the broker could not be restarted")

    def _fill_disk(self) -> int:
        stats = os.statvfs(self.export)
        free = stats.f_bavail * stats.f_frsize
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, free)
            # Whatever fallocate left, fill with writes until the filesystem refuses.
            chunk = b"\0" * (1 << 20)
            with contextlib.suppress(OSError):
                os.lseek(fd, 0, os.SEEK_END)
                while True:
                    os.write(fd, chunk)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        return free

    def _orphan_and_break(self, rng: random.Random, t0: float) -> bool:
        """Freeze the holder while the broker knows it is dirty, wait for the orphan, break it."""
        deadline = time.monotonic() + 4.0
        number = None
        while time.monotonic() < deadline and not self.stop.is_set():
            item = self.status() or {}
            writer = item.get("writer") or {}
            if item.get("state") == "held" and (writer.get("dirty") or writer.get("unflushed", 0) > 0):
                number = next((n for n, h in enumerate(self.hosts) if h.name == writer.get("host")), None)
                break
            time.sleep(0.05)
        if number is None:
            return False
        state, host = self.host_states[number], self.hosts[number]
        with state.lock:
            if not state.up:
                return False
            paused = time.monotonic()
            host.pause()
            host.pause()
            try:
                orphaned = False
                until = time.monotonic() + 3 * self.options.ttl + 2.0
                while time.monotonic() < until and not self.stop.is_set():
                    if (self.status() or {}).get("state") == "orphaned":
                        orphaned = True
                        break
                    time.sleep(0.05)
                if not orphaned:
                    return False
                self._break(rng, exclude=number, t0=t0, frozen=host.name)
                time.sleep(rng.uniform(0.3, 1.5))
            finally:
                host.resume()
                # Frozen for longer than a TTL, whatever came of it: a long pause too.
                self.fault(
                    "pause-host-long", paused, host=host.name, seconds=round(time.monotonic() - paused, 3)
                )
        return True

    def _break(self, rng: random.Random, *, exclude: int | None, t0: float, frozen: str | None) -> None:
        """`dbguard break --force` by an operator on another host that is up."""
        others = [n for n, s in enumerate(self.host_states) if n != exclude and s.up and not s.lock.locked()]
        t_break = time.monotonic()
        self.faults.write("breaking", t0=t_break)
        if others:
            where = self.hosts[rng.choice(others)]
            result = where.run("break", str(where.project), "--force", "--json", timeout=30)
            operator = where.name
        else:  # one host only: the operator runs it from the machine the broker is on
            result = subprocess.run(
                [sys.executable, "-m", "dbguard", "break", str(self.shared), "--force", "--json"],
                env={**os.environ, "DBGUARD_BROKER": self.broker.address},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            operator = "broker-machine"
        broken = None
        with contextlib.suppress(ValueError):
            broken = json.loads(result.stdout).get("broken")
        if result.returncode != 0:
            raise RuntimeError(f"dbguard break failed ({result.returncode}): {result.stderr[-400:]}")
        self.fault("break", t0, t_break=t_break, operator=operator, frozen=frozen, broken=broken)

    def _break_if_orphaned(self, rng: random.Random) -> None:
        """An operator who finds the project orphaned (a crashed or frozen holder) sometimes
        breaks it rather than wait for the holder to come back."""
        item = self.status() or {}
        if item.get("state") == "orphaned" and rng.random() < 0.3:
            with contextlib.suppress(Exception):
                self._break(rng, exclude=None, t0=time.monotonic(), frozen=None)

    # ------------------------------------------------------------------- run

    def run(self) -> None:
        o = self.options
        self.started = time.monotonic()
        self.stop_at = self.started + o.seconds
        for target in (self._status_poller, self._manifest_watcher, self._nemesis):
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self.threads.append(thread)
        while time.monotonic() < self.stop_at:
            self.supervise()
            time.sleep(0.2)
        _log("run over; stopping the nemesis and the clients")
        self.stop.set()
        for thread in self.threads:
            if thread.name == "_nemesis":
                thread.join(timeout=60)
        self.wind_down()

    def wind_down(self) -> None:
        """Everything running again, then every client ends (by itself, or is killed)."""
        with contextlib.suppress(Exception):
            self.broker.signal(signal.SIGCONT)
        for state, host in zip(self.host_states, self.hosts, strict=True):
            if state.up:
                with contextlib.suppress(Exception):
                    host.resume()
        self.filler.unlink(missing_ok=True)
        deadline = time.monotonic() + 30.0
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
            if process.poll() is not None:
                self._reap(slot, process)
            slot.process = None
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def close(self) -> None:
        """Stop everything that was started; safe to call twice and after a half-done set-up."""
        self.stop.set()
        # The nemesis first: a fault in progress (a pause, a restart) must not act on what is
        # being torn down. Every step of it is bounded, and waits end early on stop.
        for thread in self.threads:
            if thread.name == "_nemesis":
                thread.join(timeout=60)
        with contextlib.suppress(Exception):
            if self.broker is not None:
                self.broker.signal(signal.SIGCONT)
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(Exception):
                    slot.process.kill()
                    slot.process.wait(10)
        for host in self.hosts:
            try:
                host.stop()
            except Exception as exc:
                _log(f"stopping host {host.name}: {exc}")
        if self.server is not None:
            try:
                self.server.stop()
            except Exception as exc:
                _log(f"stopping sshd: {exc}")
        self._sweep()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
        with contextlib.suppress(OSError):
            self.filler.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Kill, by pid, whatever is left in the namespaces of our hosts: once a host's init is
        gone, SimHost can no longer find its processes (an sshfs child, say)."""
        left = []
        for process in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if (
                    process.pid != os.getpid()
                    and os.readlink(f"/proc/{process.pid}/ns/uts") in self.namespaces
                ):
                    left.append(process)
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.resume()
                process.kill()
        psutil.wait_procs(left, timeout=10)
        if left:
            _log(f"killed {len(left)} leftover processes of the simulated hosts")

    def unmount(self) -> None:
        if not self.tmpfs_mounted:
            return
        if self.options.keep:
            with contextlib.suppress(OSError):
                shutil.copytree(self.shared, self.workdir / "final-project", symlinks=True)
        for command in (["umount", str(self.export)], ["umount", "-l", str(self.export)]):
            if subprocess.run(command, capture_output=True, check=False, timeout=60).returncode == 0:
                self.tmpfs_mounted = False
                return
        _log(f"could not unmount {self.export}")


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


# --------------------------------------------------------------------------------------------
# The checker.


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every whole line; a line cut short by a crash (only ever the last one) is skipped."""
    events = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as handle:
        for line in handle:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


@dataclass
class Sighting:
    """The broker's view of one token at one moment, observed by a call made in [s0, s1]."""

    token: int
    host: str
    s0: float
    s1: float
    held_until: float | None  # a lower bound of its expiry, when it was seen held
    source: str


@dataclass
class Report:
    operations: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    violations: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in INVARIANTS})
    notes: list[str] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)
    leases: dict[str, Any] = field(default_factory=dict)
    orphans: dict[str, Any] = field(default_factory=dict)

    def violation(self, invariant: str, text: str) -> None:
        self.violations[invariant].append(text)

    def total_violations(self) -> int:
        return sum(len(v) for v in self.violations.values())


def check(workdir: Path, project_dir: Path) -> Report:
    """Decide every invariant from the histories in ``workdir`` and the store in ``project_dir``.

    All times are CLOCK_MONOTONIC readings: the simulated hosts share this machine's kernel (no
    time namespace), so the clients', the harness's and the broker's clocks are one clock.
    """
    run = json.loads((workdir / "run.json").read_text())
    report = Report()
    clients: dict[str, list[dict[str, Any]]] = {}
    for host in run["hosts"]:
        for path in sorted(Path(host["tmp"]).glob("chaos-*.jsonl")):
            clients[path.stem] = _read_jsonl(path)
    status = _read_jsonl(workdir / "status.jsonl")
    faults = _read_jsonl(workdir / "faults.jsonl")
    report.faults.update(e["kind"] for e in faults if e["ev"] == "fault")
    _count_operations(clients, report)

    from dbguard.data.store import ProjectStore

    store = ProjectStore(project_dir, run["project"])
    manifests: dict[int, dict[str, Any]] = {}
    for path in sorted((workdir / "manifests").glob("*.json")):
        manifests[int(path.stem)] = json.loads(path.read_bytes())
    for generation in store.generations():  # what the watcher may have missed at the very end
        with contextlib.suppress(FileNotFoundError):
            body = json.loads(store.manifest_path(generation).read_bytes())
            if generation in manifests and manifests[generation] != body:
                report.violation("2", f"manifest {generation} was rewritten after it was published")
            manifests.setdefault(generation, body)

    windows = end_windows(clients, faults, agent_starts(run, status))
    check_leases(clients, status, float(run["ttl"]), report, windows)
    check_fencing(clients, manifests, report)
    final = final_records(store, report)
    check_acknowledged(clients, final, report)
    check_reads(clients, manifests, final, report)
    from dbguard import api

    problems = api.verify(project_dir)["problems"]
    for problem in problems:
        report.violation("5", problem)
    check_kept(clients, run, final, report)
    check_orphans(clients, status, faults, report)
    return report


def _count_operations(clients: dict[str, list[dict[str, Any]]], report: Report) -> None:
    ops, errors = report.operations, report.errors
    for events in clients.values():
        for e in events:
            ev = e["ev"]
            if ev == "grant":
                ops["grants"] += 1
            elif ev == "append":
                ops["appends"] += 1
            elif ev == "flush_ok":
                ops["flushes_ok"] += 1
                ops["acknowledged_records"] += len(e["acked"])
            elif ev == "flush_error":
                ops["flushes_fenced" if e["kind"] == "Fenced" else "flushes_refused"] += 1
                errors[f"flush: {e['kind']}"] += 1
            elif ev == "flush_failed":
                ops["flushes_failed"] += 1
                errors[f"flush: {e['kind']}"] += 1
            elif ev == "release":
                ops["releases"] += 1
                ops["acknowledged_records"] += len(e["acked"])
            elif ev == "read":
                ops["reads"] += 1
                ops["records_read"] += e["checked"]
            elif ev == "read_error":
                ops["read_errors"] += 1
                errors[f"read: {e['kind']}"] += 1
            elif ev == "acquire_error":
                errors[f"acquire: {e['kind']}"] += 1
            elif ev in ("lease_error", "write_error"):
                errors[f"write: {e['kind']}"] += 1
            elif ev == "release_error":
                errors[f"release: {e['kind']}"] += 1
            elif ev == "client_error":
                ops["client_errors"] += 1
                errors["client: " + e["trace"].strip().splitlines()[-1][:120]] += 1
            elif ev == "start":
                ops[f"{e['role']}_processes"] += 1


@dataclass
class EndWindows:
    """When a lease may have ended before its expiry: the windows in which each host's agent may
    have released the lease it held, and those in which an operator may have broken any lease.
    A window (w0, w1) means: the end may have happened at any time in [w0, w1]."""

    by_host: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    breaks: list[tuple[float, float]] = field(default_factory=list)

    def add(self, host: str, w0: float, w1: float) -> None:
        self.by_host.setdefault(host, []).append((w0, w1))

    def earliest_end(self, host: str, alive_at: float) -> float:
        """The earliest time at which a lease of ``host`` that was alive at ``alive_at`` may have
        ended early (infinity if nothing could have ended it)."""
        best = float("inf")
        for w0, w1 in [*self.by_host.get(host, []), *self.breaks]:
            if w1 >= alive_at:  # an end before alive_at did not happen: it was still alive then
                best = min(best, max(w0, alive_at))
        return best


class _Served:
    """The calls a host's agent answered: (call start, call end), to bound in-flight requests."""

    def __init__(self, calls: list[tuple[float, float]]) -> None:
        calls.sort()
        self.starts = [start for start, _ in calls]
        self.first_end_from = [float("inf")] * (len(calls) + 1)  # suffix minimum of the ends
        for i in range(len(calls) - 1, -1, -1):
            self.first_end_from[i] = min(calls[i][1], self.first_end_from[i + 1])

    def after(self, moment: float) -> float:
        """When the agent had certainly dealt with every request sent before ``moment``: it serves
        requests one at a time in order, so the end of a call begun after ``moment`` bounds it."""
        return self.first_end_from[bisect.bisect_right(self.starts, moment)]


def end_windows(
    clients: dict[str, list[dict[str, Any]]],
    faults: list[dict[str, Any]],
    agent_starts: dict[str, list[float]],
) -> EndWindows:
    """Every way a lease can end before its expiry, found in the histories (dbguard/lease/rules.py:
    only `release` by the holder's own agent and `break` end a lease early; the agent releases
    (agent/server.py `_release`) when asked to, when a grant it just received cannot be adopted (an
    acquire that fails, also in the reclaim at agent start-up) and on a takeover, which the
    writers never ask for). Windows:

    - a writer's release call [t0, t1]; an acquire call that failed other than by LeaseHeld (the
      broker refused, nothing was granted) or by the broker being unreachable (no grant either);
    - a call whose answer never came (the agent timed out, or the writer was killed): until the
      agent answered a call begun after the timeout or the death (`_Served.after`);
    - each agent start found in its log (the reclaim), until it answered a call begun after it;
    - each operator break, from before the command until it returned.
    """
    windows = EndWindows()
    host_of = {
        name: next((e["host"] for e in events if e["ev"] == "start"), "") for name, events in clients.items()
    }
    calls: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, events in clients.items():
        for e in events:
            answered = e["ev"] in ("grant", "release") or (
                e["ev"] == "flush_ok" and e["generation"] is not None
            )
            if answered or (e["ev"] == "acquire_error" and e["kind"] == "LeaseHeld"):
                calls[host_of[name]].append((e["t0"], e.get("t1", e["t"])))
    served = {host: _Served(items) for host, items in calls.items()}
    never = _Served([])

    def death(name: str, after: float) -> float:
        """When the process of history ``name`` was killed (by the nemesis), or infinity."""
        slot, _, incarnation = name.removeprefix("chaos-").rpartition("-")
        ends = [
            f["t1"]
            for f in faults
            if f["ev"] == "fault"
            and f["t1"] >= after
            and (
                (f["kind"] == "kill-writer" and f.get("client") == f"{slot}.{incarnation}")
                or (f["kind"] in CRASH_KINDS and f.get("host") == host_of[name])
            )
        ]
        return min(ends, default=float("inf"))

    for name, events in clients.items():
        host = host_of[name]
        after = served.get(host, never).after
        intents: dict[float, dict[str, Any]] = {}
        for e in events:
            if e["ev"] in ("acquiring", "releasing"):
                intents[e["t0"]] = e
                continue
            if e["ev"] not in ("grant", "acquire_error", "release", "release_error"):
                continue
            intent = intents.pop(e["t0"], None)
            if intent is None or e["ev"] == "grant":
                continue
            timed_out = e.get("kind") == "BrokerUnavailable" and "local dbguard agent" in e.get("message", "")
            if timed_out:
                windows.add(host, e["t0"], after(e["t"]))
            elif e["ev"] == "acquire_error" and e["kind"] in ("LeaseHeld", "BrokerUnavailable"):
                continue
            else:
                windows.add(host, e["t0"], e["t"])
        for intent in intents.values():  # cut short: until the agent answered after the death
            died = death(name, events[-1]["t"])
            windows.add(host, intent["t0"], after(died) if died < float("inf") else died)
    for host, starts in agent_starts.items():
        for start in starts:
            windows.add(host, start - 0.2, served.get(host, never).after(start))
    windows.breaks.extend(_break_windows(faults))
    return windows


def agent_starts(run: dict[str, Any], status: list[dict[str, Any]]) -> dict[str, list[float]]:
    """host -> monotonic times at which an agent started there (from its log: wall clock, ms)."""
    offsets = sorted(e["t"] - e["wall"] for e in status)
    if not offsets:
        return {}
    offset = offsets[len(offsets) // 2]
    found: dict[str, list[float]] = {}
    for host in run["hosts"]:
        path = Path(host["tmp"]) / "dbguard-root" / "agent.log"
        with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as handle:
            for line in handle:
                if " serving ipc://" not in line:
                    continue
                with contextlib.suppress(ValueError):
                    stamp = (
                        time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
                    )
                    found.setdefault(host["name"], []).append(stamp + offset)
    return found


def check_leases(
    clients: dict[str, list[dict[str, Any]]],
    status: list[dict[str, Any]],
    ttl: float,
    report: Report,
    windows: EndWindows | None = None,
) -> None:
    """Invariant 1, from the broker's view (status snapshots) and the grants writers received.

    Facts of the broker's lease rules this relies on (dbguard/lease/rules.py):
    (a) a token is granted only while the project is FREE, and is larger than every earlier one;
    (b) a lease that is HELD with expiry E stays HELD until E unless it ends for good: released
        or broken (FREE, writer gone) - it never expires early, also not across a broker restart,
        which reloads it with a later expiry;
    (c) once a token has ended for good it is never seen again (nothing brings a writer back).

    Evidence: each status snapshot taken in [s0, s1] that names writer token T happened at some
    broker time tau in [s0, s1]; if it says HELD with ttl_left L, T's expiry was tau + L >= s0 + L.
    A grant returned to a writer (acquire called at t0, returned at t1) is the same kind of
    sighting: granted or resumed at tau in [t0, t1], expiry >= tau + TTL >= t0 + TTL.

    For each token T let last(T) = the largest s0 of any sighting of T: T had not ended for good
    before last(T) (c). So from each HELD sighting, T was certainly held over
    [s1, min(s0 + L, end(T))] (b): from the latest moment the sighting can have been made, to the
    earliest it could have expired or ended, where end(T) is the earliest moment at or after
    last(T) at which something could have ended T early: a release by its host's agent or an
    operator's break (``windows``, see `end_windows`). Without windows end(T) = last(T), which
    needs no knowledge of releases at all. These are lower bounds of the true hold intervals: two
    tokens whose certain intervals overlap prove two holders at once (violation), such as a
    broker that grants a new token before the previous holder's promised expiry.

    Also checked: one token is never seen with two hosts; the broker never shows a token lower
    than one it certainly showed (or granted) before (a lost grant after a restart would).
    """
    sightings: list[Sighting] = []
    for e in status:
        writer = e.get("writer")
        if writer:
            held = e["s0"] + writer["ttl_left"] if e["state"] == "held" else None
            sightings.append(Sighting(int(writer["token"]), writer["host"], e["s0"], e["s1"], held, "status"))
    grants: list[tuple[str, dict[str, Any]]] = []
    for name, events in clients.items():
        for e in events:
            if e["ev"] != "grant":
                continue
            grants.append((name, e))
            sightings.append(
                Sighting(e["token"], e["host"], e["t0"], e["t1"], e["t0"] + e["ttl"], f"grant to {name}")
            )
            view = e["broker"]
            if view.get("writer"):
                w = view["writer"]
                held = view["s0"] + w["ttl_left"] if view["state"] == "held" else None
                sightings.append(
                    Sighting(int(w["token"]), w["host"], view["s0"], view["s1"], held, f"status by {name}")
                )

    hosts: dict[int, set[str]] = defaultdict(set)
    last: dict[int, float] = {}
    for s in sightings:
        hosts[s.token].add(s.host)
        last[s.token] = max(last.get(s.token, s.s0), s.s0)
    for token, names in sorted(hosts.items()):
        if len(names) > 1:
            report.violation("1", f"token {token} was held by several hosts: {sorted(names)}")

    ends: dict[int, float] = {}
    for token, names in hosts.items():
        ends[token] = last[token]
        if windows is not None:
            ends[token] = min(windows.earliest_end(name, last[token]) for name in names)
    pieces: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for s in sightings:
        if s.held_until is None:
            continue
        end = min(s.held_until, ends[s.token])
        if end > s.s1:
            pieces[s.token].append((s.s1, end, s.source))
    merged: list[tuple[float, float, int, str]] = []
    for token, items in pieces.items():
        items.sort()
        start, end, source = items[0]
        for a, b, src in items[1:]:
            if a <= end:
                end = max(end, b)
            else:
                merged.append((start, end, token, source))
                start, end, source = a, b, src
        merged.append((start, end, token, source))
    merged.sort()
    report.leases.update(
        tokens_seen=len(hosts),
        certainly_held_seconds=round(sum(b - a for a, b, _, _ in merged), 1),
        end_windows=sum(len(w) for w in windows.by_host.values()) + len(windows.breaks) if windows else 0,
    )
    widest: tuple[float, float, int, str] | None = None
    for piece in merged:
        if widest is not None and piece[0] < widest[1] and piece[2] != widest[2]:
            a, b = piece[0], min(piece[1], widest[1])
            report.violation(
                "1",
                f"tokens {widest[2]} ({sorted(hosts[widest[2]])}, {widest[3]}) and {piece[2]} "
                f"({sorted(hosts[piece[2]])}, {piece[3]}) were both certainly held over [{a:.3f}, {b:.3f}]",
            )
        if widest is None or piece[1] > widest[1]:
            widest = piece

    # Tokens never go back: a sighting of T certainly after a sighting (or grant) of U > T.
    floors = [(s.s1, s.token, s.source) for s in sightings]
    for e in status:
        floors.append((e["s1"], int(e["token"]), "status last_token"))
    floors.sort()
    best: tuple[int, str] = (0, "")
    position = 0
    checks = sorted(
        [(s.s0, s.token, s.source) for s in sightings]
        + [(e["s0"], int(e["token"]), "status last_token") for e in status]
    )
    reported = 0
    for s0, token, source in checks:
        while position < len(floors) and floors[position][0] < s0:
            if floors[position][1] > best[0]:
                best = (floors[position][1], floors[position][2])
            position += 1
        if token < best[0] and source != "status last_token":
            # An older writer token may only reappear if it is the same lease (never after a newer
            # grant): seeing T after U > T was shown means U ended and T came back.
            reported += 1
            if reported <= 20:
                report.violation("1", f"token {token} ({source}) seen after token {best[0]} ({best[1]})")
        elif token < best[0] and source == "status last_token":
            reported += 1
            if reported <= 20:
                report.violation(
                    "1", f"the broker's last token went back to {token} after {best[0]} ({best[1]})"
                )


def check_fencing(
    clients: dict[str, list[dict[str, Any]]], manifests: dict[int, dict[str, Any]], report: Report
) -> None:
    """Invariant 2: every manifest ever published, in generation order, has a token no lower than
    the one before; a writer's accepted flush is in the manifest it names, with its token; and no
    flush was accepted with a token older than one a writer had already been granted (a grant
    fences the store before acquire returns) before the flush began."""
    generations = sorted(manifests)
    report.store["generations"] = len(generations)
    if generations:
        expected = set(range(generations[0], generations[-1] + 1))
        missing = sorted(expected - set(generations))
        if missing:
            report.notes.append(f"{len(missing)} generations were never seen by the watcher: {missing[:10]}")
        if generations[0] != 1:
            report.notes.append(f"the first generation seen is {generations[0]}")
    previous: tuple[int, int] | None = None
    for generation in generations:
        token = int(manifests[generation]["token"])
        if previous is not None and token < previous[1]:
            report.violation(
                "2",
                f"generation {generation} has token {token}, "
                f"lower than {previous[1]} of generation {previous[0]}",
            )
        previous = (generation, token)
    grants = sorted(
        (e["t1"], e["token"], name) for name, events in clients.items() for e in events if e["ev"] == "grant"
    )
    for name, events in clients.items():
        for e in events:
            if e["ev"] != "flush_ok" or not e["records"]:
                continue
            manifest = manifests.get(e["generation"])
            if manifest is None:
                report.notes.append(
                    f"{name}: flush to generation {e['generation']} not among the manifests seen"
                )
            elif int(manifest["token"]) != e["token"]:
                report.violation(
                    "2",
                    f"{name}: flush with token {e['token']} returned generation {e['generation']}, "
                    f"whose manifest has token {manifest['token']}",
                )
            newer = [(t1, token, who) for t1, token, who in grants if t1 < e["t0"] and token > e["token"]]
            if newer:
                t1, token, who = newer[0]
                report.violation(
                    "2",
                    f"{name}: a flush with token {e['token']} began at {e['t0']:.3f} and was accepted "
                    f"(generation {e['generation']}), after token {token} was granted to {who} at {t1:.3f}",
                )


def final_records(store: Any, report: Report) -> dict[int, str]:
    """index -> sha256 of each record of the chaos database in the newest generation."""
    latest = store.latest()
    live = store.live_entries(latest)
    final: dict[int, str] = {}
    for (db, index), entry in live.items():
        if db != DB_NAME:
            continue
        try:
            final[index] = digest(store.read_payload(entry))
        except Exception as exc:
            report.violation("5", f"record {index} of the final store cannot be read: {exc}")
    report.store.update(
        generation=latest.generation,
        token=latest.token,
        records=len(final),
        count=int(latest.databases.get(DB_NAME, {}).get("count", 0)),
        segments=len(latest.segments),
    )
    return final


def check_acknowledged(
    clients: dict[str, list[dict[str, Any]]], final: dict[int, str], report: Report
) -> None:
    """Invariant 3: every record acknowledged by a flush (or a release) that returned success is
    in the final store at its index with the same sha256. Appends never overwrite, so a record
    replaced by another one at its index is lost too; one violation per lost record, naming what
    replaced it when that was acknowledged too."""
    acked: list[tuple[int, str, str]] = []
    for name, events in clients.items():
        for e in events:
            if e["ev"] in ("flush_ok", "release"):
                for seq, index, sha in e["acked"]:
                    where = (
                        f"{name} seq {seq} (token {e['token']}, {e['ev']} generation {e.get('generation')})"
                    )
                    acked.append((index, sha, where))
    by_sha = {sha: where for _, sha, where in acked}
    for index, sha, where in acked:
        if index not in final:
            report.violation("3", f"acknowledged record {index} of {where} is not in the final store")
        elif final[index] != sha:
            instead = by_sha.get(final[index], "a record never acknowledged")
            report.violation("3", f"acknowledged record {index} of {where} was replaced by {instead}")
    report.operations["acknowledged_distinct"] = len({sha for _, sha, _ in acked})


def check_reads(
    clients: dict[str, list[dict[str, Any]]],
    manifests: dict[int, dict[str, Any]],
    final: dict[int, str],
    report: Report,
) -> None:
    """Invariant 4: every record a reader got matched its embedded ids and never changed; each
    read's count is the count of the generation it read; a reader's counts never go back as its
    generations go forward; and every record a reader saw is still in the final store (what was
    published once is never lost)."""
    for name, events in clients.items():
        reads = [e for e in events if e["ev"] == "read"]
        for e in reads:
            for item in e["bad"]:
                report.violation(
                    "4", f"{name} generation {e['generation']}: record {item['index']}: {item['why']}"
                )
            manifest = manifests.get(e["generation"])
            if manifest is not None:
                count = int(manifest["databases"].get(DB_NAME, {}).get("count", 0))
                if count != e["count"]:
                    report.violation(
                        "4",
                        f"{name} read {e['count']} records in generation {e['generation']}, "
                        f"which has {count}",
                    )
            for index, sha16 in e["seen"]:
                if final.get(index, "")[:16] != sha16:
                    report.violation(
                        "4",
                        f"{name} read record {index} in generation {e['generation']}; the final store "
                        f"{'has another' if index in final else 'lacks it'}",
                    )
        ordered = sorted(reads, key=lambda e: e["t0"])
        for before, after in itertools.pairwise(ordered):
            if after["generation"] >= before["generation"] and after["count"] < before["count"]:
                report.violation(
                    "4",
                    f"{name}: count went back from {before['count']} (generation {before['generation']}) "
                    f"to {after['count']} (generation {after['generation']})",
                )
        for e in events:
            if e["ev"] == "read_error" and e["kind"] == "IntegrityError":
                report.violation("4", f"{name}: a read failed its checksum: {e['message']}")


def check_kept(
    clients: dict[str, list[dict[str, Any]]], run: dict[str, Any], final: dict[int, str], report: Report
) -> None:
    """Invariant 5 (as a sixth check): every append that returned is somewhere: in the final
    store, or in a host's cache (unflushed, or set aside after its lease was lost)."""
    from dbguard.cache import CacheStore

    kept = set(final.values())
    envs = 0
    for host in run["hosts"]:
        root = Path(host["tmp"]) / "dbguard-root"
        for cache_root in [root, *sorted((root / "aside").glob("*"))]:
            if not CacheStore.exists(cache_root, run["project"]):
                continue
            envs += 1
            with CacheStore(cache_root, run["project"], create=False) as cache, cache.reader() as reader:
                for db in reader.databases():
                    if db != DB_NAME:
                        continue
                    for index in range(reader.count(db)):
                        with contextlib.suppress(KeyError):
                            kept.add(digest(reader.record(db, index).data))
    report.store["cache_environments"] = envs
    missing = 0
    for name, events in clients.items():
        for e in events:
            if e["ev"] == "append" and e["sha"] not in kept:
                missing += 1
                if missing <= 20:
                    report.violation(
                        "6", f"{name} seq {e['seq']} (index {e['index']}, token {e['token']}) is nowhere"
                    )
    if missing > 20:
        report.violation("6", f"... and {missing - 20} more appended records are nowhere")


def _break_windows(faults: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """When an operator's break may have ended a lease: from before the command until it
    returned (a command that failed ran 30 s at most)."""
    done = {f["t_break"]: f["t1"] for f in faults if f["ev"] == "fault" and f["kind"] == "break"}
    return [(f["t0"], done.get(f["t0"], f["t0"] + 60.0)) for f in faults if f["ev"] == "breaking"]


def check_orphans(
    clients: dict[str, list[dict[str, Any]]],
    status: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    report: Report,
) -> None:
    """Invariant 7: a host that died holding acknowledged unflushed records leaves its project
    orphaned until it comes back or an operator breaks it.

    For each crash of a host H (a fault of CRASH_KINDS): every process of H was alive at the
    fault's t0 (c0) and dead at its ``t_crashed`` (c1), and nothing ran on H again before
    ``t_restart`` (r); ``store`` is the newest generation's record count, read right after c1.

    - Stranded records: appends that writers on H recorded before c1 (an append is recorded after
      it returned, so it was acknowledged before H died) at an index at or above that count. A
      record is in the store only below the store's count, which never goes down, and the count
      read after c1 is at least the count at c1: these records were certainly not in the store
      when H died, and only H can flush them, so they stayed unflushed until r at least. This
      also accounts for the flushes of H's agent, which no history records: what they covered
      is below the count. A crash whose ``store`` could not be read is left undecided (noted).
    - Forbidden while H is down: a grant to a writer on another host whose acquire call began at
      or after c0 and returned before r (the grant happened in [c0, r]); a status snapshot asked
      at or after c1 and answered before r showing the project free, in lock-delay, or written
      by another host. Anything that ends after r is not judged: H may have come back, flushed
      and released by then.
    - Excused: an operator's break whose window (`_break_windows`) ends at or after the first
      grant of the newest token that stranded records were written under (T) and begins before
      the forbidden event returned. A break that ended before T was granted cannot have ended T.
      Only T's records are the evidence: older ones may be kept aside after an earlier break of
      their own lease, and T's alone suffice (if T's writer recorded T while the agent held a
      later lease, that lease was granted later still, so its breaks excuse too).

    So a violation is certain: a grant or a free project that happened while H was dead, after
    H had records that were certainly acknowledged and certainly unflushed, with no break that
    could have come between.
    """
    host_of = {
        name: next((e["host"] for e in events if e["ev"] == "start"), "") for name, events in clients.items()
    }
    first_grant: dict[int, float] = {}
    grants: list[tuple[str, dict[str, Any]]] = []
    for name, events in clients.items():
        for e in events:
            if e["ev"] == "grant":
                grants.append((name, e))
                first_grant[e["token"]] = min(first_grant.get(e["token"], e["t0"]), e["t0"])
    breaks = _break_windows(faults)
    figures: Counter[str] = Counter()
    for f in faults:
        if f["ev"] != "fault" or f["kind"] not in CRASH_KINDS or "t_crashed" not in f:
            continue
        figures["host_crashes"] += 1
        if f.get("store") is None:
            figures["undecided"] += 1
            report.notes.append(f"the crash of {f['host']} at {f['t0']:.3f}: the store could not be read")
            continue
        host, c0, c1, count = f["host"], f["t0"], f["t_crashed"], f["store"]["count"]
        back = f.get("t_restart", f["t1"])
        stranded = [
            (name, e)
            for name, events in clients.items()
            if host_of[name] == host
            for e in events
            if e["ev"] == "append" and e["t"] <= c1 and e["index"] >= count
        ]
        if not stranded:
            continue
        figures["dirty_deaths"] += 1
        figures["stranded_records"] += len(stranded)
        token = max(e["token"] for _, e in stranded)
        evidence = [(name, e) for name, e in stranded if e["token"] == token]
        since = first_grant.get(token, float("-inf"))  # never unknown: a writer records its grant first
        last_name, last = max(evidence, key=lambda item: item[1]["t"])
        what = (
            f"{host} died in [{c0:.3f}, {c1:.3f}] holding {len(evidence)} acknowledged unflushed records "
            f"of token {token} (the last: {last_name} seq {last['seq']}, index {last['index']}, "
            f"acknowledged by {last['t']:.3f}; the store's count was {count}); while it was down "
            f"(until {back:.3f})"
        )
        if any(b1 >= c1 and b0 <= back for b0, b1 in breaks):
            figures["broken_while_down"] += 1
        down = [e for e in status if e["s0"] >= c1 and e["s1"] <= back]
        if any(e["state"] == "orphaned" and (e["writer"] or {}).get("host") == host for e in down):
            figures["orphaned_seen"] += 1
        for name, g in sorted(grants, key=lambda item: item[1]["t0"]):
            if (
                g["host"] != host
                and g["t0"] >= c0
                and g["t1"] <= back
                and not _excused(breaks, since, g["t1"])
            ):
                report.violation(
                    "7",
                    f"{what} token {g['token']} was granted to {g['host']} ({name}, acquire over "
                    f"[{g['t0']:.3f}, {g['t1']:.3f}]) with no break since {since:.3f}",
                )
                break
        for e in down:
            writer = e["writer"] or {}
            shown_free = e["state"] in ("free", "lock-delay") or writer.get("host", host) != host
            if shown_free and not _excused(breaks, since, e["s1"]):
                report.violation(
                    "7",
                    f"{what} the lease service showed the project {e['state']} (writer "
                    f"{writer.get('host')}, token {e['token']}) over [{e['s0']:.3f}, {e['s1']:.3f}] "
                    f"with no break since {since:.3f}",
                )
                break
    report.orphans.update({key: figures.get(key, 0) for key in _DEATH_FIGURES})
    if figures["undecided"]:
        report.orphans["undecided"] = figures["undecided"]


_DEATH_FIGURES = ("host_crashes", "dirty_deaths", "stranded_records", "orphaned_seen", "broken_while_down")


def _excused(breaks: list[tuple[float, float]], since: float, until: float) -> bool:
    """Whether a break may have ended, in [since, until], a lease granted at ``since``."""
    return any(b1 >= since and b0 <= until for b0, b1 in breaks)


# --------------------------------------------------------------------------------------------
# Command line.


def summary(report: Report, harness: Harness | None, seconds: float) -> dict[str, Any]:
    data: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "operations": dict(sorted(report.operations.items())),
        "faults": {kind: report.faults.get(kind, 0) for kind in FAULT_KINDS},
        "violations": {k: len(v) for k, v in report.violations.items()},
        "violation_details": {k: v[:20] for k, v in report.violations.items() if v},
        "errors": dict(report.errors.most_common()),
        "store": report.store,
        "leases": report.leases,
        "orphans": report.orphans,
        "notes": report.notes,
    }
    if harness is not None:
        data["workdir"] = str(harness.workdir)
        data["nemesis_errors"] = harness.nemesis_errors
        data["client_failures"] = harness.client_failures[:20]
    data["ok"] = report.total_violations() == 0
    return data


def render(data: dict[str, Any]) -> str:
    lines = [f"chaos run of {data['seconds']} s: {'OK' if data['ok'] else 'VIOLATIONS FOUND'}", "operations:"]
    lines += [f"  {name:24} {value}" for name, value in data["operations"].items()]
    lines.append("faults injected:")
    lines += [f"  {name:24} {value}" for name, value in data["faults"].items()]
    lines.append("violations:")
    for key, count in data["violations"].items():
        lines.append(f"  {key}. {INVARIANTS[key]:62} {count}")
        lines += [f"       - {text}" for text in data["violation_details"].get(key, [])]
    lines.append("errors seen by clients (expected under faults):")
    lines += [f"  {count:6}  {text}" for text, count in data["errors"].items()]
    lines.append(f"store: {json.dumps(data['store'])}")
    lines.append(f"leases: {json.dumps(data['leases'])}")
    lines.append(f"host deaths: {json.dumps(data.get('orphans', {}))}")
    lines += [f"note: {text}" for text in data["notes"]]
    for key in ("nemesis_errors", "client_failures"):
        for text in data.get(key, []):
            lines.append(f"{key}: {text}")
    if "workdir" in data:
        lines.append(f"workdir: {data['workdir']}")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument(
        "--backend",
        choices=("embedded", "etcd"),
        default="embedded",
        help="the lease service: the broker, or a local three-member etcd cluster",
    )
    parser.add_argument("--ttl", type=float, default=1.5)
    parser.add_argument("--lock-delay", type=float, default=0.5)
    parser.add_argument("--store-mib", type=int, default=512, help="size of the tmpfs holding the project")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (kept anyway on violations)"
    )
    parser.add_argument("--recheck", type=Path, default=None, help="only check a kept work directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.hosts, args.writers) < 1 or args.readers < 0 or args.seconds <= 0:
        parser.error("--hosts and --writers must be at least 1, --readers at least 0, --seconds positive")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    options = Options(
        hosts=args.hosts,
        writers=args.writers,
        readers=args.readers,
        seconds=args.seconds,
        seed=seed,
        ttl=args.ttl,
        lock_delay=args.lock_delay,
        store_mib=args.store_mib,
        workdir=args.workdir,
        keep=args.keep,
        backend=args.backend,
    )
    return args, options


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: Any) -> None:
    """The first Ctrl-C (or SIGTERM, or a hang-up) stops the run; the next ones are ignored, so
    the tear-down that follows always completes: no host, mount or broker is left behind."""
    _stop_signals(signal.SIG_IGN)
    raise KeyboardInterrupt


def _stop_signals(handler: Any) -> None:
    for signum in _STOP_SIGNALS:
        signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    args, options = parse(argv)
    if args.recheck is not None:
        rechecked = summary(check(args.recheck, args.recheck / "final-project"), None, 0.0)
        print(json.dumps(rechecked) if args.json else render(rechecked))
        return 0 if rechecked["ok"] else 1
    if os.geteuid() != 0:
        print("chaos: run as root (namespaces, FUSE mounts, a tmpfs)", file=sys.stderr)
        return 2
    from tools.sshfs import sshfs_unavailable
    from tools.testbed import namespaces_unavailable

    why = namespaces_unavailable() or sshfs_unavailable()
    if why:
        print(f"chaos: simulated hosts are not possible here: {why}", file=sys.stderr)
        return 2
    harness = Harness(options)
    _log(f"seed {options.seed}, workdir {harness.workdir}")
    began = time.monotonic()
    data: dict[str, Any] | None = None
    interrupted = failed = False
    _stop_signals(_interrupt)
    try:
        harness.setup()
        harness.run()
    except KeyboardInterrupt:
        interrupted = True
    except Exception:
        failed = True
        _log(f"the harness failed:\n{traceback.format_exc()}")
    _stop_signals(signal.SIG_IGN)
    harness.close()
    if not (interrupted or failed):
        _log("checking the histories")
        _stop_signals(_interrupt)
        try:
            data = summary(check(harness.workdir, harness.shared), harness, time.monotonic() - began)
        except KeyboardInterrupt:
            interrupted = True
        except Exception:
            failed = True
            _log(f"the checker failed:\n{traceback.format_exc()}")
        _stop_signals(signal.SIG_IGN)
    outcome = 130 if interrupted else 2 if failed or data is None else 0 if data["ok"] else 1
    if outcome != 0:
        harness.options.keep = True  # for a post-mortem (--recheck WORKDIR)
    harness.unmount()
    if not harness.options.keep and not harness.tmpfs_mounted:
        shutil.rmtree(harness.workdir, ignore_errors=True)
        if data is not None:
            data.pop("workdir", None)
    else:
        _log(f"{'interrupted; ' if interrupted else ''}kept {harness.workdir}")
    if data is not None:
        print(json.dumps(data) if args.json else render(data))
    return outcome


if __name__ == "__main__":
    sys.exit(main())
