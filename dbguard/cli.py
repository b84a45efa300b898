"""The `dbguard` command: parse, call the library, turn a GuardError into a message and exit code."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from dbguard import api
from dbguard.agent import local as local_agent
from dbguard.cache import CacheError
from dbguard.errors import (
    AgentAlreadyRunning,
    ExitCode,
    GuardError,
    UsageError,
    from_cache_error,
)
from dbguard.lease import history, servers
from dbguard.lease.keys import authorize, broker_keys, exposure_warning, init_broker, init_client, is_loopback
from dbguard.lease.protocol import AgentOp
from dbguard.lease.rules import Timing
from dbguard.results import ProjectStatus, QueuePlace, Status
from dbguard.settings import Settings, load
from dbguard.units import human_size, parse_since

F = TypeVar("F", bound=Callable[..., Any])


def _common(func: F) -> F:
    """Options every command shares; they override environment and config files."""

    @click.option(
        "--broker",
        help="Broker address, tcp://host:port, or etcd://host:port[,host:port...] (env DBGUARD_BROKER).",
    )
    @click.option("--cache", type=click.Path(path_type=Path), help="Cache directory (env DBGUARD_CACHE).")
    @click.option("--ttl", type=float, help="Lease TTL in seconds (env DBGUARD_TTL).")
    @functools.wraps(func)
    def wrapper(broker: str | None, cache: Path | None, ttl: float | None, **kwargs: Any) -> Any:
        settings = load({"broker": broker, "cache": cache, "ttl": ttl})
        return func(settings=settings, **kwargs)

    return wrapper  # type: ignore[return-value]  # click's decorators erase the signature


def _remote_option(func: F) -> F:
    """--remote: workers read (and import) through the host that serves the project; without
    the flag the ``remote`` setting (DBGUARD_REMOTE) decides."""
    return click.option(
        "--remote",
        is_flag=True,
        default=None,
        help="Through the host that serves the project (its unflushed records too).",
    )(func)


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(func)


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


class _Group(click.Group):
    """Turns every GuardError into its message on stderr and its documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GuardError as exc:
            _fail(exc)
        except CacheError as exc:  # the API translates these; a command that calls the cache directly
            _fail(from_cache_error(exc))
        except KeyboardInterrupt:
            click.echo("dbguard: interrupted", err=True)
            sys.exit(130)


def _fail(exc: GuardError) -> None:
    click.echo(f"dbguard: {exc.for_command_line()}", err=True)
    sys.exit(int(exc.exit_code))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dbguard")
def main() -> None:
    """Keep one writer host per project on a shared filesystem.

    \b
    Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 held by another host,
    4 broker or agent unreachable, 5 unsafe cache location, 6 integrity error,
    7 the share or the cache disk refused (full, quota, read-only, permissions),
    8 unflushed data remains on this host (nothing lost).
    """


# ---------------------------------------------------------------- servers


@main.command()
@click.option("--address", help="Where to listen, tcp://host:port (default: the configured broker address).")
@click.option("--state", type=click.Path(path_type=Path), help="State directory (env DBGUARD_STATE).")
@click.option("--ttl", type=float, help="Lease TTL in seconds (env DBGUARD_TTL).")
@click.option("--lock-delay", type=float, help="Seconds a cleanly expired lease stays blocked.")
@click.option("--grace", type=float, help="Seconds after a restart with no new writers (at least one TTL).")
@click.option("--ready-file", type=click.Path(path_type=Path), hidden=True)
def broker(
    address: str | None,
    state: Path | None,
    ttl: float | None,
    lock_delay: float | None,
    grace: float | None,
    ready_file: Path | None,
) -> None:
    """Run the lease broker in the foreground."""
    from dbguard.lease import broker as broker_module

    settings = load({"broker": address, "state": state, "ttl": ttl, "lock_delay": lock_delay, "grace": grace})
    _log_to_stderr()
    timing = Timing(settings.ttl, settings.lock_delay, settings.effective_grace)
    keys = broker_keys(settings.keys) if settings.keys is not None else None
    address = servers.bind_address(settings.broker)
    if keys is None:
        _warn_if_exposed(address)
    broker_module.run(address, settings.state, timing, keys=keys, ready_file=ready_file)


