"""The harness of a chaos run: the set-up, the clients kept running, the observers, the
tear-down, and the command line (`main`, run by ``python -m tools.chaos``).

The set-up is one broker (short TTL) or a three-member etcd cluster, one loopback sshd, M
simulated hosts (tools/testbed.py SimHost) that each mount the shared project directory at a path
of their own, and one project. The shared directory is a small tmpfs of its own, so that the
nemesis can fill it up. Writers and readers (`tools.chaos.clients`) run on the hosts; a client
that dies is started again as a new incarnation.

Processes on a simulated host have a /tmp of their own, so they are given this checkout through
/proc/<harness pid>/root on PYTHONPATH (see `host_visible`): otherwise a checkout under /tmp
would silently run whatever dbguard the Python installation has.

While the nemesis (`tools.chaos.nemesis`) injects faults, the harness polls the broker's status
many times a second (the broker's view over time) and copies every manifest as soon as it is
published (old ones are deleted after a delay). After the run, with every process stopped, the
checker (`tools.chaos.checker`) decides the invariants from what was recorded.

The command prints the figures and exits 1 on any violation (``--json``: one JSON object), 2 if
the harness itself failed, 130 if interrupted. Everything is stopped and unmounted on exit, also
on Ctrl-C; the work directory is kept when the run did not pass, and ``--recheck WORKDIR`` runs
the checker on it again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

from tools.chaos.checker import INVARIANTS, Report, check
from tools.chaos.history import History, log
from tools.chaos.nemesis import FAULT_KINDS, Nemesis

# The checkout the hosts must run: tools/chaos/harness.py is three levels below it.
REPO = Path(__file__).resolve().parents[2]
# How far past its length a run may go to inject every kind of fault once.
EXTRA_SECONDS = 30.0


def host_visible(path: str) -> str:
    """``path`` of this process as a process on a simulated host can reach it.

    A simulated host has a /tmp (and /mnt) of its own, so a checkout under /tmp (a worktree) is
    not there: its processes would silently import whatever `dbguard` the Python installation
    has instead. /proc/PID/root of this process leads into our own mount namespace."""
    if path.startswith(("/tmp/", "/mnt/")) or path in ("/tmp", "/mnt"):
        return f"/proc/{os.getpid()}/root{path}"
    return path


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
    """The settings of a run (`parse` makes them from the command line)."""

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
    """Whether a host is up; its lock is held while the nemesis or the supervisor acts on it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    up: bool = True


