"""Settings, strongest first: command-line options, environment, ~/.config/dbguard/config.toml,
/etc/dbguard/config.toml, then the defaults below.

Every setting has one name used everywhere: ``ttl`` is the ``--ttl`` option, ``DBGUARD_TTL`` in
the environment and ``ttl = 30`` in a config file.
"""

from __future__ import annotations

import getpass
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cache import default_cache_dir
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

    @property
    def effective_grace(self) -> float:
        return max(self.grace, self.ttl)

    @property
    def host(self) -> str:
        return socket.gethostname()

    @property
    def user(self) -> str:
        return getpass.getuser()


_FLOATS = {"ttl", "lock_delay", "grace", "flush_interval", "retire_delay", "request_timeout"}
_PATHS = {"cache", "keys", "state"}
NAMES = tuple(f.name for f in fields(Settings))


def _convert(name: str, value: Any, origin: str) -> Any:
    if name in _FLOATS:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{origin}: '{name}' must be a number of seconds, not {value!r}") from None
        if number < 0 or (name == "ttl" and number == 0):
            raise UsageError(f"{origin}: '{name}' must be {'positive' if name == 'ttl' else 'zero or more'}")
        return number
    if not isinstance(value, str) or not value:
        raise UsageError(f"{origin}: '{name}' must be a non-empty string")
    if name in _PATHS:
        return Path(value).expanduser()
    if name == "broker" and value.startswith("etcd://"):
        from dbguard.etcd_leases import EtcdAddress  # only a site with etcd pays for its client

        try:
            EtcdAddress.parse(value)
        except UsageError as exc:
            raise UsageError(f"{origin}: {exc}") from None
    if name == "broker" and not value.startswith(("tcp://", "etcd://", "ipc://")):
        raise UsageError(
            f"{origin}: broker address {value!r} must look like tcp://host:port "
            "(or etcd://host:port[,host:port...])"
        )
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