def _warn_if_exposed(address: str) -> None:
    """A broker without keys is fine on loopback; elsewhere, anyone on the network may use it."""
    warning = exposure_warning(address)
    if warning:
        click.echo(f"dbguard: warning: {warning}", err=True)


@main.command()
@_common
def agent(settings: Settings) -> None:
    """Run this host's agent in the foreground (commands start one on demand)."""
    from dbguard.agent.server import Agent

    _log_to_stderr()
    directory = local_agent.cache_dir(settings)
    try:
        Agent(settings, directory).run()
    except AgentAlreadyRunning as exc:
        click.echo(f"dbguard: {exc}", err=True)


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@main.command()
@click.option(
    "--etcd",
    "use_etcd",
    is_flag=True,
    help="Start a local three-member etcd cluster as the lease service instead of a broker.",
)
@_json_option
@_common
def up(settings: Settings, as_json: bool, use_etcd: bool) -> None:
    """Start a broker (or, with --etcd, an etcd cluster) and an agent on this machine, and
    print the address to export as DBGUARD_BROKER."""
    if use_etcd:
        started, settings = servers.start_etcd(settings)
        what = "etcd"
    else:
        if settings.keys is None and settings.broker.startswith("tcp://"):  # etcd has its own security
            _warn_if_exposed(settings.broker)
        started, what = servers.start_broker(settings), "broker"
    client = local_agent.connect(settings)
    with client:
        agent_info = client.call_ok(AgentOp.HELLO)
    page = None
    if settings.web != "off":
        from dbguard.web import server as web_server

        page, _ = web_server.start_detached(settings, settings.web)
    data = {
        "broker": settings.broker,
        "backend": what,
        "started": started,
        "state": str(settings.state),
        "agent": {k: agent_info[k] for k in ("host", "user", "pid", "cache")},
        "page": page,
    }
    how = "started" if started else "already running"
    who = f"{agent_info['user']}@{agent_info['host']}"
    text = (
        f"{what:<7} {settings.broker} ({how}; state in {settings.state})\n"
        f"agent   {who} pid {agent_info['pid']}, cache {agent_info['cache']}\n"
        + (f"page    {page}  (the status page: open it in a browser)\n" if page else "")
        + f"export DBGUARD_BROKER={settings.broker}"
    )
    _emit(as_json, data, text)


@main.command()
@click.option(
    "--address",
    metavar="HOST:PORT",
    help="Where to serve the page (default: the web setting, else 127.0.0.1:8470). Beyond loopback "
    "it asks for a token, printed with its address.",
)
@click.option("--token", help="The token the page asks for (default: none on loopback, else made once).")
@click.option("--url-file", type=click.Path(path_type=Path), hidden=True)
@_common
def web(settings: Settings, address: str | None, token: str | None, url_file: Path | None) -> None:
    """Serve the site's status page and /metrics until Ctrl-C: every project, who writes it,
    what is orphaned and stranded, who waits, and each project's history."""
    from dbguard.web import server as web_server

    if address is None:
        address = settings.web if settings.web not in ("off", "127.0.0.1:0") else "127.0.0.1:8470"

    def ready(url: str) -> None:
        if url_file is not None:
            temp = url_file.with_name(url_file.name + ".tmp")
            temp.write_text(url + "\n")
            temp.replace(url_file)
        else:
            click.echo(f"status page: {url}  (metrics at /metrics; Ctrl-C stops it)")

    web_server.serve(settings, address, token=token, on_ready=ready)


@main.command()
@_json_option
@_common
def down(settings: Settings, as_json: bool) -> None:
    """Stop this machine's agent and the broker or etcd cluster that `dbguard up` started."""
    from dbguard.web import server as web_server

    stopped = ["agent"] if local_agent.shut_down(settings) else []
    stopped += ["page"] if web_server.stop(settings) else []
    stopped += servers.stop(settings)
    _emit(
        as_json,
        {"stopped": stopped},
        "stopped " + (", ".join(stopped) if stopped else "nothing (nothing was running)"),
    )


# --------------------------------------------------------------- projects


