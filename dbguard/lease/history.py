"""A project's history: what the lease service decided and what holders reported.

The broker's rules (`dbguard.lease.rules`) and the etcd service each record an event when a
lease changes hands or state; agents report what happened on their host (`Op.REPORT`). Both
services keep the newest `KEEP_PER_PROJECT` events of each project durably, and answer
`Op.HISTORY` with them oldest first. `dbguard log`, the status page and `/metrics` read them.

An event is a flat JSON object: ``at`` (wall-clock seconds, when it happened: an expiry the
lease service noticed late is dated when the lease lapsed), ``event`` (a name of `EVENTS`),
``project``, and where they apply ``host``, ``user``, ``token``, ``job``, ``command``, ``by``
(who broke or asked for a takeover), ``unflushed``, ``bytes``, ``records``, ``seconds`` and
``detail``. Fields that do not apply are left out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

from dbguard.lease.protocol import REPORTED_EVENTS

# What each event means, for `dbguard log --help`, the status page and docs/design.md.
EVENTS: Final = {
    "granted": "the writer lease was granted (takeover: after the holder handed it over)",
    "resumed": "the holder of a lapsed lease came back before anyone else was granted",
    "released": "the holder gave the lease back",
    "expired": "not renewed within its TTL with nothing unflushed: the lock-delay began",
    "orphaned": "not renewed within its TTL while holding unflushed data: blocked until recovered",
    "lock-delay-ended": "the lock-delay after an expiry ended: the project is free",
    "takeover-asked": "another host asked the holder to hand the lease over",
    "broken": "an operator broke the lease (dbguard break)",
    "flushed": "the holder flushed its cache to the project store",
    "fence-refused": "a flush was refused: a newer writer's token fenced it",
    "deployed": "the project was deployed to a local folder of the holder",
    "synced": "the holder synced its deployed folder back to the share",
    "undeployed": "the holder synced its deployed folder back a last time and removed it",
}
assert EVENTS.keys() >= REPORTED_EVENTS

# Events kept per project, oldest dropped first: a year of a busy project's grants and flushes
# at an hour's flush interval is about 10,000; the table of a site stays bounded all the same.
KEEP_PER_PROJECT: Final = 2000
# At most this many events in one HISTORY reply (the newest ones).
MAX_LIMIT: Final = 10_000


def event(kind: str, project: str, at: float | None = None, **fields: Any) -> dict[str, Any]:
    """One event, with the fields that apply (None values are left out)."""
    assert kind in EVENTS, kind
    record: dict[str, Any] = {"at": time.time() if at is None else at, "event": kind, "project": project}
    record.update((name, value) for name, value in fields.items() if value is not None)
    return record


def holder_fields(
    host: str, user: str, token: int | None, work: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The fields naming who an event is about: host, user, token, and the job they run."""
    work = work or {}
    return {
        "host": host,
        "user": user,
        "token": token,
        "job": work.get("job"),
        "command": work.get("command"),
        "path": work.get("path"),
    }


def select(events: Iterable[dict[str, Any]], since: float, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` events at or after ``since``, oldest first, from events oldest first."""
    chosen = [e for e in events if isinstance(e.get("at"), int | float) and e["at"] >= since]
    return chosen[-limit:] if limit > 0 else []


def describe(record: dict[str, Any]) -> str:
    """One line for a person: when, what, who, and the figures that go with it."""
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("at", 0.0))))
    except (TypeError, ValueError, OverflowError, OSError):  # a damaged event still gets a line
        when = "????-??-?? ??:??:??"
    who = ""
    if record.get("host"):
        who = f" {record.get('user', '?')}@{record['host']}"
    parts = [f"{when}  {record.get('event', '?'):<16}{who}"]
    if record.get("token") is not None:
        parts.append(f"token {record['token']}")
    if record.get("job"):
        parts.append(f"job {record['job']}")
    if record.get("by"):
        parts.append(f"by {record['by']}")
    if record.get("takeover"):
        parts.append("takeover")
    if record.get("unflushed"):
        parts.append(f"{record['unflushed']} bytes unflushed")
    if record.get("records") is not None:
        parts.append(f"{record['records']} records")
    if record.get("bytes") is not None:
        parts.append(f"{record['bytes']} bytes")
    if isinstance(record.get("seconds"), int | float):
        parts.append(f"{float(record['seconds']):.2f}s")
    if record.get("detail"):
        parts.append(str(record["detail"]))
    return ", ".join(parts)
