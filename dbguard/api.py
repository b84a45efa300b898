"""The Python API behind `import dbguard`: the same operations as the commands.

Each function takes the project directory (default: the current one) and optional settings,
and raises a `GuardError` subclass on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

from dbguard.agent import local as local_agent
from dbguard.agent.lease_check import WriterGuard
from dbguard.agent.server import read_saved_leases
from dbguard.cache import CacheStore, UnsafeCacheLocation, check_not_network
from dbguard.data import flushing
from dbguard.data import project as projects
from dbguard.data.imagedb import ImageDB, writers_lock_path
from dbguard.data.imagedb import open as open_imagedb
from dbguard.data.store import ProjectStore
from dbguard.data.view import StoreView
from dbguard.errors import (
    BrokerUnavailable,
    Fenced,
    GuardError,
    IntegrityError,
    LeaseHeld,
    LeaseLost,
    ProjectBusy,
    UnflushedData,
    UnsafeCachePath,
    UsageError,
    cache_errors_translated,
)
from dbguard.lease import requests
from dbguard.lease.client import Client
from dbguard.lease.keys import is_loopback
from dbguard.lease.protocol import AgentOp
from dbguard.lease.rules import Holder, LeaseState
from dbguard.lease.service import for_broker
from dbguard.results import Lease, ProjectStatus, QueuePlace, Status, describe_writer
from dbguard.stage import deploy as stage_deploy
from dbguard.stage import records
from dbguard.stage import sync as stage_sync

if TYPE_CHECKING:
    from dbguard.data.remote import RemoteDB
    from dbguard.files.run import RunResult
from dbguard.settings import Settings, load
from dbguard.units import human_size

# How often a queued acquire asks again; well inside a TTL, so the queue slot stays alive.
_POLL = 0.2

PathLike = str | Path | None


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load()


@cache_errors_translated
def init(project: PathLike = None) -> projects.Project:
    """Make a directory a dbguard project (idempotent)."""
    if project is not None and not isinstance(project, (str, os.PathLike)):
        raise UsageError(f"a project is a directory path, not {type(project).__name__} {project!r}")
    return projects.init(Path(project) if project is not None else Path.cwd())


@cache_errors_translated
def acquire(
    project: PathLike = None,
    *,
    wait: float | None = None,
    takeover: bool = False,
    settings: Settings | None = None,
    on_queued: Callable[[QueuePlace], None] | None = None,
    work: dict[str, Any] | None = None,
) -> Lease:
    """Become the writer of a project, through this host's agent.

    ``work`` says what the writer runs ({"command", "pid", "job"}); `status` shows it on every
    host. Acquiring again with it, while holding the lease, updates it.

    Without ``wait`` or ``takeover``, raise LeaseHeld at once if another host holds it. With
    ``wait``, queue for up to that many seconds (first come, first served). With ``takeover``,
    ask the holder to flush and release, and wait for it (``wait`` seconds, by default two TTLs
    and the lock-delay).
    """
    settings = _settings(settings)
    if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0):
        raise UsageError(f"wait must be a number of seconds, zero or more, not {wait!r}")
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
                    AgentOp.ACQUIRE,
                    project=target.id,
                    path=str(target.path),
                    wait=queued,
                    takeover=takeover,
                    work=work,
                )
            except LeaseHeld as exc:
                raise _held(target, exc.holder, waited=None) from None
            if reply["status"] == "granted":
                # project.json was lost: say which id was written back
                return Lease.from_agent(reply, recovered_identity=target.recovered or None)
            if time.monotonic() >= deadline:
                _leave_queue(settings, agent, target)
                raise _held(target, reply.get("holder") or {}, waited=wait)
            if on_queued is not None:
                on_queued(QueuePlace(int(reply["position"]), reply.get("holder")))
            time.sleep(_POLL)
    finally:
        agent.close()


def _leave_queue(settings: Settings, agent: Client, target: projects.Project) -> None:
    holder = agent.call_ok(AgentOp.HELLO)
    # If this fails the slot still expires by itself within a TTL.
    with for_broker(settings) as broker, contextlib.suppress(GuardError):
        broker.send_ok(requests.LeaveQueue(target.id, Holder.from_json(holder)))


_WAIT = ("acquire(wait=SECONDS)", "`dbguard acquire --wait SECONDS`")
_TAKEOVER = ("acquire(takeover=True)", "`dbguard acquire --takeover`")


def _held(target: projects.Project, holder: dict[str, Any], waited: float | None) -> LeaseHeld:
    if not holder:
        return LeaseHeld(
            f"project {target.path} is not available yet (the broker restarted recently, or another "
            f"host is first in the queue); retry, or queue with {_WAIT[0]}",
            holder={},
        ).with_remedy(*_WAIT)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    who = describe_writer(holder.get("user"), holder.get("host"), holder.get("command"), holder.get("job"))
    unflushed = holder.get("unflushed", 0)
    waited_text = f" (waited {waited:.0f}s)" if waited else ""
    message = (
        f"project {target.path} is held by {who} since {since} (token {holder.get('token')}){waited_text}. "
        f"Ask them to release or clear it there (`dbguard release`, `dbguard clear`), queue with "
        f"{_WAIT[0]}, or ask for it with {_TAKEOVER[0]}"
        + (f"; {human_size(unflushed)} are unflushed there" if unflushed else "")
    )
    return LeaseHeld(message, holder=holder).with_remedy(*_WAIT).with_remedy(*_TAKEOVER)


@cache_errors_translated
def release(project: PathLike = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """Give up this host's writer lease on a project."""
    settings = _settings(settings)
    target = projects.open_project(project)
    agent = local_agent.connect(settings)
    with agent:
        return agent.call_ok(AgentOp.RELEASE, project=target.id)