class Harness:
    """One chaos run: its work directory, its processes and the threads that watch them."""

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
        self.started = 0.0
        self.namespaces: set[str] = set()  # UTS namespaces of every host ever started (the sweep)
        self.rng = random.Random(options.seed + 1)  # client restart delays
        self.nemesis = Nemesis(self)

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
            self.start_host(number)
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

    def start_host(self, number: int) -> None:
        """Start host ``number`` (again, after a crash); three tries, then RuntimeError."""
        host = self.hosts[number]
        for attempt in range(3):
            try:
                host.start()
                with contextlib.suppress(OSError):
                    self.namespaces.add(os.readlink(f"/proc/{host.pid}/ns/uts"))
                return
            except Exception as exc:
                log(f"host {host.name} did not start (attempt {attempt + 1}): {exc}")
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
            "import json\nfrom tools.chaos.clients import client_main\n"
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
                client_log = self.hosts[slot.host].tmp / f"chaos-{slot.name}-{slot.incarnation}.log"
                tail = client_log.read_text(errors="replace")[-800:]
            self.client_failures.append(
                f"{slot.name}.{slot.incarnation} exited {code}: {output[-400:]}{tail}"
            )

    # --------------------------------------------------------------- observers

    def _status_poller(self) -> None:
        """The broker's view over time: a status snapshot every 0.1 s, with when it was asked."""
        from dbguard.lease import requests

        history = History(self.status_path)
        with self.lease_service(timeout=0.8) as client:
            while not self.stop.is_set():
                s0 = time.monotonic()
                try:
                    item = client.send_ok(requests.Status(self.project_id))["projects"][0]
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

    def status(self) -> dict[str, Any] | None:
        """The lease service's view of the project now; None if it did not answer."""
        from dbguard.lease import requests

        try:
            with self.lease_service(timeout=1.0) as client:
                item: dict[str, Any] = client.send_ok(requests.Status(self.project_id))["projects"][0]
                return item
        except Exception:
            return None

    # ------------------------------------------------------------------- run

    def run(self) -> None:
        o = self.options
        self.started = time.monotonic()
        self.stop_at = self.started + o.seconds
        watchers = {
            "status-poller": self._status_poller,
            "manifest-watcher": self._manifest_watcher,
            "nemesis": self.nemesis.run,
        }
        for name, target in watchers.items():
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        # A loaded machine may not fit every kind of fault into a short run: the run goes on
        # (for at most EXTRA_SECONDS) until each was injected once, so none goes untested.
        while time.monotonic() < self.stop_at or (
            self.nemesis.to_do and time.monotonic() < self.stop_at + EXTRA_SECONDS
        ):
            self.supervise()
            time.sleep(0.2)
        log("run over; stopping the nemesis and the clients")
        self.stop.set()
        for thread in self.threads:
            if thread.name == "nemesis":
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
            if thread.name == "nemesis":
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
                log(f"stopping host {host.name}: {exc}")
        if self.server is not None:
            try:
                self.server.stop()
            except Exception as exc:
                log(f"stopping sshd: {exc}")
        self._sweep()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                self.broker.stop()
        with contextlib.suppress(OSError):
            self.filler.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Kill, by pid, whatever is left in the namespaces of our hosts: once a host's init is
        gone, SimHost can no longer find its processes. Only processes that carry one of our
        hosts' marks: a dead namespace's number is soon another host's (another chaos run's,
        another test's), and its processes must never be taken for ours."""
        from tools.testbed import MARK

        marks = {host.mark for host in self.hosts}
        left = []
        for process in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if (
                    process.pid != os.getpid()
                    and os.readlink(f"/proc/{process.pid}/ns/uts") in self.namespaces
                    and process.environ().get(MARK) in marks
                ):
                    left.append(process)
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.resume()
                process.kill()
        psutil.wait_procs(left, timeout=10)
        if left:
            log(f"killed {len(left)} leftover processes of the simulated hosts")

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
        log(f"could not unmount {self.export}")


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


# --------------------------------------------------------------------------------------------
# Command line.


def summary(report: Report, harness: Harness | None, seconds: float) -> dict[str, Any]:
    """The figures of a run (or of a recheck, without ``harness``) as ``--json`` prints them."""
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
        data["nemesis_errors"] = harness.nemesis.errors
        data["client_failures"] = harness.client_failures[:20]
    data["ok"] = report.total_violations() == 0
    return data


def render(data: dict[str, Any]) -> str:
    """The figures of `summary` for a person to read."""
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
    parser = argparse.ArgumentParser(
        prog="python -m tools.chaos",
        description="The chaos checker: writers and readers on simulated hosts, a seeded nemesis, and "
        "a checker of the invariants of docs/design.md over the histories they leave.",
    )
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
    """Run (or ``--recheck``) and print the figures; the exit code is as the module docstring says."""
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
    log(f"seed {options.seed}, workdir {harness.workdir}")
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
        log(f"the harness failed:\n{traceback.format_exc()}")
    _stop_signals(signal.SIG_IGN)
    harness.close()
    if not (interrupted or failed):
        log("checking the histories")
        _stop_signals(_interrupt)
        try:
            data = summary(check(harness.workdir, harness.shared), harness, time.monotonic() - began)
        except KeyboardInterrupt:
            interrupted = True
        except Exception:
            failed = True
            log(f"the checker failed:\n{traceback.format_exc()}")
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
        log(f"{'interrupted; ' if interrupted else ''}kept {harness.workdir}")
    if data is not None:
        print(json.dumps(data) if args.json else render(data))
    return outcome
