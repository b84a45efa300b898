"""The checker of a chaos run: the invariants of docs/design.md, decided from the histories.

After the run, with every process stopped, `check` reads every history (the clients', the
nemesis's faults, the harness's status snapshots), the manifests the harness copied and the final
store, and decides (each ``check_*`` function says exactly how):

1. never two writer hosts at overlapping times, as the broker shows them (`check_leases`);
2. no flush accepted with a stale token (`check_fencing`);
3. no acknowledged record lost (`check_acknowledged`);
4. no torn read (`check_reads`);
5. `dbguard verify` finds the final store clean;
6. no appended record vanished (a second check of invariant 5: kept in the store, a cache or
   aside; `check_kept`);
7. a host that died holding acknowledged unflushed records leaves its project orphaned: while it
   is down, no other host is granted the project, nor does the lease service show it free,
   unless an operator broke the lease (`check_orphans`).

Every violation found goes into a `Report`, with the figures of the run.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.chaos.clients import DB_NAME, digest
from tools.chaos.history import read_jsonl
from tools.chaos.nemesis import CRASH_KINDS

INVARIANTS = {
    "1": "never two writer hosts at overlapping times (broker's view)",
    "2": "no flush accepted with a stale token",
    "3": "no acknowledged record lost",
    "4": "no torn read",
    "5": "dbguard verify finds the final store clean",
    "6": "no appended record vanished (kept in the store, a cache or aside)",
    "7": "a holder dead with unflushed data leaves its project orphaned",
}


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
            clients[path.stem] = read_jsonl(path)
    status = read_jsonl(workdir / "status.jsonl")
    faults = read_jsonl(workdir / "faults.jsonl")
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


# A held interval of a token, as (start, end, token, source of the sighting it began with).
Held = tuple[float, float, int, str]


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

    The steps, in order: gather the sightings (`lease_sightings`); one host per token
    (`check_one_host_per_token`); end(T) (`earliest_ends`); the certain hold intervals
    (`certainly_held`), whose figures go to ``report.leases``; no two tokens held at once
    (`check_never_two_holders`); tokens never go back (`check_tokens_never_go_back`). ``ttl`` is
    not used: each grant records the TTL it was given.
    """
    sightings = lease_sightings(clients, status)
    hosts = check_one_host_per_token(sightings, report)
    held = certainly_held(sightings, earliest_ends(sightings, hosts, windows))
    report.leases.update(
        tokens_seen=len(hosts),
        certainly_held_seconds=round(sum(b - a for a, b, _, _ in held), 1),
        end_windows=sum(len(w) for w in windows.by_host.values()) + len(windows.breaks) if windows else 0,
    )
    check_never_two_holders(held, hosts, report)
    check_tokens_never_go_back(sightings, status, report)


def lease_sightings(clients: dict[str, list[dict[str, Any]]], status: list[dict[str, Any]]) -> list[Sighting]:
    """Every sighting of a writer token: the harness's status snapshots, each grant a writer
    received (held until at least t0 + TTL), and the status each writer asked for after its grant.
    A sighting of a lease that was not HELD (orphaned, say) has no ``held_until``."""
    sightings: list[Sighting] = []
    for e in status:
        writer = e.get("writer")
        if writer:
            held = e["s0"] + writer["ttl_left"] if e["state"] == "held" else None
            sightings.append(Sighting(int(writer["token"]), writer["host"], e["s0"], e["s1"], held, "status"))
    for name, events in clients.items():
        for e in events:
            if e["ev"] != "grant":
                continue
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
    return sightings


def check_one_host_per_token(sightings: list[Sighting], report: Report) -> dict[int, set[str]]:
    """A token is only ever seen with one host: a token seen with several is a violation. Returns
    the hosts each token was seen with."""
    hosts: dict[int, set[str]] = defaultdict(set)
    for s in sightings:
        hosts[s.token].add(s.host)
    for token, names in sorted(hosts.items()):
        if len(names) > 1:
            report.violation("1", f"token {token} was held by several hosts: {sorted(names)}")
    return hosts


def earliest_ends(
    sightings: list[Sighting], hosts: dict[int, set[str]], windows: EndWindows | None
) -> dict[int, float]:
    """end(T) for each token T: the earliest moment at or after last(T), its latest sighting,
    at which a release by its host's agent or an operator's break may have ended it early (see
    `EndWindows.earliest_end`); without ``windows``, last(T) itself."""
    last: dict[int, float] = {}
    for s in sightings:
        last[s.token] = max(last.get(s.token, s.s0), s.s0)
    ends: dict[int, float] = {}
    for token, names in hosts.items():
        ends[token] = last[token]
        if windows is not None:
            ends[token] = min(windows.earliest_end(name, last[token]) for name in names)
    return ends


def certainly_held(sightings: list[Sighting], ends: dict[int, float]) -> list[Held]:
    """The intervals over which each token was certainly held: from each HELD sighting, from its
    s1 to the earlier of its promised expiry and the token's end(T); each token's overlapping
    intervals merged, all sorted by start."""
    pieces: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for s in sightings:
        if s.held_until is None:
            continue
        end = min(s.held_until, ends[s.token])
        if end > s.s1:
            pieces[s.token].append((s.s1, end, s.source))
    merged: list[Held] = []
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
    return merged


def check_never_two_holders(held: list[Held], hosts: dict[int, set[str]], report: Report) -> None:
    """No two tokens were certainly held at overlapping times: each overlap of the intervals of
    `certainly_held` (sorted by start) with an earlier one of another token is a violation."""
    widest: Held | None = None
    for piece in held:
        if widest is not None and piece[0] < widest[1] and piece[2] != widest[2]:
            a, b = piece[0], min(piece[1], widest[1])
            report.violation(
                "1",
                f"tokens {widest[2]} ({sorted(hosts[widest[2]])}, {widest[3]}) and {piece[2]} "
                f"({sorted(hosts[piece[2]])}, {piece[3]}) were both certainly held over [{a:.3f}, {b:.3f}]",
            )
        if widest is None or piece[1] > widest[1]:
            widest = piece


def check_tokens_never_go_back(
    sightings: list[Sighting], status: list[dict[str, Any]], report: Report
) -> None:
    """Tokens never go back: a sighting of writer token T made certainly after a sighting (or a
    grant) of U > T, or a status snapshot whose last token went back below such a U, is a
    violation (at most 20 are reported)."""
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