@main.command()
@click.argument("project", type=click.Path(path_type=Path), default=".")
@_json_option
def init(project: Path, as_json: bool) -> None:
    """Make PROJECT (default: the current directory) a dbguard project."""
    result = api.init(project)
    if result.recovered:
        click.echo(f"dbguard: {result.recovered}", err=True)
    _emit(as_json, {"id": result.id, "path": str(result.path)}, f"project {result.path} has id {result.id}")


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@click.option("--wait", type=float, metavar="SECONDS", help="Queue for the lease for up to SECONDS.")
@click.option("--takeover", is_flag=True, help="Ask the holder to flush and release, and wait for it.")
@click.option("--serve", "serve", is_flag=True, help="Also serve PROJECT to worker nodes (see `serve`).")
@click.option("--address", metavar="tcp://HOST:PORT", help="Where to serve it (with --serve).")
@_json_option
@_common
def acquire(
    settings: Settings,
    project: Path | None,
    wait: float | None,
    takeover: bool,
    serve: bool,
    address: str | None,
    as_json: bool,
) -> None:
    """Become the writer of PROJECT (default: the current directory)."""
    if address is not None and not serve:
        raise UsageError("--address says where to serve: give --serve with it")
    shown: set[int] = set()

    def queued(place: QueuePlace) -> None:
        if not as_json and place.position not in shown and sys.stderr.isatty():
            shown.add(place.position)
            click.echo(f"waiting: position {place.position} in the queue", err=True)

    lease = api.acquire(project, wait=wait, takeover=takeover, settings=settings, on_queued=queued)
    if lease.recovered_identity:  # project.json was lost and written again from the project store
        click.echo(f"dbguard: {lease.recovered_identity}", err=True)
    text = f"acquired {lease.path} (token {lease.token}, ttl {lease.ttl:.0f}s)"
    data = lease.to_json()
    if serve:
        served = api.serve(lease.path, address=address, settings=settings)
        data["serve"] = served["address"]
        text += "\n" + _serving_text(served)
    _emit(as_json, data, text)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@click.option(
    "--to",
    "directory",
    required=True,
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="A folder on this node's local disk (new or empty; the same one to carry on).",
)
@click.option("--wait", type=float, metavar="SECONDS", help="Queue for the lease for up to SECONDS.")
@click.option("--takeover", is_flag=True, help="Ask the holder to flush and release, and wait for it.")
@_json_option
@_common
def deploy(
    settings: Settings,
    project: Path | None,
    directory: Path,
    wait: float | None,
    takeover: bool,
    as_json: bool,
) -> None:
    """Take PROJECT's lease and copy its folder to DIR on this node to work there; `sync` copies
    changes back, `undeploy` ends it. Run again after an interruption, it carries on."""
    with _progress(as_json, "deploying") as progress:
        result = api.deploy(
            project, directory, wait=wait, takeover=takeover, settings=settings, progress=progress
        )
    text = (
        f"deployed {result['path']} to {result['dir']} (token {result['token']}): copied "
        f"{result['files']} files ({_size(result['bytes'])})"
    )
    _emit(as_json, result, text)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@_json_option
@_common
def sync(settings: Settings, project: Path | None, as_json: bool) -> None:
    """Copy what changed in this node's deployment of PROJECT back to the share (fenced: a host
    that lost the lease publishes nothing)."""
    with _progress(as_json, "syncing") as progress:
        result = api.sync(project, settings=settings, progress=progress)
    text = (
        f"synced {result['dir']}: {result['copied']} files ({_size(result['bytes'])}), "
        f"{result['deleted']} deleted, {result['links']} links"
    )
    if result["recorded_links"]:
        recorded = len(result["recorded_links"])
        text += f"; {recorded} links recorded in .dbguard/symlinks.json (the share holds none)"
    _emit(as_json, result, text)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@click.option("--force", is_flag=True, help="Even while processes of this node use the deployment.")
