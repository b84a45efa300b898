"""What the status page shows, gathered from the lease service in one thread.

`SiteWatcher` polls status and history and keeps the latest `site_view`; `site_view` is a pure
function of what the lease service said, so the page's contents are tested without a browser.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dbguard.errors import GuardError
from dbguard.lease import requests
from dbguard.lease.service import LeaseService

log = logging.getLogger("dbguard.web")

# How far back each history poll looks again: an expiry the lease service notices late is dated
# when the lease lapsed, up to a TTL and a lock-delay earlier than the poll that brings it.
_HISTORY_OVERLAP = 600.0
# Events kept for the page's project history (the lease service keeps more: `dbguard log`).
_EVENTS_SHOWN = 200


def site_view(
    projects: list[dict[str, Any]], events: dict[str, list[dict[str, Any]]], now: float
) -> dict[str, Any]:
    """The page's data: a site-wide summary, and per project its lease as status reports it
    with what only the history knows (the last flush, a deployment)."""
    rows = []
    hosts: set[str] = set()
    summary = {"projects": 0, "held": 0, "orphaned": 0, "lock-delay": 0, "free": 0, "waiting": 0}
    stranded = unflushed = 0
    for item in projects:
        state = str(item.get("state", "free"))
        writer = item.get("writer") or None
        history = events.get(str(item.get("project")), [])
        summary["projects"] += 1
        summary[state] = summary.get(state, 0) + 1
        summary["waiting"] += len(item.get("queue") or [])
        if writer and state == "held":
            hosts.add(str(writer.get("host")))
            unflushed += int(writer.get("unflushed") or 0)
        if writer and state == "orphaned":
            stranded += int(writer.get("unflushed") or 0)
        hosts.update(str(r.get("host")) for r in item.get("readers") or [])
        hosts.update(str(w.get("host")) for w in item.get("queue") or [])
        rows.append(
            {
                "project": item.get("project"),
                "path": (writer or {}).get("path") or _last(history, "path"),
                "state": state,
                "writer": writer,
                "token": item.get("token"),
                "free_in": item.get("free_in"),
                "queue": item.get("queue") or [],
                "readers": item.get("readers") or [],
                "last_loss": item.get("last_loss"),
                "last_flush": _last_flush(history),
                "served": (writer or {}).get("serve") if state == "held" else None,
                "deployed": _deployed(history, writer, state),
                "events": len(history),
            }
        )
    rows.sort(key=lambda row: (_STATE_ORDER.get(row["state"], 9), str(row["path"] or row["project"])))
    summary.update(hosts_alive=len(hosts), stranded_bytes=stranded, unflushed_bytes=unflushed)
    return {"generated": now, "summary": summary, "projects": rows}


# Orphaned first: what needs a person.
_STATE_ORDER = {"orphaned": 0, "held": 1, "lock-delay": 2, "free": 3}


def _last(history: list[dict[str, Any]], name: str) -> Any:
    return next((e[name] for e in reversed(history) if e.get(name)), None)


def _last_flush(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    flush = next((e for e in reversed(history) if e.get("event") == "flushed"), None)
    if flush is None:
        return None
    return {k: flush.get(k) for k in ("at", "host", "bytes", "records", "seconds")}


def _deployed(
    history: list[dict[str, Any]], writer: dict[str, Any] | None, state: str
) -> dict[str, Any] | None:
    """The writer's deployment, from its own reports: the last of deployed and undeployed under
    the writer's token says whether it still has one."""
    if writer is None or state not in ("held", "orphaned"):
        return None
    for event in reversed(history):
        if event.get("token") != writer.get("token"):
            continue
        if event.get("event") == "undeployed":
            return None
        if event.get("event") in ("deployed", "synced"):
            return {"host": event.get("host"), "since": event.get("at")}
    return None


class SiteWatcher(threading.Thread):
    """Polls the lease service every ``interval`` seconds; `snapshot` is the latest view, and
    ``on_events`` hears each history event once (the metrics count them)."""

    def __init__(
        self,
        connect: Callable[[], LeaseService],
        interval: float = 1.0,
        on_events: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        super().__init__(name="site-watcher", daemon=True)
        self._connect = connect
        self.interval = interval
        self._on_events = on_events
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._updated = threading.Event()
        self._snapshot: dict[str, Any] = {"generated": None, "summary": None, "projects": [], "error": None}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._seen: dict[str, float] = {}  # event key -> its time, for those in the overlap window
        self._newest = 0.0
        self.hello: dict[str, Any] = {}

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot

    def project(self, project: str) -> dict[str, Any] | None:
        with self._lock:
            row = next((r for r in self._snapshot["projects"] if r["project"] == project), None)
            if row is None:
                return None
            shared = {name: self._snapshot.get(name) for name in ("generated", "service", "error")}
            return {**row, "history": list(self._events.get(project, [])), **shared}

    def wait_for_first(self, timeout: float) -> bool:
        return self._updated.wait(timeout)

    def run(self) -> None:
        service: LeaseService | None = None
        while not self._stop.is_set():
            try:
                if service is None:
                    service = self._connect()
                self._poll(service)
            except GuardError as exc:
                with self._lock:
                    self._snapshot = {**self._snapshot, "error": str(exc)}
                if service is not None:
                    service.close()
                service = None
            except Exception as exc:  # the page says so and keeps trying; it never dies of one poll
                log.exception("polling the lease service failed")
                with self._lock:
                    self._snapshot = {**self._snapshot, "error": f"{type(exc).__name__}: {exc}"}
            self._updated.set()
            self._stop.wait(self.interval)
        if service is not None:
            service.close()

    def _poll(self, service: LeaseService) -> None:
        hello = service.send_ok(requests.Hello())
        since = max(0.0, self._newest - _HISTORY_OVERLAP)
        new_events = self._take_new(
            service.send_ok(requests.History(None, since=since, limit=10_000))["events"]
        )
        projects = service.send_ok(requests.Status(None))["projects"]
        now = time.time()
        with self._lock:
            self.hello = hello
            for event in new_events:
                shown = self._events.setdefault(str(event.get("project")), [])
                shown.append(event)
                del shown[:-_EVENTS_SHOWN]
            view = site_view(projects, self._events, now)
            view["service"] = {
                "address": getattr(service, "address", None),
                "backend": hello.get("backend", "broker"),
                "ttl": hello.get("ttl"),
            }
            view["error"] = None
            self._snapshot = view
        if new_events and self._on_events is not None:
            self._on_events(new_events)

    def _take_new(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events not seen before, oldest first: polls overlap (see _HISTORY_OVERLAP)."""
        fresh = []
        for event in events:
            key = json.dumps(event, sort_keys=True, default=str)
            if key in self._seen:
                continue
            at = float(event.get("at", 0.0))
            self._seen[key] = at
            self._newest = max(self._newest, at)
            fresh.append(event)
        horizon = self._newest - 2 * _HISTORY_OVERLAP
        if len(self._seen) > 50_000 or fresh:
            self._seen = {k: at for k, at in self._seen.items() if at >= horizon}
        return fresh
