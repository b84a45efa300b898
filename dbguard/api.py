"""The Python API behind `import dbguard`: the same operations as the commands.

Each function takes the project directory (default: the current one) and optional settings,
and raises a `GuardError` subclass on failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

from cache import CacheStore, UnsafeCacheLocation, check_not_network
from dbguard import flushing, local_agent
from dbguard import project as projects
from dbguard.agent import LEASES_NAME
from dbguard.client import Client
from dbguard.errors import GuardError, LeaseHeld, LeaseLost, ProjectBusy, UnsafeCachePath, UsageError
from dbguard.imagedb import ImageDB, writers_lock_path
from dbguard.imagedb import open as open_imagedb
from dbguard.lease_service import for_broker
from dbguard.project_store import ProjectStore
from dbguard.protocol import AgentOp, Op
from dbguard.settings import Settings, load
from dbguard.store_view import StoreView
from dbguard.units import human_size

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
    with for_broker(settings) as broker, contextlib.suppress(GuardError):
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
        + (f"; {human_size(unflushed)} are unflushed there" if unflushed else "")
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
    with for_broker(settings) as broker:
        if target is not None:
            reply = broker.call_ok(Op.STATUS, project=target.id)
        else:
            reply = broker.call_ok(Op.STATUS)
    result: dict[str, Any] = {"broker": settings.broker, "projects": reply["projects"], "agent": None}
    if target is not None:
        result["projects"][0]["path"] = str(target.path)
    agent = local_agent.revive(settings)
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
    with for_broker(settings) as broker:
        reply = broker.call_ok(Op.BREAK, project=target.id, force=True)
    return {"project": target.id, "path": str(target.path), "broken": reply["broken"]}


def _held_lease(settings: Settings, target: projects.Project) -> dict[str, Any] | None:
    """This host's lease on the project as its agent sees it, if the agent runs and holds one."""
    agent = local_agent.running(settings)
    if agent is None:
        return None
    with agent:
        leases = agent.call_ok(AgentOp.LEASES)["leases"]
    for lease in leases:
        if lease["project"] == target.id:
            return dict(lease)
    return None


