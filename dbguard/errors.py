"""Typed errors that people can act on, and the exit code of each.

Every message says what happened, why, and what to do. Subclasses carry the data a program
needs (the holder, the path, the token) and pickle across processes, so the agent can raise
one in a user's process.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """The documented exit codes of the `dbguard` command (DESIGN.md, "User-facing contract")."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    HELD = 3
    UNREACHABLE = 4
    UNSAFE_CACHE = 5
    INTEGRITY = 6


class GuardError(Exception):
    """Base of every error dbguard raises on purpose."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.__dict__.copy()))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[GuardError], state: dict[str, Any]) -> GuardError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class UsageError(GuardError):
    """The request itself is wrong (a missing option, a path that is not a project)."""

    exit_code = ExitCode.USAGE


class LeaseHeld(GuardError):
    """Another host holds the writer lease; `holder` says who (host, user, since, token)."""

    exit_code = ExitCode.HELD

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class BrokerUnavailable(GuardError):
    """The broker or the local agent did not answer, or cannot grant right now."""

    exit_code = ExitCode.UNREACHABLE

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class UnsafeCachePath(GuardError):
    """The cache directory is on a network filesystem or is not safely ours."""

    exit_code = ExitCode.UNSAFE_CACHE

    def __init__(self, message: str, path: str = "", fstype: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.fstype = fstype


class Fenced(GuardError):
    """A write carried a fencing token older than one the project has already seen."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, message: str, token: int = 0, current: int = 0) -> None:
        super().__init__(message)
        self.token = token
        self.current = current


class IntegrityError(GuardError):
    """Stored data does not match its checksum, or a state file is damaged."""

    exit_code = ExitCode.INTEGRITY

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class LeaseLost(GuardError):
    """This host held the writer lease but no longer does (expired, broken or taken over)."""

    exit_code = ExitCode.HELD

    def __init__(self, message: str, project: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.project = project
        self.reason = reason


class EtcdClusterError(GuardError):
    """A local etcd cluster (`dbguard up --etcd`, the tests) did not start, answer or stop;
    `directory` is the cluster's directory and `member` the index of the member at fault (-1 if
    no single member is)."""

    def __init__(self, message: str, directory: str = "", member: int = -1) -> None:
        super().__init__(message)
        self.directory = directory
        self.member = member


class ProjectBusy(GuardError):
    """A process of this host still has the project open for writing (see `dbguard clear`)."""

    exit_code = ExitCode.USAGE