@cache_errors_translated
def run(
    project: PathLike,
    command: list[str],
    *,
    wait: float | None = None,
    takeover: bool = False,
    keep: bool = False,
    settings: Settings | None = None,
    on_queued: Callable[[QueuePlace], None] | None = None,
) -> RunResult:
    """Hold the project's writer lease while ``command`` runs, then flush and release (unless
    ``keep``); see `dbguard.files.run`. CommandStopped if the lease was lost meanwhile."""
    from dbguard.files.run import run_command

    return run_command(
        project,
        command,
        settings=_settings(settings),
        acquire=acquire,
        release=release,
        wait=wait,
        takeover=takeover,
        keep=keep,
        on_queued=on_queued,
    )


@cache_errors_translated
def import_files(
    project: PathLike,
    name: str,
    files: list[str | Path] | tuple[str | Path, ...],
    *,
    dataset: str | None = None,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
    remote: bool | None = None,
) -> dict[str, Any]:
    """Append the images of MRC, TIFF, HDF5 (EMAN2's layout too) and .npy/.npz files to image
    database ``name``; needs this host's writer lease, or ``remote`` (through the host that
    serves the project). ``progress(done, total)`` counts images."""
    from dbguard.files import transfer

    return transfer.import_files(
        project, name, files, dataset=dataset, settings=settings, progress=progress, remote=remote
    )


@cache_errors_translated
def export_database(
    project: PathLike,
    name: str,
    target: str | Path,
    *,
    dataset: str | None = None,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
    remote: bool | None = None,
) -> dict[str, Any]:
    """Write image database ``name`` to ``target``, the format chosen by its suffix; browses only
    (``remote``: reads through the host that serves the project, unflushed records too)."""
    from dbguard.files import transfer

    return transfer.export_database(
        project, name, target, dataset=dataset, settings=settings, progress=progress, remote=remote
    )


@cache_errors_translated
def status(project: PathLike = None, *, settings: Settings | None = None) -> Status:
    """What the lease service and this host's agent know of a project (or of every project)."""
    settings = _settings(settings)
    target = projects.open_project(project) if project is not None or projects.find_root(Path.cwd()) else None
    with for_broker(settings) as broker:
        reply = broker.send_ok(requests.Status(target.id if target is not None else None))
        # Whether anyone on the network may take or break leases at this broker: one without
        # keys that listens beyond loopback. etcd secures itself (TLS, RBAC) and says nothing here.
        hello = broker.send_ok(requests.Hello()) if settings.broker.startswith("tcp://") else {}
    path = target.path if target is not None else None
    found = tuple(ProjectStatus.from_wire(item, path) for item in reply["projects"])
    if target is not None:  # the share says whether, and where, the project is deployed
        deployment = records.read_deployment(target.path)
        found = tuple(dataclasses.replace(item, deployment=deployment) for item in found)
    agent_view = None
    agent = local_agent.revive(settings)
    if agent is not None:
        with agent:
            local = agent.call_ok(AgentOp.LEASES)
        ids = {item.project for item in found}
        agent_view = {
            "holder": local["holder"],
            "leases": [lease for lease in local["leases"] if target is None or lease["project"] in ids],
            "notices": [n for n in local["notices"] if target is None or n["project"] in ids],
        }
    authenticated = exposed = None
    if "authenticated" in hello:
        authenticated = bool(hello["authenticated"])
        exposed = bool(hello.get("exposed")) or not is_loopback(settings.broker)
    return Status(settings.broker, found, agent_view, authenticated=authenticated, exposed=exposed)