@click.option(
    "--discard",
    is_flag=True,
    help="Remove a deployment that can no longer sync (lease lost, folder gone), with what it holds.",
)
@_json_option
@_common
def undeploy(settings: Settings, project: Path | None, force: bool, discard: bool, as_json: bool) -> None:
    """The last sync of PROJECT's deployment on this node, a check of every synced file on the
    share, the deployment removed, the lease released."""
    with _progress(as_json, "syncing") as progress:
        result = api.undeploy(project, force=force, discard=discard, settings=settings, progress=progress)
    synced = result["synced"]
    text = f"undeployed {result['path']}: removed {result['dir']}"
    if synced is not None:
        text += f" after syncing {synced['copied']} files and checking {result['checked']} on the share"
    text += "; released the lease" if result["released"] else ""
    _emit(as_json, result, text)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@click.option(
    "--address",
    metavar="tcp://HOST:PORT",
    help="Where workers reach this host (default: every interface, a free port).",
)
@click.option("--stop", is_flag=True, help="Stop serving PROJECT (the lease stays held).")
@_json_option
@_common
def serve(settings: Settings, project: Path | None, address: str | None, stop: bool, as_json: bool) -> None:
    """Serve PROJECT's image databases to worker nodes while this host holds its lease: workers
    open them with dbguard.open(..., remote=True) or DBGUARD_REMOTE=1."""
    if stop:
        result = api.serve(project, stop=True, settings=settings)
        _emit(as_json, result, "stopped serving" if result["stopped"] else "was not serving")
        return
    result = api.serve(project, address=address, settings=settings)
    _emit(as_json, result, _serving_text(result))


def _serving_text(result: dict[str, Any]) -> str:
    text = f"serving {result['path']} to workers at {result['address']} (token {result['token']})"
    if not result.get("key") and not is_loopback(result["address"]):
        text += (
            "\nwarning: without keys, anyone who can reach that port can read and write this project "
            "through this host; set up keys (`dbguard keys --help`) or serve on a private network"
        )
    return text


@main.command(name="import")
@click.argument("args", nargs=-1, required=True, metavar="[PROJECT] NAME FILE...")
@click.option("--dataset", metavar="PATH", help="The HDF5 dataset (or .npz member) to import.")
@_remote_option
@_json_option
@_common
def import_command(
    settings: Settings, args: tuple[str, ...], dataset: str | None, remote: bool | None, as_json: bool
) -> None:
    """Append the images of MRC, TIFF, HDF5 and .npy/.npz files to image database NAME (needs the
    lease)."""
    if len(args) < 2:
        raise UsageError("give NAME and at least one FILE: dbguard import [PROJECT] NAME FILE...")
    project: Path | None = None
    if len(args) >= 3 and Path(args[0]).is_dir():
        project, args = Path(args[0]), args[1:]
    name, files = args[0], tuple(Path(f) for f in args[1:])
    with _progress(as_json, "importing") as progress:
        result = api.import_files(
            project, name, files, dataset=dataset, settings=settings, progress=progress, remote=remote
        )
    text = (
        f"imported {result['records']} images ({_size(result['bytes'])}) into {name}; "
        f"it now has {result['count']}"
    )
    _emit(as_json, result, text)


@main.command(name="export")
@click.argument("args", nargs=-1, required=True, metavar="[PROJECT] NAME")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="The file to write; its suffix chooses the format (.mrc .mrcs .st .map .tif .h5 .npy .npz).",
)
@click.option("--dataset", metavar="PATH", help="The HDF5 dataset to write (default: images).")
@_remote_option
@_json_option
@_common
def export_command(
    settings: Settings,
    args: tuple[str, ...],
    target: Path,
    dataset: str | None,
    remote: bool | None,
    as_json: bool,
) -> None:
    """Write image database NAME out to one file (read-only: works from any host)."""
    if len(args) > 2:
        raise UsageError("give [PROJECT] NAME: dbguard export [PROJECT] NAME --to FILE")
    project = Path(args[0]) if len(args) == 2 else None
    with _progress(as_json, "exporting") as progress:
        result = api.export_database(
            project,
            args[-1],
            target,
            dataset=dataset,
            settings=settings,
            progress=progress,
            remote=remote,
        )
    dropped = ", ".join(result["dropped_attrs"])
    text = f"exported {result['records']} images ({_size(result['bytes'])}) to {result['target']}"
    _emit(
        as_json, result, text + (f"; no place in {result['format']} for attrs {dropped}" if dropped else "")
    )


