"""The nemesis of a chaos run: faults injected on a seeded random schedule.

SIGKILL of a writer, SIGKILL of an agent, SIGSTOP of a whole host for less and for more than the
TTL, host crash and restart at a random moment, host crash right after a write (the nemesis tails
the writers' histories and kills the whole host within milliseconds of an acknowledged append
that is not flushed yet, then keeps it down for longer than TTL + lock-delay), broker SIGKILL and
restart, broker SIGSTOP, a full disk on the project store, and `dbguard break --force` by an
operator while the project is orphaned (or of the live holder, when none has unflushed data to
orphan in time). Every kind is injected at least once early on, then kinds
are drawn at random. Each host crash notes what the store held right after the kill (its newest
generation and record count). Every fault is logged to ``faults.jsonl`` with the span over which
it was injected, for the checker.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

from tools.chaos.clients import DB_NAME
from tools.chaos.history import History, Tail, log

if TYPE_CHECKING:
    from tools.chaos.harness import Harness

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


class Nemesis:
    """The faults of one run, injected into the hosts and the lease service of ``harness`` from
    a thread of the harness's (`run`), each logged to the fault history when it is over."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.faults = History(harness.faults_path)
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.broker_lock = threading.Lock()
        # Every kind is injected once before any is drawn at random; what is left of that round.
        self.to_do = list(FAULT_KINDS)

    def fault(self, kind: str, t0: float, **detail: Any) -> None:
        """Log a fault that was injected over [t0, now]."""
        self.counts[kind] += 1
        self.faults.write("fault", kind=kind, t0=t0, t1=time.monotonic(), **detail)
        log(f"fault {kind} {detail}")

    @contextlib.contextmanager
    def injecting(self, kind: str, **detail: Any) -> Iterator[dict[str, Any]]:
        """Log the fault when it is over (also if it ends in an error): its whole span counts."""
        t0 = time.monotonic()
        try:
            yield detail
        finally:
            self.fault(kind, t0, **detail)

    def run(self) -> None:
        """Inject faults until the run is over (the harness's ``stop``, or its end time)."""
        rng = random.Random(self.harness.options.seed)
        self.harness.stop.wait(2.0)  # let the writers get going first
        to_do = self.to_do
        rng.shuffle(to_do)
        # Past the run's end only while a kind is still to be injected (the harness waits).
        while not self.harness.stop.is_set() and (time.monotonic() < self.harness.stop_at - 1.0 or to_do):
            if to_do:
                kind = to_do[0]
                gap = rng.uniform(0.2, 0.8)
            else:
                kind = rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
                gap = rng.uniform(0.5, 3.0)
            if self.harness.stop.wait(gap):
                break
            try:
                done = self.inject(kind, rng)
            except Exception:
                done = False
                self.errors.append(f"{kind}: {traceback.format_exc()[-1200:]}")
                log(f"nemesis error in {kind}: {traceback.format_exc()[-600:]}")
            if done and kind in to_do:
                to_do.remove(kind)
            elif not done and kind in to_do:
                # Try one other kind first, then this one again: moved to the back, a kind that
                # needs a moment of the right state (a dirty holder to orphan) may run out of run.
                to_do.insert(1, to_do.pop(0))
            self._break_if_orphaned(rng)
            self._restart_down_hosts()

    def _restart_down_hosts(self) -> None:
        """A host whose restart failed is tried again (its clients wait for it)."""
        for number, state in enumerate(self.harness.host_states):
            if state.up:
                continue
            with state.lock:
                try:
                    self.harness.start_host(number)
                    state.up = True
                except Exception as exc:
                    self.errors.append(f"restarting {self.harness.hosts[number].name}: {exc}")

    def _pick_host(self, rng: random.Random, prefer_holder: float = 0.6) -> int | None:
        holder = self._holder_host()
        if holder is not None and rng.random() < prefer_holder:
            return holder
        up = [n for n, state in enumerate(self.harness.host_states) if state.up]
        return rng.choice(up) if up else None

    def _holder_host(self) -> int | None:
        item = self.harness.status()
        writer = (item or {}).get("writer") or {}
        for number, host in enumerate(self.harness.hosts):
            if host.name == writer.get("host"):
                return number
        return None

    def inject(self, kind: str, rng: random.Random) -> bool:
        """Inject one fault; False if it could not be injected now (nothing counted)."""
        ttl = self.harness.options.ttl
        t0 = time.monotonic()
        if kind == "kill-writer":
            live = [
                s
                for s in self.harness.slots
                if s.role == "writer" and s.process is not None and s.process.poll() is None
            ]
            if not live:
                return False
            slot = rng.choice(live)
            with self.harness.host_states[slot.host].lock:
                process = slot.process  # the supervisor may have replaced it meanwhile
                if process is None or process.poll() is not None:
                    return False
                slot.killed = True
                process.kill()
            self.fault(
                kind, t0, client=f"{slot.name}.{slot.incarnation}", host=self.harness.hosts[slot.host].name
            )
            return True
        if kind == "kill-agent":
            candidates = [self._pick_host(rng)]
            candidates += [n for n in range(len(self.harness.hosts)) if n not in candidates]
            for number in candidates:
                if number is None:
                    continue
                state, host = self.harness.host_states[number], self.harness.hosts[number]
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
            state, host = self.harness.host_states[number], self.harness.hosts[number]
            with state.lock, self.injecting(kind, host=host.name) as detail:
                state.up = False
                self._crash(number, detail)
                self.harness.stop.wait(rng.uniform(0.5, 2.5))
                detail["t_restart"] = time.monotonic()
                self.harness.start_host(number)  # on failure it stays down until _restart_down_hosts
                state.up = True
            return True
        if kind == "crash-host-dirty":
            return self._crash_after_write(rng)
        if kind == "kill-broker":
            with self.broker_lock, self.injecting(kind):
                self.harness.broker.kill()
                self.harness.stop.wait(rng.uniform(0.0, 1.0))
                self._start_broker()
            return True
        if kind == "pause-broker":
            seconds = rng.uniform(0.2, 1.5) * ttl
            with self.broker_lock, self.injecting(kind, seconds=round(seconds, 3)):
                self.harness.broker.signal(signal.SIGSTOP)
                try:
                    time.sleep(seconds)
                finally:
                    self.harness.broker.signal(signal.SIGCONT)
            return True
        if kind == "disk-full":
            seconds = rng.uniform(1.0, 3.0)
            with self.injecting(kind, seconds=round(seconds, 3)) as detail:
                try:
                    detail["bytes"] = self._fill_disk()
                    self.harness.stop.wait(seconds)
                finally:
                    self.harness.filler.unlink(missing_ok=True)
            return True
        if kind == "break":
            return self._orphan_and_break(rng, t0)
        raise ValueError(kind)

    def _crash(self, number: int, detail: dict[str, Any]) -> None:
        """SIGKILL every process of host ``number`` (the caller holds its lock and has marked it
        down), then note in ``detail`` when it was certainly dead and what the store held then."""
        host = self.harness.hosts[number]
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
        manifests = self.harness.shared / ".dbguard" / "store" / "manifests"
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
            log(f"could not read the store's newest manifest: {exc}")
            return None

    def _crash_after_write(self, rng: random.Random) -> bool:
        """Kill a whole host right after one of its writers was acknowledged an append that no
        flush of that writer has covered yet, and keep it down past the TTL and the lock-delay.

        The writers' histories (fsynced line by line) are tailed every few milliseconds: the
        first new line that is an append, with no flush or release recorded after it, fires the
        crash. Whether the record was still unflushed when the host died (the agent flushes by
        itself too) is decided by the checker from the store's count read right after the kill
        (`check_orphans`), not assumed here."""
        o = self.harness.options
        tails: dict[Path, Tail] = {}
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not self.harness.stop.is_set():
            for slot in self.harness.slots:
                if (
                    slot.role != "writer"
                    or slot.process is None
                    or not self.harness.host_states[slot.host].up
                ):
                    continue
                path = self.harness.hosts[slot.host].tmp / f"chaos-{slot.name}-{slot.incarnation}.jsonl"
                if path not in tails:
                    tails[path] = Tail(path)  # from its end as it is now: only new writes count
                    continue
                events = [e for e in tails[path].read() if e.get("ev") in ("append", "flush_ok", "release")]
                if not events or events[-1]["ev"] != "append":
                    continue
                append = events[-1]
                state, host = self.harness.host_states[slot.host], self.harness.hosts[slot.host]
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
                        # On failure it stays down until _restart_down_hosts.
                        self.harness.start_host(slot.host)
                        state.up = True
                return True
            time.sleep(0.005)
        return False

    def _stay_down(self, number: int, until: float, rng: random.Random) -> None:
        """Wait while host ``number`` is down, until ``until``; now and then an operator breaks
        the orphaned project meanwhile (`dbguard break --force` from another host)."""
        breaks = rng.random() < 0.25
        orphaned_since = None
        while not self.harness.stop.is_set() and time.monotonic() < until:
            if breaks and (self.harness.status() or {}).get("state") == "orphaned":
                orphaned_since = orphaned_since or time.monotonic()
            # Not at once: the status poller sees the orphan first, as the checker's figures expect.
            if orphaned_since is not None and time.monotonic() - orphaned_since >= 0.3:
                breaks, orphaned_since = False, None
                try:
                    self._break(rng, exclude=number, t0=time.monotonic(), frozen=None)
                except Exception as exc:
                    self.errors.append(f"break while {self.harness.hosts[number].name} was down: {exc}")
            self.harness.stop.wait(0.1)

    def _pause_host(self, number: int, seconds: float, kind: str) -> None:
        state, host = self.harness.host_states[number], self.harness.hosts[number]
        with state.lock:
            if not state.up:
                return
            with self.injecting(kind, host=host.name, seconds=round(seconds, 3)):
                host.pause()
                host.pause()  # again: a process forked during the first pass is caught now
                try:
                    self.harness.stop.wait(seconds)
                finally:
                    host.resume()

    def _start_broker(self) -> None:
        for attempt in range(3):
            try:
                self.harness.broker.start()
                return
            except Exception as exc:
                log(f"broker did not start (attempt {attempt + 1}): {exc}")
                self.harness.broker.kill()
                time.sleep(1.0)
        raise RuntimeError("the broker could not be restarted")

    def _fill_disk(self) -> int:
        stats = os.statvfs(self.harness.export)
        free = stats.f_bavail * stats.f_frsize
        fd = os.open(self.harness.filler, os.O_WRONLY | os.O_CREAT, 0o600)
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
        while time.monotonic() < deadline and not self.harness.stop.is_set():
            item = self.harness.status() or {}
            writer = item.get("writer") or {}
            if item.get("state") == "held" and (writer.get("dirty") or writer.get("unflushed", 0) > 0):
                number = next(
                    (n for n, h in enumerate(self.harness.hosts) if h.name == writer.get("host")), None
                )
                break
            time.sleep(0.05)
        if number is None:
            # No holder had unflushed data in time (a loaded machine writes slowly): an operator
            # breaks the live holder instead, so every run still has a break whose fencing the
            # checker sees, rather than leaving the kind uninjected in a short run.
            if (self.harness.status() or {}).get("state") != "held":
                return False
            self._break(rng, exclude=None, t0=t0, frozen=None)
            return True
        state, host = self.harness.host_states[number], self.harness.hosts[number]
        with state.lock:
            if not state.up:
                return False
            paused = time.monotonic()
            host.pause()
            host.pause()
            try:
                orphaned = False
                until = time.monotonic() + 3 * self.harness.options.ttl + 2.0
                while time.monotonic() < until and not self.harness.stop.is_set():
                    if (self.harness.status() or {}).get("state") == "orphaned":
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
        others = [
            n for n, s in enumerate(self.harness.host_states) if n != exclude and s.up and not s.lock.locked()
        ]
        t_break = time.monotonic()
        self.faults.write("breaking", t0=t_break)
        if others:
            where = self.harness.hosts[rng.choice(others)]
            result = where.run("break", str(where.project), "--force", "--json", timeout=30)
            operator = where.name
        else:  # one host only: the operator runs it from the machine the broker is on
            result = subprocess.run(
                [sys.executable, "-m", "dbguard", "break", str(self.harness.shared), "--force", "--json"],
                env={**os.environ, "DBGUARD_BROKER": self.harness.broker.address},
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
        item = self.harness.status() or {}
        if item.get("state") == "orphaned" and rng.random() < 0.3:
            with contextlib.suppress(Exception):
                self._break(rng, exclude=None, t0=time.monotonic(), frozen=None)