@cache_errors_translated
def log(
    project: PathLike = None,
    *,
    since: float = 0.0,
    limit: int = 1000,
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """What happened to a project (to every project the lease service knows, when there is no
    project here or given): its history events since ``since`` (wall-clock seconds), oldest
    first, at most ``limit`` of them, the newest (dbguard.lease.history)."""
    settings = _settings(settings)
    target = projects.open_project(project) if project is not None or projects.find_root(Path.cwd()) else None
    with for_broker(settings) as broker:
        reply = broker.send_ok(
            requests.History(target.id if target is not None else None, since=float(since), limit=int(limit))
        )
    return list(reply["events"])


@cache_errors_translated
def break_lease(project: PathLike, *, settings: Settings | None = None) -> dict[str, Any]:
    """Free a project whatever holds it; returns what may be stranded on the former holder."""
    settings = _settings(settings)
    target = projects.open_project(project)
    operator = f"{settings.user}@{settings.host}"
    with for_broker(settings) as broker:
        reply = broker.send_ok(requests.Break(target.id, force=True, operator=operator))
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


def _mark_clean(settings: Settings, target: projects.Project) -> None:
    """After a flush that emptied the cache, have the agent mark the lease clean at once: a host
    that dies right after `flush` returned then frees its project instead of orphaning it. Best
    effort: if it fails, the lease stays dirty (the safe side) until the agent's next look."""
    agent = local_agent.running(settings)
    if agent is None:
        return
    with agent, contextlib.suppress(GuardError):
        agent.call_ok(AgentOp.SETTLE, project=target.id)


def _report(settings: Settings, target: projects.Project, token: int, event: str, **fields: Any) -> None:
    """Have the agent add an event to the project's history at the lease service. Best effort:
    the history is for people, and a flush that worked must not fail for want of it."""
    agent = local_agent.running(settings)
    if agent is None:
        return
    with agent, contextlib.suppress(GuardError):
        agent.call_ok(AgentOp.REPORT, project=target.id, token=token, event=event, **fields)


@cache_errors_translated
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
            raise UnflushedData(
                f"{human_size(dirty)} of {target.path} are unflushed on this host, but it does not hold the "
                "project's writer lease (or its agent is not running), so they cannot be flushed; call "
                "acquire() first, then flush(). Nothing was lost: they stay in this host's cache",
                project=target.id,
                unflushed=dirty,
            ).with_remedy(
                "call acquire() first, then flush()", "run `dbguard acquire` first, then `dbguard flush`"
            )
        # Nothing is dirty because the agent (or a fenced flush) has just set this lease's unflushed
        # data aside: reporting "nothing to flush" would tell the writer its records are durable.
        kept = _kept_aside(cache_root, target, lease)
        if kept:
            reason = str((lease or {}).get("reason") or "lost")
            lost = LeaseLost(
                f"this host lost the writer lease of {target.path} ({reason}); {kept} bytes written under "
                "it were not flushed but kept aside in this host's cache. recover() lists them; "
                "acquire() to write again",
                project=target.id,
                reason=reason,
            )
            raise lost.with_remedy(
                "recover() lists them; acquire() to write again",
                "`dbguard recover` lists them; `dbguard acquire` to write again",
            )
        return {"project": target.id, "records": 0, "bytes": 0, "generation": None}
    writer = {"host": settings.host, "user": settings.user}
    token = int(lease["token"])
    started = time.monotonic()
    try:
        result = flushing.flush_project(cache_root, target, token, writer=writer, progress=progress)
    except Fenced as exc:
        _report(settings, target, token, "fence-refused", detail=str(exc)[:500])
        raise
    _mark_clean(settings, target)
    if result.records:
        _report(
            settings,
            target,
            token,
            "flushed",
            records=result.records,
            bytes=result.bytes,
            seconds=time.monotonic() - started,
            detail=f"generation {result.generation}",
        )
    return {
        "project": target.id,
        "records": result.records,
        "bytes": result.bytes,
        "generation": result.generation,
    }


def _kept_aside(cache_root: Path, target: projects.Project, lease: dict[str, Any] | None) -> int:
    """Bytes of the project set aside under the lease this host last held, if it lost it."""
    if lease is None:  # no agent answering: its saved table still says which lease it held
        saved = read_saved_leases(cache_root)
        lease = next((item for item in saved if item["project"] == target.id), None)
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


@cache_errors_translated
def clear(
    project: PathLike = None,
    *,
    force: bool = False,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The `e2bdb.py -c` equivalent: flush, check the share's copy, drop the local cache, release.

    Refuses while a process of this host has the project open for writing, unless ``force``.
    Before the cache is dropped, every record in it is read back from the share past this
    host's page cache and matched with the cache's copy. Records whose copy on the share is
    damaged are flushed again (a new generation) and read back again; if that fails too, the
    cache is kept and IntegrityError names them. An agent that died is restarted first, so the
    lease it held is flushed under and released; the result is success only once the lease
    service no longer names this host as the writer. Safe to run twice: what is already done
    is skipped, and the result says what was done.
    """
    settings = _settings(settings)
    target = projects.open_project(project)
    cache_root = local_agent.cache_dir(settings)
    # The agent's server of the project (`dbguard serve`) is a writer of this host too, but not
    # one that keeps clear from going: leaving this host ends serving it, workers are told the
    # lease ended, and what they wrote so far is in the cache and is flushed below.
    writers = [w for w in local_writers(settings, target) if _SERVER not in (w["cmdline"] or [])]
    if writers and not force:
        names = ", ".join(f"{w['name']} (pid {w['pid']})" for w in writers)
        busy = ProjectBusy(
            f"{target.path} is open for writing by {names} on this host; close them first, or call "
            "clear(force=True) to flush what they wrote so far and clear anyway"
        )
        raise busy.with_remedy("or call clear(force=True)", "or run `dbguard clear --force`")
    _stop_serving(settings, target)
    done: dict[str, Any] = {"project": target.id, "path": str(target.path), "writers": writers}
    done["agent_restarted"] = _restart_agent(settings, target)
    done["flushed"] = flush(target.path, settings=settings, progress=progress)
    check, done["reflushed"] = _check_share(settings, cache_root, target, progress)
    done["verified"] = check.checked
    done["read_back"] = {
        "records": check.checked,
        "superseded": check.superseded,
        "segments": check.segments,
        "bytes": check.bytes,
        "method": check.method or None,
    }
    done["dropped_bytes"] = flushing.drop_cache(cache_root, target.id)
    done["released"], restarted = _release_for_clear(settings, target)
    done["agent_restarted"] = done["agent_restarted"] or restarted
    done["lease"] = _lease_left(settings, target)
    return done


_SERVER = "dbguard.agent.serve"  # a server process's module, in its command line


def _stop_serving(settings: Settings, target: projects.Project) -> None:
    agent = local_agent.running(settings)
    if agent is not None:
        with agent, contextlib.suppress(GuardError):
            agent.call_ok(AgentOp.UNSERVE, project=target.id)


def _restart_agent(settings: Settings, target: projects.Project) -> bool:
    """Make sure this host's agent runs and holds what it held before it died (a crash, kill -9,
    a reboot): otherwise the lease stays held, or orphaned, at the lease service while nothing
    here renews or releases it. True if an agent had to be started."""
    running = local_agent.running(settings)
    if running is not None:
        running.close()
    else:
        revived = local_agent.revive(settings)  # it reclaims the leases in its saved table
        if revived is not None:
            revived.close()
            return True
    # An agent that died between a grant and saving its table left no trace of that lease
    # here, but the lease service has it: asked again, it resumes the lease (same holder).
    try:
        state = _lease_state(settings, target)
    except BrokerUnavailable:
        return False  # `_lease_left` says what that leaves undone
    if not _names_this_host(settings, state) or _held_lease(settings, target) is not None:
        return False
    with local_agent.connect(settings) as agent, contextlib.suppress(LeaseHeld):
        agent.call_ok(AgentOp.ACQUIRE, project=target.id, path=str(target.path), wait=False, takeover=False)
    return running is None


def _lease_state(settings: Settings, target: projects.Project) -> dict[str, Any]:
    with for_broker(settings) as broker:
        state: dict[str, Any] = broker.send_ok(requests.Status(target.id))["projects"][0]
    return state


def _names_this_host(settings: Settings, state: dict[str, Any]) -> bool:
    writer = state.get("writer") or {}
    return (
        state.get("state") != LeaseState.FREE
        and writer.get("host") == settings.host
        and writer.get("user") == settings.user
    )


def _check_share(
    settings: Settings,
    cache_root: Path,
    target: projects.Project,
    progress: Callable[[int, int], None] | None,
) -> tuple[flushing.ReadBack, dict[str, Any] | None]:
    """Read the cache's records back from the share; flush the damaged ones again and read those
    back too. Returns what was read and what was flushed again; IntegrityError if the share
    still does not hold every record of the cache (the cache is kept then)."""
    check = flushing.verify_cache_in_store(cache_root, target)
    if check.unmendable:
        raise IntegrityError(
            f"the project store of {target.path} is damaged where a new flush cannot mend it: "
            f"{'; '.join(check.unmendable)}. This host's cache was kept (nothing dropped or released). "
            "Restore that file from a backup, then call clear() again",
            path=str(ProjectStore(target.path, target.id).root),
        ).with_remedy("then call clear() again", "then run `dbguard clear` again")
    if not check.damaged:
        return check, None
    damaged = dict(check.damaged)
    lease = _held_lease(settings, target)
    if lease is None or lease["state"] != "held":
        # Marked unflushed, the good copies cannot be dropped by mistake, and they are flushed
        # by the next writer's flush here (or kept aside if another host writes meanwhile).
        flushing.mark_unflushed(cache_root, target, damaged)
        remedy = f"call acquire({str(target.path)!r}), then clear({str(target.path)!r})"
        raise IntegrityError(
            f"{_records_text(damaged)} of {target.path} differ on the share from this host's cache "
            f"({_first(damaged)}). The cache was kept and those records are marked unflushed again; "
            f"this host does not hold the writer lease, so they cannot be written now: {remedy}",
            path=str(ProjectStore(target.path, target.id).root),
        ).with_remedy(remedy, f"run `dbguard acquire {target.path}`, then `dbguard clear {target.path}`")

    def announce(size: int) -> None:
        with local_agent.connect(settings) as agent:
            agent.call_ok(AgentOp.MARK_DIRTY, project=target.id, token=int(lease["token"]), unflushed=size)

    flushing.mark_unflushed(cache_root, target, damaged, announce)
    again_flushed = flush(target.path, settings=settings, progress=progress)
    again = flushing.verify_cache_in_store(cache_root, target, only=damaged)
    if again.unmendable or again.damaged:
        # Unflushed, they are neither dropped nor forgotten: the next flush writes them again.
        flushing.mark_unflushed(cache_root, target, again.damaged, announce)
        left = again.damaged or damaged
        raise IntegrityError(
            f"{_records_text(left)} of {target.path} still differ on the share from this host's cache "
            f"after they were flushed again as generation {again_flushed['generation']}: "
            f"{'; '.join([*again.unmendable, *again.damaged.values()])}. The cache was kept, those records "
            "stay unflushed in it and the lease stays with this host. Check the storage behind the share "
            f"(verify({str(target.path)!r})), then call clear() again",
            path=str(ProjectStore(target.path, target.id).root),
        ).with_remedy(
            f"(verify({str(target.path)!r})), then call clear() again",
            f"(`dbguard verify {target.path}`), then run `dbguard clear` again",
        )
    check.checked += again.checked
    check.segments += again.segments
    check.bytes += again.bytes
    reflushed = {
        "records": len(damaged),
        "generation": again_flushed["generation"],
        "bytes": again_flushed["bytes"],
        "damaged": list(damaged.values()),
    }
    return check, reflushed


def _records_text(records: dict[tuple[str, int], str]) -> str:
    return "1 record" if len(records) == 1 else f"{len(records)} records"


def _first(records: dict[tuple[str, int], str]) -> str:
    first = next(iter(records.values()))
    return first if len(records) == 1 else f"{first}; and {len(records) - 1} more"


def _release_for_clear(settings: Settings, target: projects.Project) -> tuple[dict[str, Any] | None, bool]:
    """Release this host's lease through its agent, started again if it died during the flush;
    also whether it had to be started."""
    failure: BrokerUnavailable | None = None
    restarted = False
    for _ in range(2):
        running = local_agent.running(settings)
        agent = running or local_agent.revive(settings)
        if agent is None:
            return None, restarted
        agent.close()
        restarted = restarted or running is None
        if _held_lease(settings, target) is None:
            return None, restarted
        try:
            return release(target.path, settings=settings), restarted
        except BrokerUnavailable as exc:  # the agent died in between, or the lease service is away
            failure = exc
    unreleased = BrokerUnavailable(
        f"the cache of {target.path} was flushed, checked against the share and dropped, but its lease "
        f"could not be released ({failure}). Call release({str(target.path)!r}) when the lease service "
        "answers",
        address=settings.broker,
    )
    raise unreleased.with_remedy(
        f"Call release({str(target.path)!r})", f"Run `dbguard release {target.path}`"
    )


def _lease_left(settings: Settings, target: projects.Project) -> dict[str, Any]:
    """The lease service's view of the project after a clear; LeaseHeld if it still names this
    host as the writer, BrokerUnavailable if it cannot say."""
    try:
        state = _lease_state(settings, target)
    except BrokerUnavailable as exc:
        raise BrokerUnavailable(
            f"the cache of {target.path} was flushed, checked against the share and dropped, but the lease "
            f"service did not answer ({exc}), so whether it still names this host as the writer is unknown. "
            f"Call status({str(target.path)!r}) when it answers, and clear({str(target.path)!r}) again "
            f"if it names {settings.user} on {settings.host}",
            address=settings.broker,
        ).with_remedy(
            f"Call status({str(target.path)!r}) when it answers, and clear({str(target.path)!r}) again",
            f"Run `dbguard status {target.path}` when it answers, and `dbguard clear {target.path}` again",
        ) from exc
    writer = state.get("writer") or None
    if _names_this_host(settings, state):
        assert writer is not None
        held = LeaseHeld(
            f"the cache of {target.path} was flushed, checked against the share and dropped, but the "
            f"lease service still names {writer.get('user')} on {writer.get('host')} (this host) as its "
            f"writer ({state.get('state')}, token {writer.get('token')}), and this host's agent for the "
            f"cache {local_agent.cache_dir(settings)} does not hold that lease: another cache directory of "
            "this host does. Release it there (with its DBGUARD_CACHE), or, once sure nothing unflushed "
            f"is left on this host, break the lease with break_lease({str(target.path)!r})",
            holder=dict(writer),
        )
        raise held.with_remedy("Release it there", "Run `dbguard release` there").with_remedy(
            f"break the lease with break_lease({str(target.path)!r})",
            f"`dbguard break --force {target.path}`",
        )
    return {"state": state.get("state"), "writer": writer}


@cache_errors_translated
def open(  # the documented name, `dbguard.open`, shadows the builtin in this module only
    project: PathLike,
    name: str,
    mode: str = "r",
    *,
    remote: bool | None = None,
    settings: Settings | None = None,
) -> ImageDB | RemoteDB:
    """Open image database ``name`` of ``project``: "r" browses, "a"/"w" write (need the lease).
    ``remote=True`` (or ``DBGUARD_REMOTE=1``) reads and writes through the host that holds the
    project and serves it (`dbguard serve`), unless this host holds it."""
    return open_imagedb(project, name, mode, remote=remote, settings=settings)


@cache_errors_translated
def deploy(
    project: PathLike,
    to: str | Path,
    *,
    wait: float | None = None,
    takeover: bool = False,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Acquire the writer lease and copy the project's folder to ``to`` on a local disk of this
    host, to work there; `sync` copies changes back, `undeploy` ends it. Called again after an
    interruption, it carries on. ``progress(done, total)`` counts bytes."""
    settings = _settings(settings)
    directory = Path(to).absolute()
    stage_deploy.check_local(directory)  # before the lease is taken: nothing to undo
    lease = acquire(project, wait=wait, takeover=takeover, settings=settings)
    target = projects.open_project(lease.path)
    cache_root = local_agent.cache_dir(settings)
    with flushing.flush_lock(cache_root, target.id):
        result = stage_deploy.deploy(
            cache_root,
            target,
            directory,
            lease.token,
            host=settings.host,
            user=settings.user,
            progress=progress,
        )
    with local_agent.connect(settings) as agent:
        agent.call_ok(AgentOp.DEPLOYED, project=target.id, token=lease.token)
    return {**result, "token": lease.token}


def _deployment(settings: Settings, target: projects.Project) -> tuple[Path, records.LocalState]:
    cache_root = local_agent.cache_dir(settings)
    state = records.read_local(cache_root, target.id)
    if state is None:
        raise UsageError(
            f"{target.path} is not deployed on this host; deploy_project({str(target.path)!r}, to=DIR) first"
        ).with_remedy(
            f"deploy_project({str(target.path)!r}, to=DIR)", f"`dbguard deploy {target.path} --to DIR`"
        )
    return cache_root, state


def _fenced(cache_root: Path, state: records.LocalState, exc: GuardError) -> LeaseLost:
    state.state = "fenced"
    records.write_local(cache_root, state)
    return LeaseLost(
        f"this host no longer holds the lease of {state.path}, so nothing more of {state.dir} may reach "
        f"the share ({exc}). What it had not synced stays there: see `dbguard recover`",
        project=state.path,
        reason="fenced",
    )


@cache_errors_translated
def sync(
    project: PathLike = None,
    *,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Copy what changed in this host's deployment of ``project`` back to the share, fenced."""
    settings = _settings(settings)
    target = projects.open_project(project)
    cache_root, state = _deployment(settings, target)
    guard = WriterGuard(cache_root, target)
    with flushing.flush_lock(cache_root, target.id):
        state = records.read_local(cache_root, target.id) or state  # the agent may have synced
        if state.state == "fenced":
            raise _fenced(cache_root, state, LeaseLost("the lease was lost earlier"))
        if state.state != "deployed":
            raise UsageError(f"the deploy of {target.path} to {state.dir} did not finish: run deploy again")
        try:
            result = stage_sync.sync(cache_root, state, guard.check, progress=progress)
        except (Fenced, LeaseLost, LeaseHeld) as exc:
            raise _fenced(cache_root, state, exc) from exc
    return {"project": target.id, "path": str(target.path), "dir": state.dir, **result.to_json()}


@cache_errors_translated
def undeploy(
    project: PathLike = None,
    *,
    force: bool = False,
    discard: bool = False,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The last sync, a check of every synced file on the share against the checksums taken
    from the deployment, the deployment removed, the lease released. Refuses while processes of
    this host use the deployment, unless ``force``. ``discard`` removes a deployment that can no
    longer sync (its lease lost, its folder gone), with whatever it holds."""
    settings = _settings(settings)
    target = projects.open_project(project)
    cache_root, state = _deployment(settings, target)
    guard = WriterGuard(cache_root, target)
    with flushing.flush_lock(cache_root, target.id):
        try:
            result = stage_deploy.undeploy(
                cache_root, target, guard.check, force=force, discard=discard, progress=progress
            )
        except (Fenced, LeaseLost, LeaseHeld) as exc:
            raise _fenced(cache_root, records.read_local(cache_root, target.id) or state, exc) from exc
    agent = local_agent.running(settings)
    if agent is not None:
        with agent:
            agent.call_ok(AgentOp.UNDEPLOYED, project=target.id)
    result["released"] = False
    if state.state != "fenced":
        with contextlib.suppress(LeaseHeld, LeaseLost):  # discarded after the lease was lost
            result["released"] = release(target.path, settings=settings)["released"]
    return result


def _through_holder(settings: Settings, target: projects.Project, remote: bool | None) -> bool:
    """Whether to read through the host that serves the project: asked for (``remote``, else
    the ``remote`` setting) and this host does not hold the lease itself."""
    if not (remote if remote is not None else settings.remote):
        return False
    try:
        WriterGuard(local_agent.cache_dir(settings), target).check()
    except (LeaseHeld, LeaseLost):
        return True
    return False


@cache_errors_translated
def serve(
    project: PathLike = None,
    *,
    address: str | None = None,
    stop: bool = False,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Serve a project this host holds to worker nodes (they open its databases with
    ``remote=True``), on ``address`` (tcp://HOST:PORT; default every interface and a free port);
    or ``stop`` serving it. Serving ends with the lease."""
    settings = _settings(settings)
    target = projects.open_project(project)
    with local_agent.connect(settings) as agent:
        if stop:
            reply = agent.call_ok(AgentOp.UNSERVE, project=target.id)
            return {"project": target.id, "path": str(target.path), "stopped": bool(reply["stopped"])}
        address = address or "tcp://*:0"
        if not address.startswith("tcp://") or not address[len("tcp://") :].rpartition(":")[0]:
            raise UsageError(
                f"serve address {address!r} must look like tcp://HOST:PORT (port 0: any free one)"
            )
        try:
            reply = agent.call_ok(AgentOp.SERVE, project=target.id, address=address)
        except LeaseLost as exc:
            python = f"call acquire({str(target.path)!r}) first"
            not_held = LeaseLost(
                f"this host does not hold the writer lease of {target.path}, so it cannot serve it: "
                f"{python} ({exc.reason or 'not held'})",
                project=str(target.path),
                reason=exc.reason,
            )
            raise not_held.with_remedy(python, f"run `dbguard acquire {target.path} --serve`") from None
    return {"project": target.id, "path": str(target.path), **reply}


@cache_errors_translated
def browse(
    project: PathLike, *, remote: bool | None = None, settings: Settings | None = None
) -> dict[str, Any]:
    """What a project holds, read-only from any host: databases, counts, shapes, generation,
    writer, how much unflushed data the writer has, and when it last flushed. ``remote``: the
    databases and counts as the host that serves the project sees them now (unflushed records
    too; shapes are not listed)."""
    settings = _settings(settings)
    target = projects.open_project(project)
    if _through_holder(settings, target, remote):
        from dbguard.data import remote as served

        live = served.databases(target, settings)
        info = browse(target.path, remote=False, settings=settings)
        info["databases"] = [
            {"name": d["name"], "count": d["count"], "shapes": {}, "dtypes": []} for d in live
        ]
        info["live"] = True
        return info
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
            state = broker.send_ok(requests.Status(target.id))["projects"][0]
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


@cache_errors_translated
def ls(
    project: PathLike,
    db: str | None = None,
    *,
    remote: bool | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """The databases of a project, or the records of one database, from the newest generation
    (``remote``: as the host that serves the project sees them now, unflushed records too)."""
    settings = _settings(settings)
    target = projects.open_project(project)
    if _through_holder(settings, target, remote):
        from dbguard.data import remote as served

        if db is None:
            return {"project": target.id, "live": True, "databases": served.databases(target, settings)}
        with served.RemoteDB(target, db, "r", settings) as remote_db:
            return {"project": target.id, "live": True, "database": db, "records": remote_db.records()}
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


@cache_errors_translated
def verify(project: PathLike) -> dict[str, Any]:
    """Check every manifest and every record's checksum; ``problems`` lists what is damaged."""
    target = projects.open_project(project)
    store = ProjectStore(target.path, target.id)
    superseded: list[str] = []
    problems = list(store.verify(superseded))
    manifest = None
    with contextlib.suppress(GuardError):
        manifest = store.latest()
    return {
        "project": target.id,
        "path": str(target.path),
        "generation": manifest.generation if manifest else None,
        "records": sum(int(s.get("records", 0)) for s in manifest.segments.values()) if manifest else 0,
        "problems": problems,
        # damaged copies that later flushes replaced (as `clear` does): no reader reads them
        "superseded": superseded,
    }


@cache_errors_translated
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
    kept = []
    for state in records.all_local(cache_root):
        if state.state != "fenced":
            continue
        changed, deleted = stage_sync.pending(state) if Path(state.dir).is_dir() else ([], [])
        kept.append(
            {
                "project": state.project,
                "path": state.path,
                "dir": state.dir,
                "token": state.token,
                "unsynced": changed,
                "deleted_unsynced": deleted,
            }
        )
    return {"cache": str(cache_root), "aside": found, "deployments": kept}


@cache_errors_translated
def cached_projects(settings: Settings | None = None) -> list[Path]:
    """The project directories this host has a cache or a lease for (for `clear --all`)."""
    settings = _settings(settings)
    cache_root = local_agent.cache_dir(settings)
    paths: dict[str, Path] = {}
    for lease in read_saved_leases(cache_root):
        paths[lease["project"]] = Path(lease["path"])
    return list(paths.values())


@cache_errors_translated
def check_cache(path: Path) -> dict[str, str]:
    """Where the cache at ``path`` would live; raise UnsafeCachePath if it may not."""
    try:
        mount = check_not_network(path)
    except UnsafeCacheLocation as exc:
        raise UnsafeCachePath(str(exc), path=exc.path, fstype=exc.fstype) from exc
    return {"path": str(path), "fstype": mount.fstype, "source": mount.source, "mountpoint": mount.mountpoint}