class _CommandAfterDashes(click.Command):
    """Everything after ``--`` is the command to run, untouched by option parsing."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            args, ctx.meta["command"] = args[:at], args[at + 1 :]
        else:
            ctx.meta["command"] = []
        return super().parse_args(ctx, args)


@main.command(name="run", cls=_CommandAfterDashes)
@click.argument("project", type=click.Path(path_type=Path), required=False)
@click.option("--wait", type=float, metavar="SECONDS", help="Queue for the lease for up to SECONDS.")
@click.option("--takeover", is_flag=True, help="Ask the holder to flush and release, and wait for it.")
@click.option("--keep", is_flag=True, help="Keep the lease after the command ends (no release).")
@_json_option
@_common
def run_command(
    settings: Settings,
    project: Path | None,
    wait: float | None,
    takeover: bool,
    keep: bool,
    as_json: bool,
) -> None:
    """Hold PROJECT's writer lease while a command runs: dbguard run [PROJECT] -- COMMAND [ARGS...].

    The command's exit status becomes this one's. If the lease is lost meanwhile, the command's
    process group is stopped and the exit code is 9. HDF5_USE_FILE_LOCKING=FALSE is set for it
    unless already set: one writer host is guaranteed."""
    command = click.get_current_context().meta["command"]
    if not command:
        raise UsageError("give the command to run after --, e.g. `dbguard run . -- relion_refine ...`")
    result = api.run(project, command, wait=wait, takeover=takeover, keep=keep, settings=settings)
    if as_json:
        _emit(True, result.to_json(), "")
    sys.exit(result.returncode)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@_json_option
@_common
def release(settings: Settings, project: Path | None, as_json: bool) -> None:
    """Give up this host's writer lease on PROJECT; the cache stays warm."""
    result = api.release(project, settings=settings)
    text = (
        f"released (token {result['token']})"
        if result["released"]
        else f"nothing to release: {result['reason']}"
    )
    _emit(as_json, result, text)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@_json_option
@_common
def status(settings: Settings, project: Path | None, as_json: bool) -> None:
    """Who writes PROJECT, since when, with what token, and what waits for it."""
    result = api.status(project, settings=settings)
    _emit(as_json, result.to_json(), _status_text(result))


def _status_text(result: Status) -> str:
    lines = []
    for item in result.projects:
        lines.append(f"project {item.path or item.project}")
        lines.append(f"  id       {item.project}")
        lines.append(f"  state    {item.state}" + (f" (free in {item.free_in:.1f}s)" if item.free_in else ""))
        writer = item.writer
        if writer:
            role = "writer" if item.state == "held" else "former writer"
            unflushed = _size(writer.unflushed)
            lines.append(
                f"  {role:<8} {writer.doing()} since {_when(writer.since)}, "
                f"token {writer.token}, ttl left {writer.ttl_left:.1f}s, unflushed {unflushed}"
            )
            if writer.pid is not None:
                lines.append(f"  pid      {writer.pid} on {writer.host}")
            if writer.serve:
                secured = "with keys" if writer.serve_key else "without keys"
                lines.append(f"  serves   workers at {writer.serve} ({secured})")
            if item.state == "orphaned":
                # The lease service knows what the host last reported, and that it was dirty;
                # records written after that report are stranded too.
                size = f"at least {unflushed}" if writer.unflushed else "an unknown amount of data"
                lines.append(
                    f"  stranded {size} unflushed on {writer.host}; wait for that host "
                    "to return, or run `dbguard break PROJECT --force`"
                )
        if item.deployment:
            d = item.deployment
            unfinished = ", copy unfinished" if d["state"] == "deploying" else ""
            lines.append(
                f"  deployed to {d['dir']} on {d['host']} by {d['user']} since {_when(d['since'])} "
                f"(token {d['token']}{unfinished})"
            )
        readers = ", ".join(f"{r.user} on {r.host}" for r in item.readers) or "none"
        queue = ", ".join(f"{w.user} on {w.host}" + (" (takeover)" if w.takeover else "") for w in item.queue)
        lines.append(f"  readers  {readers}")
        lines.append(f"  queue    {queue or 'empty'}")
        if item.grace_left:
            lines.append(f"  broker   in its restart grace period for {item.grace_left:.1f}s more")
    if result.agent:
        for lease in result.agent["leases"]:
            state = lease["state"] + (f": {lease['reason']}" if lease["reason"] else "")
            verb = "holds" if lease["state"] == "held" else "held"
            serving = f", serving workers at {lease['serve']}" if lease.get("serve") else ""
            lines.append(f"this host {verb} {lease['path']} (token {lease['token']}): {state}{serving}")
        for notice in result.agent["notices"][-5:]:
            lines.append(f"notice {_when(notice['at'])} {notice['text']}")
    if not result.projects:
        lines.append("the broker knows no projects yet")
    if result.authenticated is False and result.exposed:
        lines.append(
            f"warning: the broker {result.broker} is unauthenticated and reachable from the network: "
            "anyone who can reach it can take or break leases; set up keys (`dbguard keys --help`)"
        )
    return "\n".join(lines)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@click.option(
    "--since",
    "since_text",
    metavar="TIME",
    help="Only events since TIME: a span back from now (30m, 2h, 3d), a date or date and time "
    "(2026-12-02, 2026-12-02T18:30) or seconds since the epoch.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=1000,
    show_default=True,
    help="At most this many, the newest.",
)
@_json_option
@_common
def log(settings: Settings, project: Path | None, since_text: str | None, limit: int, as_json: bool) -> None:
    """What happened to PROJECT (or to every project, outside one): grants, releases,
    expiries, orphanings, takeovers, breaks, flushes and fence refusals, oldest first."""
    since = 0.0
    if since_text is not None:
        try:
            since = parse_since(since_text, time.time())
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    events = api.log(project, since=since, limit=limit, settings=settings)
    text = "\n".join(_event_line(event, project is None) for event in events) or "no events"
    _emit(as_json, events, text)


