"""Settings, strongest first: command-line options, environment, ~/.config/dbguard/config.toml,
/etc/dbguard/config.toml, then the defaults below.

Every setting has one name used everywhere: ``ttl`` is the ``--ttl`` option, ``DBGUARD_TTL`` in
the environment and ``ttl = 30`` in a config file.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dbguard.cache import default_cache_dir
from dbguard.errors import UsageError

DEFAULT_PORT = 7390
DEFAULT_BROKER = f"tcp://127.0.0.1:{DEFAULT_PORT}"

SYSTEM_CONFIG = Path("/etc/dbguard/config.toml")


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dbguard" / "config.toml"


def _default_state_dir() -> Path:
    # Not /tmp: the broker's token counter must survive a reboot (invariant 2).
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dbguard" / "broker"


@dataclass(frozen=True)
class Settings:
    broker: str = DEFAULT_BROKER
    cache: Path = Path()  # filled in by load(): depends on the user
    keys: Path | None = None
    state: Path = Path()  # the broker's state directory, filled in by load()
    ttl: float = 30.0  # seconds a writer lease lives without a heartbeat
    lock_delay: float = 5.0  # seconds a cleanly expired lease stays blocked
    grace: float = 0.0  # seconds after a broker restart; 0 means one TTL
    flush_interval: float = 30.0  # seconds between the agent's periodic flushes
    retire_delay: float = 600.0  # seconds a compacted-away segment stays for readers of old manifests
    request_timeout: float = 5.0  # seconds to wait for the broker or agent to answer
    run_grace: float = 10.0  # seconds `dbguard run` gives a stopped command between SIGTERM and SIGKILL
    # Workers: open databases through the host that serves the project (DBGUARD_REMOTE=1 in a job script).
    remote: bool = False
    serve_retry: float = 120.0  # seconds a worker waits for a holder that still holds the lease to answer
    sync_interval: float = 300.0  # seconds between the agent's syncs of a deployed project folder
    # Where `dbguard up` serves the status page (HOST:PORT; port 0: any free one), or "off".
    web: str = "127.0.0.1:0"

    @property
    def effective_grace(self) -> float:
        return max(self.grace, self.ttl)

    @property
    def host(self) -> str:
        return socket.gethostname()

    @property
    def user(self) -> str:
        return getpass.getuser()


_DAY = 86_400.0
# Seconds: (lowest, highest) each setting accepts. Anything outside is a typo or a unit mix-up
# (milliseconds for seconds), and nan or inf would silently disable what the setting times: a
# broker with TTL nan never expires a dead holder's lease.
BOUNDS: dict[str, tuple[float, float]] = {
    "ttl": (0.1, _DAY),
    "lock_delay": (0.0, _DAY),
    "grace": (0.0, _DAY),  # 0 means one TTL
    "flush_interval": (0.1, 30 * _DAY),
    "retire_delay": (0.0, 30 * _DAY),
    "request_timeout": (0.1, 3600.0),
    "run_grace": (0.0, 3600.0),
    "serve_retry": (0.0, 3600.0),
    "sync_interval": (0.1, 30 * _DAY),
}
_FLOATS = set(BOUNDS)
_PATHS = {"cache", "keys", "state"}
_BOOLS = {"remote"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
NAMES = tuple(f.name for f in fields(Settings))


def check_seconds(name: str, value: Any, origin: str) -> float:
    low, high = BOUNDS[name]
    number = math.nan
    # A TOML `true` is not a number of seconds, though Python would read it as 1.
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # not a number: refused below
            number = float(value)
    if not low <= number <= high:  # also refuses nan (no comparison holds) and inf
        raise UsageError(
            f"{origin}: '{name}' must be a number of seconds from {low:g} to {high:g} "
            f"({_span(high)}), not {value!r}"
        )
    return number


def _span(seconds: float) -> str:
    if seconds >= _DAY:
        return f"{seconds / _DAY:g} day{'s' if seconds > _DAY else ''}"
    return f"{seconds / 3600:g} h"


def _convert(name: str, value: Any, origin: str) -> Any:
    if name in _FLOATS:
        return check_seconds(name, value, origin)
    if name in _BOOLS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise UsageError(f"{origin}: '{name}' must be true or false (1 or 0), not {value!r}")
    if not isinstance(value, str) or not value:
        raise UsageError(f"{origin}: '{name}' must be a non-empty string")
    if name in _PATHS:
        if "\0" in value:  # TOML can carry one; every system call would refuse the path
            raise UsageError(f"{origin}: '{name}' must be a path, and {value!r} holds a NUL character")
        return Path(value).expanduser()
    if name == "broker" and value.startswith("etcd://"):
        from dbguard.lease.etcd import EtcdAddress  # only a site with etcd pays for its client

        try:
            EtcdAddress.parse(value)
        except UsageError as exc:
            raise UsageError(f"{origin}: {exc}") from None
    if name == "broker" and not value.startswith(("tcp://", "etcd://", "ipc://")):
        raise UsageError(
            f"{origin}: broker address {value!r} must look like tcp://host:port "
            "(or etcd://host:port[,host:port...])"
        )
    if name == "broker" and value.startswith("tcp://"):
        # ZeroMQ would refuse it only when a socket connects, with a bare "Invalid argument".
        host, _, port = value[len("tcp://") :].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(
                f"{origin}: broker address {value!r} must look like tcp://host:port with a host and a "
                f"port from 1 to 65535, such as tcp://broker-host:{DEFAULT_PORT}"
            )
    if name == "web" and value != "off":
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise UsageError(
                f"{origin}: 'web' must be HOST:PORT for the status page (port 0: any free port), "
                f"such as 127.0.0.1:8470, or off; not {value!r}"
            )
    if name == "broker" and value.startswith("ipc://") and len(value) == len("ipc://"):
        raise UsageError(f"{origin}: broker address {value!r} names no socket path (ipc:///path/to/socket)")
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read the config file {path}: {exc}; fix or remove it") from exc
    unknown = set(data) - set(NAMES)
    if unknown:
        raise UsageError(
            f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; known ones are {', '.join(NAMES)}"
        )
    return {name: _convert(name, value, str(path)) for name, value in data.items()}


def load(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from every source; ``overrides`` are command-line options (None = not given)."""
    environ = os.environ if environ is None else environ
    # The environment variable is read below with the others, so the cache's own default sees none.
    values: dict[str, Any] = {"cache": default_cache_dir(environ={}), "state": _default_state_dir()}
    values.update(_read_toml(SYSTEM_CONFIG))
    values.update(_read_toml(user_config_path()))
    for name in NAMES:
        raw = environ.get(f"DBGUARD_{name.upper()}")
        if raw:
            values[name] = _convert(name, raw, f"DBGUARD_{name.upper()}")
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _convert(
                name, str(value) if isinstance(value, Path) else value, f"--{name.replace('_', '-')}"
            )
    return replace(Settings(), **values)
