"""The `dbguard` command: parse, call the library, turn a GuardError into a message and exit code."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import subprocess
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
    BrokerUnavailable,
    ExitCode,
    GuardError,
    UsageError,
    from_cache_error,
)
from dbguard.lease.keys import authorize, broker_keys, exposure_warning, init_broker, init_client
from dbguard.lease.protocol import AgentOp, Op
from dbguard.lease.rules import Timing
from dbguard.lease.service import for_broker
from dbguard.settings import Settings, load
from dbguard.units import human_size

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
    click.echo(f"dbguard: {exc}", err=True)
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
    address = _bind_address(settings.broker)
    if keys is None:
        _warn_if_exposed(address)
    broker_module.run(address, settings.state, timing, keys=keys, ready_file=ready_file)


def _warn_if_exposed(address: str) -> None:
    """A broker without keys is fine on loopback; elsewhere, anyone on the network may use it."""
    warning = exposure_warning(address)
    if warning:
        click.echo(f"dbguard: warning: {warning}", err=True)


def _bind_address(address: str) -> str:
    if not address.startswith("tcp://"):
        raise UsageError(f"the broker listens on tcp://host:port addresses, not {address}")
    return address


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
        started, settings = _start_etcd(settings)
        what = "etcd"
    else:
        if settings.keys is None and settings.broker.startswith("tcp://"):  # etcd has its own security
            _warn_if_exposed(settings.broker)
        started, what = _start_broker(settings), "broker"
    client = local_agent.connect(settings)
    with client:
        agent_info = client.call_ok(AgentOp.HELLO)
    data = {
        "broker": settings.broker,
        "backend": what,
        "started": started,
        "state": str(settings.state),
        "agent": {k: agent_info[k] for k in ("host", "user", "pid", "cache")},
    }
    how = "started" if started else "already running"
    who = f"{agent_info['user']}@{agent_info['host']}"
    text = (
        f"{what:<7} {settings.broker} ({how}; state in {settings.state})\n"
        f"agent   {who} pid {agent_info['pid']}, cache {agent_info['cache']}\n"
        f"export DBGUARD_BROKER={settings.broker}"
    )
    _emit(as_json, data, text)


def _start_etcd(settings: Settings) -> tuple[bool, Settings]:
    """A local three-member etcd cluster in the state directory, started unless it runs; the
    site's timing is stored in it, and the settings returned point at it."""
    from dbguard.lease.etcd import configure
    from dbguard.lease.etcd_cluster import EtcdCluster, etcd_unavailable

    directory = settings.state / "etcd"
    cluster = EtcdCluster.existing(directory)
    started = False
    if cluster is None or len(cluster.running()) < len(cluster.endpoints):
        why = etcd_unavailable()
        if why:
            raise UsageError(f"cannot start a local etcd cluster: {why}")
        settings.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cluster is None:
            cluster = EtcdCluster(directory)
            cluster.start(detached=True)
        else:
            for index in set(range(len(cluster.endpoints))) - set(cluster.running()):
                cluster.start_member(index)
        started = True
    address = cluster.url()
    configure(address, ttl=settings.ttl, lock_delay=settings.lock_delay, timeout=settings.request_timeout)
    return started, dataclasses.replace(settings, broker=address)