def _event_line(event: dict[str, Any], every_project: bool) -> str:
    line = history.describe(event)
    if every_project:
        line += f"  [{event.get('path') or event.get('project')}]"
    return line


@main.command(name="break")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Really break it (required).")
@_json_option
@_common
def break_command(settings: Settings, project: Path, force: bool, as_json: bool) -> None:
    """Free PROJECT whoever holds it; says what may be stranded on the former holder."""
    if not force:
        current = api.status(project, settings=settings).projects[0]
        raise UsageError(
            f"breaking {project} takes its lease from {_holder_text(current)}; anything unflushed there "
            "stays on that host, kept aside. Run again with --force to do it"
        )
    result = api.break_lease(project, settings=settings)
    broken = result["broken"]
    if broken is None:
        text = f"{result['path']} was not held; nothing to break"
    else:
        text = (
            f"broke the lease of {broken['user']} on {broken['host']} "
            f"(token {broken['token']}, {broken['state']}); {_size(broken['unflushed'])} may be "
            "stranded there: its agent keeps them aside when it returns"
        )
    _emit(as_json, result, text)


@main.group()
def keys() -> None:
    """Create and authorise CURVE keys (a site that sets DBGUARD_KEYS gets an authenticated broker).

    \b
    On the broker's machine:   dbguard keys init-broker --dir /etc/dbguard/keys
    On every client machine:   dbguard keys init-client --dir ~/.config/dbguard/keys
                               (copy the broker's broker.key there too)
    Back on the broker:        dbguard keys authorize ws1.key --name ws1 [--operator]
    """


_keys_dir_option = click.option(
    "--dir", "directory", type=click.Path(path_type=Path), help="Keys directory (env DBGUARD_KEYS)."
)


def _keys_dir(given: Path | None) -> Path:
    directory = given or load().keys
    if directory is None:
        raise UsageError("give --dir DIRECTORY or set DBGUARD_KEYS to the keys directory")
    return directory


@keys.command(name="init-broker")
@click.option(
    "--dir", "directory", type=click.Path(path_type=Path), help="Keys directory (env DBGUARD_KEYS)."
)
def keys_init_broker(directory: Path | None) -> None:
    """Create the broker's key pair, and its authorized/ and operators/ directories."""
    public = init_broker(_keys_dir(directory))
    click.echo(f"created {public} (give this public key to every client) and its secret beside it")


@keys.command(name="init-client")
@click.option(
    "--dir", "directory", type=click.Path(path_type=Path), help="Keys directory (env DBGUARD_KEYS)."
)
def keys_init_client(directory: Path | None) -> None:
    """Create this machine's client key pair."""
    public = init_client(_keys_dir(directory))
    click.echo(
        f"created {public}: have the operator authorise it (`dbguard keys authorize`), and put the "
        f"broker's broker.key in {public.parent}"
    )


