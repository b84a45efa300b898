"""The Python API behind `import dbguard`: the same operations as the commands.

Each function takes the project directory (default: the current one) and optional settings,
and raises a `GuardError` subclass on failure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbguard import local_agent
from dbguard import project as projects
from dbguard.client import Client
from dbguard.errors import GuardError, LeaseHeld
from dbguard.protocol import AgentOp, Op
from dbguard.settings import Settings, load

# How often a queued acquire asks again; well inside a TTL, so the queue slot stays alive.
_POLL = 0.2

PathLike = str | Path | None


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load()


def init(project: PathLike = None) -> projects.Project:
    """Make a directory a dbguard project (idempotent)."""
    return projects.init(Path(project) if project is not None else Path.cwd())


def acquire(
    project: PathLike = None,
    *,
    wait: float | None = None,
    takeover: bool = False,
    settings: Settings | None = None,
    on_queued: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Become the writer of a project, through this host's agent.

    Without ``wait`` or ``takeover``, raise LeaseHeld at once if another host holds it. With
    ``wait``, queue for up to that many seconds (first come, first served). With ``takeover``,
    ask the holder to flush and release, and wait for it (``wait`` seconds, default two TTLs).
    """
    settings = _settings(settings)
    target = projects.open_project(project, create=True)
    agent = local_agent.connect(settings)
    try:
        if takeover and wait is None:
            wait = 2 * settings.ttl + settings.lock_delay
        deadline = time.monotonic() + (wait or 0.0)
        queued = wait is not None or takeover
        while True:
            try:
                reply = agent.call_ok(
                    AgentOp.ACQUIRE, project=target.id, path=str(target.path), wait=queued, takeover=takeover
                )
            except LeaseHeld as exc:
                raise LeaseHeld(_held_message(target, exc.holder, waited=None), holder=exc.holder) from None
            if reply["status"] == "granted":
                return reply
            if time.monotonic() >= deadline:
                _leave_queue(settings, agent, target)
                holder = reply.get("holder") or {}
                raise LeaseHeld(_held_message(target, holder, waited=wait), holder=holder)
            if on_queued is not None:
                on_queued(reply)
            time.sleep(_POLL)
    finally:
        agent.close()


def _leave_queue(settings: Settings, agent: Client, target: projects.Project) -> None:
    holder = agent.call_ok(AgentOp.HELLO)
    # If this fails the slot still expires by itself within a TTL.
    with Client(settings.broker, timeout=settings.request_timeout) as broker, contextlib.suppress(GuardError):
        broker.call_ok(
            Op.LEAVE_QUEUE,
            project=target.id,
            holder={k: holder[k] for k in ("host", "user", "agent", "cache")},
        )


def _held_message(target: projects.Project, holder: dict[str, Any], waited: float | None) -> str:
    if not holder:
        return (
            f"project {target.path} is not available yet (the broker restarted recently, or another "
            "host is first in the queue); retry, or use --wait SECONDS to queue"
        )
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    who = f"{holder.get('user')} on {holder.get('host')}"
    unflushed = holder.get("unflushed", 0)
    waited_text = f" (waited {waited:.0f}s)" if waited else ""
    return (
        f"project {target.path} is held by {who} since {since} (token {holder.get('token')}){waited_text}. "
        f"Ask them to run `dbguard release` or `dbguard clear` there, queue with `dbguard acquire --wait "
        f"SECONDS`, or ask for it with `dbguard acquire --takeover`"
        + (f"; {unflushed} bytes are unflushed there" if unflushed else "")
    )


def release(project: PathLike = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """Give up this host's writer lease on a project."""
    settings = _settings(settings)
    target = projects.open_project(project)
    agent = local_agent.connect(settings)
    with agent:
        return agent.call_ok(AgentOp.RELEASE, project=target.id)


def status(project: PathLike = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """What the broker and this host's agent know of a project (or of every project)."""
    settings = _settings(settings)
    target = projects.open_project(project) if project is not None or projects.find_root(Path.cwd()) else None
    with Client(settings.broker, timeout=settings.request_timeout) as broker:
        if target is not None:
            reply = broker.call_ok(Op.STATUS, project=target.id)
        else:
            reply = broker.call_ok(Op.STATUS)
    result: dict[str, Any] = {"broker": settings.broker, "projects": reply["projects"], "agent": None}
    if target is not None:
        result["projects"][0]["path"] = str(target.path)
    agent = local_agent.running(settings)
    if agent is not None:
        with agent:
            local = agent.call_ok(AgentOp.LEASES)
        ids = {p["project"] for p in result["projects"]}
        result["agent"] = {
            "holder": local["holder"],
            "leases": [lease for lease in local["leases"] if target is None or lease["project"] in ids],
            "notices": [n for n in local["notices"] if target is None or n["project"] in ids],
        }
    return result


def break_lease(project: PathLike, *, settings: Settings | None = None) -> dict[str, Any]:
    """Free a project whatever holds it; returns what may be stranded on the former holder."""
    settings = _settings(settings)
    target = projects.open_project(project)
    with Client(settings.broker, timeout=settings.request_timeout) as broker:
        reply = broker.call_ok(Op.BREAK, project=target.id, force=True)
    return {"project": target.id, "path": str(target.path), "broken": reply["broken"]}