def _start_broker(settings: Settings) -> bool:
    if settings.broker.startswith("etcd://"):
        # The site's etcd is not ours to start: check it answers, and say why if it does not.
        with for_broker(settings, timeout=2.0, attempts=1) as etcd:
            etcd.call_ok(Op.HELLO)
        return False
    with for_broker(settings, timeout=1.0, attempts=1) as probe:
        try:
            probe.call_ok(Op.HELLO)
            return False
        except BrokerUnavailable:
            pass
    settings.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = settings.state / "broker.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-P",  # not the current directory first on the import path (see local_agent.start)
                "-m",
                "dbguard",
                "broker",
                "--address",
                _bind_address(settings.broker),
                "--state",
                str(settings.state),
                "--ttl",
                str(settings.ttl),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (settings.state / "broker.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 10
    with for_broker(settings, timeout=0.5, attempts=1) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                probe.call_ok(Op.HELLO)
                return True
            except BrokerUnavailable:
                continue
    tail = log_path.read_text(errors="replace").splitlines()[-5:]
    raise BrokerUnavailable(
        f"the broker did not start on {settings.broker}; last lines of {log_path}:\n  " + "\n  ".join(tail)
    )


@main.command()
@_json_option
@_common
def down(settings: Settings, as_json: bool) -> None:
    """Stop this machine's agent and the broker or etcd cluster that `dbguard up` started."""
    stopped = []
    agent_client = local_agent.running(settings)
    if agent_client is not None:
        with agent_client:
            agent_client.call_ok(AgentOp.SHUTDOWN)
        stopped.append("agent")
    etcd_dir = settings.state / "etcd"
    if (etcd_dir / "cluster.json").exists():
        from dbguard.lease.etcd_cluster import EtcdCluster

        cluster = EtcdCluster.existing(etcd_dir)
        if cluster is not None and cluster.running():
            cluster.stop()
            stopped.append("etcd")
    pid_file = settings.state / "broker.pid"
    if pid_file.exists():
        pid = _broker_pid(pid_file, settings.state)
        if pid and _terminate(pid):
            stopped.append("broker")
        pid_file.unlink(missing_ok=True)
    _emit(
        as_json,
        {"stopped": stopped},
        "stopped " + (", ".join(stopped) if stopped else "nothing (nothing was running)"),
    )


def _broker_pid(pid_file: Path, state: Path) -> int | None:
    """The pid of the broker `up` started on ``state``, if it still runs. Pid files outlive their
    processes and pids are reused (a reboot, a damaged file): a pid counts only while it runs a
    broker on this state directory, so `down` never signals another process."""
    import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

    try:
        text = pid_file.read_text(errors="replace").strip()
        if not text.isascii() or not text.isdigit():
            return None
        process = psutil.Process(int(text))
        argv = process.cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    return int(process.pid) if "broker" in argv and str(state) in argv else None


def _terminate(pid: int, timeout: float = 10.0) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return True


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
@_json_option
@_common
def acquire(
    settings: Settings, project: Path | None, wait: float | None, takeover: bool, as_json: bool
) -> None:
    """Become the writer of PROJECT (default: the current directory)."""
    shown: set[int] = set()

    def queued(reply: dict[str, Any]) -> None:
        if not as_json and reply["position"] not in shown and sys.stderr.isatty():
            shown.add(reply["position"])
            click.echo(f"waiting: position {reply['position']} in the queue", err=True)

    lease = api.acquire(project, wait=wait, takeover=takeover, settings=settings, on_queued=queued)
    if lease.get("identity"):  # project.json was lost and written again from the project store
        click.echo(f"dbguard: {lease['identity']}", err=True)
    _emit(as_json, lease, f"acquired {lease['path']} (token {lease['token']}, ttl {lease['ttl']:.0f}s)")


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
    _emit(as_json, result, _status_text(result))


def _status_text(result: dict[str, Any]) -> str:
    lines = []
    for item in result["projects"]:
        lines.append(f"project {item.get('path', item['project'])}")
        lines.append(f"  id       {item['project']}")
        lines.append(
            f"  state    {item['state']}"
            + (f" (free in {item['free_in']:.1f}s)" if item.get("free_in") else "")
        )
        writer = item.get("writer")
        if writer:
            role = "writer" if item["state"] == "held" else "former writer"
            unflushed = _size(writer["unflushed"])
            lines.append(
                f"  {role:<8} {writer['user']} on {writer['host']} since {_when(writer['since'])}, "
                f"token {writer['token']}, ttl left {writer['ttl_left']:.1f}s, unflushed {unflushed}"
            )
            if item["state"] == "orphaned":
                # The lease service knows what the host last reported, and that it was dirty;
                # records written after that report are stranded too.
                size = f"at least {unflushed}" if writer["unflushed"] else "an unknown amount of data"
                lines.append(
                    f"  stranded {size} unflushed on {writer['host']}; wait for that host "
                    "to return, or run `dbguard break PROJECT --force`"
                )
        readers = ", ".join(f"{r['user']} on {r['host']}" for r in item.get("readers", [])) or "none"
        queue = (
            ", ".join(
                f"{w['user']} on {w['host']}" + (" (takeover)" if w["takeover"] else "")
                for w in item.get("queue", [])
            )
            or "empty"
        )
        lines.append(f"  readers  {readers}")
        lines.append(f"  queue    {queue}")
        if item.get("grace_left"):
            lines.append(f"  broker   in its restart grace period for {item['grace_left']:.1f}s more")
    agent = result.get("agent")
    if agent:
        for lease in agent["leases"]:
            state = lease["state"] + (f": {lease['reason']}" if lease["reason"] else "")
            verb = "holds" if lease["state"] == "held" else "held"
            lines.append(f"this host {verb} {lease['path']} (token {lease['token']}): {state}")
        for notice in agent["notices"][-5:]:
            lines.append(f"notice {_when(notice['at'])} {notice['text']}")
    if not result["projects"]:
        lines.append("the broker knows no projects yet")
    if result.get("authenticated") is False and result.get("exposed"):
        lines.append(
            f"warning: the broker {result['broker']} is unauthenticated and reachable from the network: "
            "anyone who can reach it can take or break leases; set up keys (`dbguard keys --help`)"
        )
    return "\n".join(lines)


@main.command(name="break")
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Really break it (required).")
@_json_option
@_common
def break_command(settings: Settings, project: Path, force: bool, as_json: bool) -> None:
    """Free PROJECT whoever holds it; says what may be stranded on the former holder."""
    if not force:
        current = api.status(project, settings=settings)["projects"][0]
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
@_json_option
@_common
def browse(settings: Settings, project: Path, as_json: bool) -> None:
    """Show what PROJECT (default: here) holds, read-only, from any host (no lease needed)."""
    info = api.browse(project, settings=settings)
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
@_json_option
@_common
def ls_command(settings: Settings, project: Path, db: str | None, as_json: bool) -> None:
    """List the databases of PROJECT, or the records of DB (read-only, from any host)."""
    info = api.ls(project, db, settings=settings)
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
    ] or ["nothing kept aside on this host"]
    _emit(as_json, result, "\n".join(lines))


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


def _holder_text(item: dict[str, Any]) -> str:
    writer = item.get("writer")
    return f"{writer['user']} on {writer['host']} ({item['state']})" if writer else "nobody (it is free)"


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