@keys.command(name="authorize")
@click.argument("public_key", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--name", required=True, help="A name for the key's owner, e.g. the host name.")
@click.option("--operator", is_flag=True, help="Also allow `dbguard break --force` with this key.")
@click.option(
    "--dir", "directory", type=click.Path(path_type=Path), help="Keys directory (env DBGUARD_KEYS)."
)
def keys_authorize(public_key: Path, name: str, operator: bool, directory: Path | None) -> None:
    """Let the owner of PUBLIC_KEY use the broker (run on the broker's machine)."""
    target = authorize(_keys_dir(directory), public_key, name, operator=operator)
    click.echo(f"authorised {name}{' as an operator' if operator else ''}: {target}")


@contextlib.contextmanager
def _progress(as_json: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal; nothing with --json or when output is not a terminal."""
    if as_json or not sys.stderr.isatty():
        yield None
        return
    bar: Any = None
    shown = 0

    def update(done: int, total: int) -> None:
        nonlocal bar, shown
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
            bar.__enter__()
        bar.update(done - shown)
        shown = done

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@_json_option
@_common
def flush(settings: Settings, project: Path | None, as_json: bool) -> None:
    """Write this host's unflushed records of PROJECT to the shared project store now."""
    with _progress(as_json, "flushing") as progress:
        result = api.flush(project, settings=settings, progress=progress)
    text = (
        f"flushed {result['records']} records ({_size(result['bytes'])}) as generation {result['generation']}"
        if result["records"]
        else "nothing to flush"
    )
    _emit(as_json, result, text)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), required=False)
@click.option("--all", "every", is_flag=True, help="Clear every project this host has in its cache.")
@click.option("--force", is_flag=True, help="Clear even while local processes have it open for writing.")
@_json_option
@_common
def clear(settings: Settings, project: Path | None, every: bool, force: bool, as_json: bool) -> None:
    """Before switching machines: flush, verify, drop the local cache, release (like e2bdb.py -c)."""
    if every and project is not None:
        raise UsageError("give a PROJECT or --all, not both")
    targets = api.cached_projects(settings) if every else [project]
    results = []
    for target in targets:
        with _progress(as_json, "flushing") as progress:
            results.append(api.clear(target, force=force, settings=settings, progress=progress))
    _emit(
        as_json,
        results if every else results[0],
        "\n".join(map(_cleared_text, results)) or "nothing to clear",
    )


def _cleared_text(done: dict[str, Any]) -> str:
    flushed, released, read_back = done["flushed"], done["released"], done["read_back"]
    parts = []
    if done.get("agent_restarted"):
        parts.append("restarted this host's agent, which had died")
    parts.append(f"flushed {flushed['records']} records")
    checked = f"verified {done['verified']} against the share"
    if read_back["bytes"]:
        checked += f" (read back {_size(read_back['bytes'])} past the client cache, {read_back['method']})"
    parts.append(checked)
    reflushed = done.get("reflushed")
    if reflushed:
        parts.append(
            f"re-flushed {reflushed['records']} damaged record{'s' if reflushed['records'] != 1 else ''} "
            f"from this host's cache as generation {reflushed['generation']} "
            f"({'; '.join(reflushed['damaged'])})"
        )
    parts.append(f"dropped {_size(done['dropped_bytes'])} of cache")
    parts.append(
        f"released token {released['token']}"
        if released and released.get("released")
        else "no lease to release"
    )
    return f"cleared {done['path']}: " + ", ".join(parts)


@main.command()
@click.argument("project", type=click.Path(path_type=Path), default=".")
@_remote_option
@_json_option
@_common
def browse(settings: Settings, project: Path, remote: bool | None, as_json: bool) -> None:
    """Show what PROJECT (default: here) holds, read-only, from any host (no lease needed)."""
    info = api.browse(project, remote=remote, settings=settings)
    lines = [f"project {info['path']}", f"  generation {info['generation']} (token {info['token']})"]
    if info["last_flush"]:
        by = info["last_flush_by"] or {}
        lines.append(
            f"  last flush {_when(info['last_flush'])}"
            + (f" by {by.get('user')} on {by.get('host')}" if by else "")
        )
    writer = info["writer"]
    if writer:
        ahead = _size(writer.get("unflushed", 0)) if "unflushed" in writer else "unknown"
        lines.append(
            f"  writer     {writer['user']} on {writer['host']} (token {writer['token']}), "
            f"{ahead} unflushed ahead"
        )
    else:
        lines.append("  writer     none")
    for db in info["databases"]:
        shapes = ", ".join(f"{shape} x{count}" for shape, count in db["shapes"].items())
        lines.append(f"  {db['name']:<20} {db['count']:>8} records  {'/'.join(db['dtypes'])}  {shapes}")
    if not info["databases"]:
        lines.append("  no databases flushed yet")
    _emit(as_json, info, "\n".join(lines))