def flush(
    project: PathLike = None,
    *,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write this host's unflushed records of a project to the project store now."""
    settings = _settings(settings)
    target = projects.open_project(project)
    cache_root = local_agent.cache_dir(settings)
    dirty = CacheStore.dirty_bytes_of(cache_root, target.id)
    lease = _held_lease(settings, target)
    if lease is None or lease["state"] != "held":
        if dirty:
            raise LeaseLost(
                f"{dirty} bytes of {target.path} are unflushed here but this host does not hold its writer "
                "lease, so they cannot be flushed; `dbguard acquire` it first (they are kept either way)",
                project=target.id,
            )
        # Nothing is dirty because the agent (or a fenced flush) has just set this lease's unflushed
        # data aside: reporting "nothing to flush" would tell the writer its records are durable.
        kept = _kept_aside(cache_root, target, lease)
        if kept:
            reason = str((lease or {}).get("reason") or "lost")
            raise LeaseLost(
                f"this host lost the writer lease of {target.path} ({reason}); {kept} bytes written under "
                "it were not flushed but kept aside in this host's cache. `dbguard recover` lists them; "
                "`dbguard acquire` to write again",
                project=target.id,
                reason=reason,
            )
        return {"project": target.id, "records": 0, "bytes": 0, "generation": None}
    writer = {"host": settings.host, "user": settings.user}
    result = flushing.flush_project(cache_root, target, int(lease["token"]), writer=writer, progress=progress)
    return {
        "project": target.id,
        "records": result.records,
        "bytes": result.bytes,
        "generation": result.generation,
    }


def _kept_aside(cache_root: Path, target: projects.Project, lease: dict[str, Any] | None) -> int:
    """Bytes of the project set aside under the lease this host last held, if it lost it."""
    if lease is None:  # no agent answering: its saved table still says which lease it held
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads((cache_root / LEASES_NAME).read_text())
            lease = next((item for item in saved if item.get("project") == target.id), None)
    if lease is None or lease.get("state") != "lost":
        return 0
    token = int(lease["token"])
    return sum(
        a.dirty_bytes for a in flushing.list_aside(cache_root) if a.project == target.id and a.token == token
    )


def local_writers(settings: Settings, target: projects.Project) -> list[dict[str, Any]]:
    """Processes of this host that have the project open for writing."""
    path = writers_lock_path(local_agent.cache_dir(settings), target.id)
    if not path.exists():
        return []
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return []  # nobody holds it shared
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    found = []
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if any(f.path == str(path) for f in process.open_files()):
                found.append(
                    {"pid": process.pid, "name": process.info["name"], "cmdline": process.info["cmdline"]}
                )
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found or [{"pid": None, "name": "unknown", "cmdline": []}]


def clear(
    project: PathLike = None,
    *,
    force: bool = False,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The `e2bdb.py -c` equivalent: flush, verify, drop the local cache, release.

    Refuses while a process of this host has the project open for writing, unless ``force``.
    Safe to run twice: what is already done is skipped, and the result says what was done.
    """
    settings = _settings(settings)
    target = projects.open_project(project)
    cache_root = local_agent.cache_dir(settings)
    writers = local_writers(settings, target)
    if writers and not force:
        names = ", ".join(f"{w['name']} (pid {w['pid']})" for w in writers)
        raise ProjectBusy(
            f"{target.path} is open for writing by {names} on this host; close them first, or run "
            "`dbguard clear --force` to flush what they wrote so far and clear anyway"
        )
    done: dict[str, Any] = {"project": target.id, "path": str(target.path), "writers": writers}
    done["flushed"] = flush(target.path, settings=settings, progress=progress)
    done["verified"] = flushing.verify_cache_in_store(cache_root, target)
    done["dropped_bytes"] = flushing.drop_cache(cache_root, target.id)
    lease = _held_lease(settings, target)
    done["released"] = None
    if lease is not None:
        done["released"] = release(target.path, settings=settings)
    return done


def open(  # the documented name, `dbguard.open`, shadows the builtin in this module only
    project: PathLike, name: str, mode: str = "r", *, settings: Settings | None = None
) -> ImageDB:
    """Open image database ``name`` of ``project``: "r" browses, "a"/"w" write (need the lease)."""
    return open_imagedb(project, name, mode, settings=settings)


def browse(project: PathLike, *, settings: Settings | None = None) -> dict[str, Any]:
    """What a project holds, read-only from any host: databases, counts, shapes, generation,
    writer, how much unflushed data the writer has, and when it last flushed."""
    settings = _settings(settings)
    target = projects.open_project(project)
    store = ProjectStore(target.path, target.id)
    view = StoreView(store, local_agent.cache_dir(settings))
    try:
        manifest = view.manifest
        databases = []
        for name in view.databases():
            shapes: dict[str, int] = {}
            dtypes: set[str] = set()
            for (db, _), entry in view.entries().items():
                if db == name:
                    key = "x".join(str(n) for n in entry.shape) or "scalar"
                    shapes[key] = shapes.get(key, 0) + 1
                    dtypes.add(np.dtype(entry.dtype).name)
            databases.append(
                {"name": name, "count": view.count(name), "shapes": shapes, "dtypes": sorted(dtypes)}
            )
    finally:
        view.close()
    writer: dict[str, Any] | None = None
    lease_state = None
    try:
        with for_broker(settings) as broker:
            state = broker.call_ok(Op.STATUS, project=target.id)["projects"][0]
        lease_state, writer = state["state"], state["writer"]
    except GuardError:
        record = projects.read_writer_record(target).get("writer")
        writer = dict(record) if record else None
    return {
        "project": target.id,
        "path": str(target.path),
        "generation": manifest.generation,
        "token": manifest.token,
        "last_flush": manifest.last_flush.get("at"),
        "last_flush_by": {k: v for k, v in manifest.last_flush.items() if k != "at"} or None,
        "databases": databases,
        "lease_state": lease_state,
        "writer": writer,
    }


def ls(project: PathLike, db: str | None = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """The databases of a project, or the records of one database, from the newest generation."""
    settings = _settings(settings)
    target = projects.open_project(project)
    view = StoreView(ProjectStore(target.path, target.id), local_agent.cache_dir(settings))
    try:
        if db is None:
            items = [{"name": name, "count": view.count(name)} for name in view.databases()]
            return {"project": target.id, "generation": view.generation, "databases": items}
        if db not in view.databases():
            known = ", ".join(view.databases()) or "none yet"
            raise UsageError(f"{target.path} has no database {db!r} (it has: {known})")
        records = [
            {"index": index, "dtype": np.dtype(e.dtype).name, "shape": list(e.shape), "attrs": view.attrs(e)}
            for (name, index), e in sorted(view.entries().items())
            if name == db
        ]
        return {"project": target.id, "generation": view.generation, "database": db, "records": records}
    finally:
        view.close()


def verify(project: PathLike) -> dict[str, Any]:
    """Check every manifest and every record's checksum; ``problems`` lists what is damaged."""
    target = projects.open_project(project)
    store = ProjectStore(target.path, target.id)
    problems = list(store.verify())
    manifest = None
    with contextlib.suppress(GuardError):
        manifest = store.latest()
    return {
        "project": target.id,
        "path": str(target.path),
        "generation": manifest.generation if manifest else None,
        "records": sum(int(s.get("records", 0)) for s in manifest.segments.values()) if manifest else 0,
        "problems": problems,
    }


def recover(*, export: Path | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """List the data of lost leases kept aside in this host's cache; optionally export it as
    .npy files (one per record, with its attrs in a .json beside it)."""
    settings = _settings(settings)
    cache_root = local_agent.cache_dir(settings)
    revived = local_agent.revive(settings)  # a returning host's agent sets lost data aside first
    if revived is not None:
        revived.close()
    found = []
    for aside in flushing.list_aside(cache_root):
        item: dict[str, Any] = {
            "project": aside.project,
            "label": aside.label,
            "path": str(aside.path),
            "dirty_bytes": aside.dirty_bytes,
            "reason": aside.reason,
        }
        if export is not None:
            item["exported"] = flushing.export_aside(aside, export / aside.label)
        found.append(item)
    return {"cache": str(cache_root), "aside": found}


def cached_projects(settings: Settings | None = None) -> list[Path]:
    """The project directories this host has a cache or a lease for (for `clear --all`)."""
    settings = _settings(settings)
    cache_root = local_agent.cache_dir(settings)
    paths: dict[str, Path] = {}
    try:
        for lease in json.loads((cache_root / LEASES_NAME).read_text()):
            paths[lease["project"]] = Path(lease["path"])
    except (OSError, ValueError):
        pass
    return list(paths.values())


def check_cache(path: Path) -> dict[str, str]:
    """Where the cache at ``path`` would live; raise UnsafeCachePath if it may not."""
    try:
        mount = check_not_network(path)
    except UnsafeCacheLocation as exc:
        raise UnsafeCachePath(str(exc), path=exc.path, fstype=exc.fstype) from exc
    return {"path": str(path), "fstype": mount.fstype, "source": mount.source, "mountpoint": mount.mountpoint}