@main.command(name="ls")
@click.argument("project", type=click.Path(path_type=Path))
@click.argument("db", required=False)
@_remote_option
@_json_option
@_common
def ls_command(settings: Settings, project: Path, db: str | None, remote: bool | None, as_json: bool) -> None:
    """List the databases of PROJECT, or the records of DB (read-only, from any host)."""
    info = api.ls(project, db, remote=remote, settings=settings)
    if db is None:
        lines = [f"{item['name']}\t{item['count']}" for item in info["databases"]] or ["no databases yet"]
    else:
        lines = [
            f"{r['index']}\t{r['dtype']}\t{'x'.join(map(str, r['shape']))}\t{json.dumps(r['attrs'])}"
            for r in info["records"]
        ]
    _emit(as_json, info, "\n".join(lines))


@main.command()
@click.argument("project", type=click.Path(path_type=Path), default=".")
@_json_option
def verify(project: Path, as_json: bool) -> None:
    """Check every checksum of PROJECT's (default: here) store; exit code 6 if anything is damaged."""
    result = api.verify(project)
    if result["problems"]:
        _emit(as_json, result, "\n".join(f"damaged: {p}" for p in result["problems"]))
        sys.exit(int(ExitCode.INTEGRITY))
    _emit(
        as_json,
        result,
        f"ok: generation {result['generation']}, {result['records']} records, all checksums match"
        + (
            f" ({len(result['superseded'])} damaged copies of records that later flushes replaced are "
            "left for compaction to drop)"
            if result["superseded"]
            else ""
        ),
    )


@main.command()
@click.option("--export", type=click.Path(path_type=Path), help="Write the kept records here as .npy files.")
@_json_option
@_common
def recover(settings: Settings, export: Path | None, as_json: bool) -> None:
    """List (and export) unflushed data of lost leases that this host kept aside."""
    result = api.recover(export=export, settings=settings)
    lines = [
        f"{item['label']}: {_size(item['dirty_bytes'])} unflushed, {item['reason']}"
        + (f"; exported {item['exported']} records" if "exported" in item else "")
        for item in result["aside"]
    ]
    for kept in result["deployments"]:
        lines.append(
            f"deployment {kept['dir']} of {kept['path']} lost its lease (token {kept['token']}); not synced: "
            f"{len(kept['unsynced'])} changed or new, {len(kept['deleted_unsynced'])} deleted"
            + "".join(f"\n  {path}" for path in kept["unsynced"][:20])
        )
    _emit(as_json, result, "\n".join(lines or ["nothing kept aside on this host"]))


@main.command(name="check-cache")
@click.argument("path", type=click.Path(path_type=Path), required=False)
@_json_option
@_common
def check_cache(settings: Settings, path: Path | None, as_json: bool) -> None:
    """Check that PATH (default: the configured cache) may hold the cache; exit code 5 if not."""
    target = path or settings.cache
    mount = api.check_cache(target)
    _emit(
        as_json, mount, f"ok: {target} is on {mount['fstype']} ({mount['source']} at {mount['mountpoint']})"
    )


def _holder_text(item: ProjectStatus) -> str:
    writer = item.writer
    return f"{writer.user} on {writer.host} ({item.state})" if writer else "nobody (it is free)"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


_size = human_size


def run() -> None:
    """Entry point that also reports unexpected errors without a traceback."""
    try:
        main()
    except SystemExit:
        raise
    except Exception as exc:  # an unexpected failure: short message, exit 1, details on demand
        if os.environ.get("DBGUARD_DEBUG"):
            raise
        click.echo(f"dbguard: unexpected error: {exc!r} (set DBGUARD_DEBUG=1 for the traceback)", err=True)
        sys.exit(int(ExitCode.UNEXPECTED))
