"""Typed errors that people can act on, the exit code of each, and how each crosses a process.

Every message says what happened, why, and what to do. Subclasses carry the data a program
needs (the holder, the path, the token) and pickle across processes.

Each class is its own definition on the wire, the way py-lmdb gives each error class its
``MDB_NAME`` and builds its error map from them: ``kind`` is the `ErrorKind` a failed reply
carries (``also`` lists older names the broker still sends for it), and the class's fields are
its constructor's keyword parameters, kept as attributes of the same names. ``to_reply`` and
`from_reply` are derived from that, so the agent and the broker encode and the clients decode
from one table, built from the classes: a class that declares no ``kind`` of its own would
arrive as its parent (tests/test_errors.py checks that every class declares one).

Errors met outside dbguard's own code are translated here too, in one place each: the share's
refusals (`share_access`), the node-local cache's errors (`from_cache_error`) and full disks
under the cache directory (`cache_access`).
"""

from __future__ import annotations

import contextlib
import errno as errnos
import functools
import inspect
import os
import pwd
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar, ParamSpec, Self, TypeVar

from dbguard.cache.errors import CacheCorrupt, CacheError, CacheFull, UnsafeCacheLocation
from dbguard.lease.protocol import ErrorKind, reply_error

P = ParamSpec("P")
R = TypeVar("R")


class ExitCode(IntEnum):
    """The documented exit codes of the `dbguard` command (README, "Exit codes")."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    HELD = 3
    UNREACHABLE = 4
    UNSAFE_CACHE = 5
    INTEGRITY = 6
    # A filesystem refused: the share or the cache's disk is full, over quota, read-only, or
    # closed to this user. Nothing was lost; the fix is on that filesystem, not in dbguard.
    REFUSED = 7
    # This host still has unflushed records, so the command stopped short of what it was asked
    # (release, clear, flush without the lease). Nothing was lost, nothing is damaged.
    UNFLUSHED = 8
    # `dbguard run` stopped its command because this host lost the lease while it ran: a code
    # of its own, so that it cannot be mistaken for the command's own exit status.
    STOPPED = 9


# kind -> class, filled as the classes are defined (see GuardError.__init_subclass__).
_BY_KIND: dict[str, type[GuardError]] = {}
# Reply keys that are the envelope, not a field of the error.
_ENVELOPE = frozenset({"v", "id", "ok", "error", "message"})


class GuardError(Exception):
    """Base of every error dbguard raises on purpose."""

    exit_code: ClassVar[ExitCode] = ExitCode.UNEXPECTED
    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    also: ClassVar[tuple[ErrorKind, ...]] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _register(cls)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.__dict__.copy()))

    def __str__(self) -> str:
        return self.message

    def with_remedy(self, python: str, command_line: str) -> Self:
        """Say that ``python``, a remedy in this message written for the Python API (a parameter
        such as ``wait=SECONDS``), reads ``command_line`` for a user of the `dbguard` command."""
        self.__dict__.setdefault("remedies", []).append((python, command_line))
        return self

    def for_command_line(self) -> str:
        """The message with its Python remedies in the command line's terms (flags)."""
        text = self.message
        for python, command_line in self.__dict__.get("remedies", ()):
            text = text.replace(python, command_line)
        return text

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """What this error carries besides its message: its constructor's other parameters."""
        return tuple(_fields(cls))

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def to_reply(self, req_id: str) -> dict[str, Any]:
        """The failed reply that makes `from_reply` raise this error again in another process."""
        return reply_error(req_id, self.kind, self.message, **self.fields())


def _rebuild(cls: type[GuardError], state: dict[str, Any]) -> GuardError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


def _register(cls: type[GuardError]) -> None:
    for kind in (cls.kind, *cls.__dict__.get("also", ())):
        known = _BY_KIND.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"{cls.__qualname__} and {known.__qualname__} both claim the wire kind {kind!r}")
        _BY_KIND[kind] = cls


_BY_KIND[ErrorKind.INTERNAL] = GuardError


_FIELDS: dict[type[GuardError], dict[str, Any]] = {}


def _fields(cls: type[GuardError]) -> dict[str, Any]:
    """name -> type hint of the constructor's parameters after ``message``."""
    found = _FIELDS.get(cls)
    if found is None:
        init = cls.__init__
        hints = typing.get_type_hints(init)
        found = {}
        for name in list(inspect.signature(init).parameters)[2:]:
            if name in _ENVELOPE:
                raise TypeError(f"{cls.__qualname__}.{name} would clash with the reply's envelope")
            found[name] = hints.get(name, Any)
        _FIELDS[cls] = found
    return found


def _fits(hint: Any, value: Any) -> bool:
    """Whether a decoded JSON value has the type the constructor declares for it."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    base = typing.get_origin(hint) or hint
    if base is int or base is float:
        return type(value) is int or (base is float and type(value) is float)  # never a bool
    return isinstance(value, base)


def from_reply(reply: Mapping[str, Any], **defaults: Any) -> GuardError:
    """The typed error of a failed reply, built by the class its ``error`` kind names.

    The server's message is kept as it is. A field the reply lacks, or carries with the wrong
    type, takes its value from ``defaults`` (such as the address the client called) or else
    the constructor's default; an unknown kind (a newer server) gives a plain GuardError.
    """
    cls = _BY_KIND.get(str(reply.get("error")), GuardError)
    message = str(reply.get("message") or "request failed")
    values = {}
    for name, hint in _fields(cls).items():
        for candidate in (reply.get(name), defaults.get(name)):
            if candidate is not None and _fits(hint, candidate):
                values[name] = candidate
                break
    return cls(message, **values)


def error_classes() -> list[type[GuardError]]:
    """Every GuardError class defined so far, the base first."""
    found: list[type[GuardError]] = [GuardError]
    for cls in found:
        found.extend(sub for sub in cls.__subclasses__() if sub not in found)
    return found


# ------------------------------------------------------------------------- the classes


class UsageError(GuardError):
    """The request itself is wrong (a missing option, a path that is not a project)."""

    exit_code = ExitCode.USAGE
    kind = ErrorKind.USAGE
    also = (ErrorKind.BAD_REQUEST, ErrorKind.VERSION)  # the broker's names for a malformed request


class LeaseHeld(GuardError):
    """Another host holds the writer lease; `holder` says who (host, user, since, token)."""

    exit_code = ExitCode.HELD
    kind = ErrorKind.HELD

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class BrokerUnavailable(GuardError):
    """The broker or the local agent did not answer, or cannot grant right now."""

    exit_code = ExitCode.UNREACHABLE
    kind = ErrorKind.UNAVAILABLE
    also = (ErrorKind.GRACE,)  # the broker's restart grace period: retry later, as for no answer

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class UnsafeCachePath(GuardError):
    """The cache directory is on a network filesystem or is not safely ours."""

    exit_code = ExitCode.UNSAFE_CACHE
    kind = ErrorKind.UNSAFE_CACHE

    def __init__(self, message: str, path: str = "", fstype: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.fstype = fstype


class Fenced(GuardError):
    """A write carried a fencing token (`token`) older than one the project has already seen
    (`current`)."""

    exit_code = ExitCode.INTEGRITY
    kind = ErrorKind.FENCED

    def __init__(self, message: str, token: int = 0, current: int = 0) -> None:
        super().__init__(message)
        self.token = token
        self.current = current


class IntegrityError(GuardError):
    """Stored data does not match its checksum, or a state file is damaged or missing."""

    exit_code = ExitCode.INTEGRITY
    kind = ErrorKind.INTEGRITY

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class LeaseLost(GuardError):
    """This host held the writer lease but no longer does (expired, broken or taken over)."""

    exit_code = ExitCode.HELD
    kind = ErrorKind.LOST
    also = (ErrorKind.NOT_HOLDER,)

    def __init__(self, message: str, project: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.project = project
        self.reason = reason


class CommandStopped(LeaseLost):
    """`dbguard run` lost the lease while its command ran, and stopped the command (SIGTERM to
    its process group, SIGKILL after the grace period)."""

    exit_code = ExitCode.STOPPED
    kind = ErrorKind.STOPPED


class NotServed(GuardError):
    """A worker asked for a project through its holder, and no host serves it (nobody holds
    it, or the holder did not run `dbguard serve`)."""

    exit_code = ExitCode.HELD
    kind = ErrorKind.NOT_SERVED

    def __init__(self, message: str, project: str = "") -> None:
        super().__init__(message)
        self.project = project


class HolderUnreachable(BrokerUnavailable):
    """The host that serves a project to workers still holds its lease but has not answered
    for ``serve_retry`` seconds."""

    kind = ErrorKind.HOLDER_UNREACHABLE


class EtcdClusterError(GuardError):
    """A local etcd cluster (`dbguard up --etcd`, the tests) did not start, answer or stop;
    `directory` is the cluster's directory and `member` the index of the member at fault (-1 if
    no single member is)."""

    kind = ErrorKind.ETCD_CLUSTER

    def __init__(self, message: str, directory: str = "", member: int = -1) -> None:
        super().__init__(message)
        self.directory = directory
        self.member = member


class ProjectBusy(GuardError):
    """A process of this host still has the project open for writing (see `dbguard clear`)."""

    exit_code = ExitCode.USAGE
    kind = ErrorKind.BUSY


class AgentAlreadyRunning(GuardError):
    """Another agent already serves this cache directory (`dbguard agent` then has nothing to do)."""

    kind = ErrorKind.AGENT_RUNNING


class ShareRefused(GuardError):
    """The share refused this host a write (or, for permissions, a read) of `path`: the
    filesystem is full, the quota used up, the mount read-only, or the path closed to this user.
    `errno` says which. Nothing was lost: what was not written stays in this host's cache."""

    exit_code = ExitCode.REFUSED
    kind = ErrorKind.SHARE_REFUSED

    def __init__(self, message: str, path: str = "", errno: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class CacheDiskFull(GuardError):
    """The disk of the node-local cache directory (`path`) has no room left for a write."""

    exit_code = ExitCode.REFUSED
    kind = ErrorKind.CACHE_FULL

    def __init__(self, message: str, path: str = "", errno: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class UnflushedData(GuardError):
    """This host still has `unflushed` bytes of `project` that are not in the project store,
    so the command stopped short (a release, a clear, a flush without the lease). Not damage:
    nothing was lost, and the message says what to do."""

    exit_code = ExitCode.UNFLUSHED
    kind = ErrorKind.UNFLUSHED

    def __init__(self, message: str, project: str = "", unflushed: int = 0) -> None:
        super().__init__(message)
        self.project = project
        self.unflushed = unflushed


# ------------------------------------------------------------ the cache's own errors

# The cache package knows nothing of dbguard; each of its errors becomes the GuardError that
# carries the same facts (fields of the same names), at the boundary where dbguard calls it.
_FROM_CACHE: dict[type[CacheError], type[GuardError]] = {
    UnsafeCacheLocation: UnsafeCachePath,
    CacheCorrupt: IntegrityError,
    CacheFull: CacheDiskFull,
    CacheError: GuardError,
}


def from_cache_error(exc: CacheError) -> GuardError:
    cls = next(_FROM_CACHE[base] for base in type(exc).__mro__ if base in _FROM_CACHE)
    values = {name: getattr(exc, name) for name in cls.field_names() if hasattr(exc, name)}
    return cls(str(exc), **values)


def cache_errors_translated(func: Callable[P, R]) -> Callable[P, R]:
    """Decorate an entry point of the Python API: errors of the cache become GuardErrors."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CacheError as exc:
            raise from_cache_error(exc) from exc

    return wrapper


# Room on the disk of the cache directory, when dbguard itself writes there (local copies of
# segments, lock files, the agent's lease table): the cache package's own writes say so with
# CacheFull, these with the same advice.
NO_ROOM = frozenset(
    {
        errnos.ENOSPC,  # the disk is full
        errnos.EDQUOT,  # this user's quota on it is used up
    }
)


def cache_disk_full(cache_dir: Path | str, exc: OSError) -> GuardError | None:
    """CacheDiskFull if ``exc`` says the disk of the cache directory is full, else None."""
    if exc.errno not in NO_ROOM:
        return None
    full = CacheFull(str(cache_dir), exc.errno, f"writing {exc.filename or cache_dir}: {exc.strerror}")
    return from_cache_error(full)


@contextlib.contextmanager
def cache_access(cache_dir: Path | str) -> Iterator[None]:
    """Turn a full disk under the cache directory into CacheDiskFull; re-raise anything else."""
    try:
        yield
    except OSError as exc:
        full = cache_disk_full(cache_dir, exc)
        if full is None:
            raise
        raise full from exc


# -------------------------------------------------------------- the share's refusals

# Why the share may refuse this host an operation. Each is a property of the filesystem or of
# the user, not of the request: retrying without fixing it fails the same way, and nothing was
# lost (the cache keeps what was not flushed).
SHARE_REFUSALS: dict[int, str] = {
    # Reported at write, at close or (NFS) only at fsync; the project store fsyncs before it
    # publishes, so this is always met before a generation names the data.
    errnos.ENOSPC: "the filesystem is full",
    # Quotas (NFS, Lustre, CIFS) count per user or per group: another user may still write.
    errnos.EDQUOT: "this user's disk quota there is used up",
    # A read-only export or mount, or a filesystem the kernel remounted read-only after errors.
    errnos.EROFS: "the filesystem is mounted read-only",
    errnos.EACCES: "this user may not read or write there",
    # sshfs (SFTP) reports every refused permission as EPERM, and so do immutable files.
    errnos.EPERM: "this user may not read or write there",
}


def _share_fix(code: int, where: Path) -> str:
    if code == errnos.ENOSPC:
        return "Free some space there"
    if code == errnos.EDQUOT:
        return "Free some of this user's space there, or ask for a larger quota"
    if code == errnos.EROFS:
        return "Remount it read-write (or ask its administrator to)"
    try:
        user = f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except KeyError:
        user = f"uid {os.geteuid()}"
    # The directory to change: one on the way that is closed to this user, or else the nearest
    # that exists (a file or directory that could not be created is refused by its parent).
    blocker = _closed_directory(where) or next((p for p in (where, *where.parents) if p.exists()), where)
    return (
        f"Make {blocker} readable and writable for this user, {user}, or for its group (ask its "
        f"owner{_owner(blocker)}), or run dbguard as a user who may"
    )


def _closed_directory(path: Path) -> Path | None:
    """The directory on the way to ``path`` whose permissions keep this user out, if one does."""
    for step in (*reversed(path.parents[:-1]), path):
        try:
            os.stat(step)
        except PermissionError:
            return step.parent
        except OSError:
            return None
    return None


def _owner(path: Path) -> str:
    try:
        st = os.stat(path)
        name = pwd.getpwuid(st.st_uid).pw_name
    except (OSError, KeyError):
        return ""
    return f", {name}; it has mode {st.st_mode & 0o7777:04o}"


def share_refused(path: Path | str, exc: OSError, then: str) -> GuardError | None:
    """The GuardError for an OSError met on the share at or under ``path``, or None if this
    module does not recognise it (the caller re-raises it). ``then`` says what to do once the
    cause is fixed and what state things are in, such as "run `dbguard flush` again"."""
    where = Path(exc.filename) if exc.filename else Path(path)
    if exc.errno in SHARE_REFUSALS:
        return ShareRefused(
            f"the share refused access to {where}: {exc.strerror} ({SHARE_REFUSALS[exc.errno]}). "
            f"{_share_fix(exc.errno, where)}; {then}",
            path=str(where),
            errno=exc.errno,
        )
    if exc.errno in (errnos.ENOTDIR, errnos.EEXIST):
        # Only dbguard makes the directories under .dbguard: a file where one of them should be
        # was put there by something else (a copy gone wrong, a stray command). ENOTDIR when a
        # path goes through it, EEXIST when dbguard makes the directory (mkdir(exist_ok=True)).
        blocker = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            if exc.errno == errnos.EEXIST:
                return None  # not a file in the way: the caller's own business
            blocker = where
        return IntegrityError(
            f"{blocker} is a file where dbguard keeps a directory, so the project cannot be read or "
            f"written there; move that file aside and restore the directory from a backup or from "
            f"another host's copy",
            path=str(blocker),
        )
    if exc.errno == errnos.EISDIR:
        # And a directory where dbguard keeps a file (its records, manifests, segments). A rename
        # onto it names the directory second.
        blocker = next((Path(p) for p in (exc.filename2, exc.filename) if p and Path(p).is_dir()), where)
        return IntegrityError(
            f"{blocker} is a directory where dbguard keeps a file, so the project cannot be read or "
            f"written there; move that directory aside and run the command again (dbguard writes the "
            f"writer record writer.json anew; restore any other file from a backup or from another "
            f"host's copy)",
            path=str(blocker),
        )
    return None


def share_failure(path: Path | str, exc: OSError, then: str) -> GuardError:
    """Like `share_refused`, for an operation whose every failure must become a GuardError (the
    agent's work after a grant): what `share_refused` does not recognise (an I/O error, a stale
    handle) is the share failing the operation, which the user fixes there as a refusal."""
    known = share_refused(path, exc, then)
    if known is not None:
        return known
    where = exc.filename or path
    return ShareRefused(
        f"the share failed an operation on {where}: {exc.strerror or exc}. Check the share and its "
        f"mount on this host; {then}",
        path=str(where),
        errno=exc.errno or 0,
    )


@contextlib.contextmanager
def share_access(path: Path | str, then: str) -> Iterator[None]:
    """Turn the share's refusals of operations at or under ``path`` into GuardErrors (see
    `share_refused`); re-raise what is not recognised."""
    try:
        yield
    except OSError as exc:
        error = share_refused(path, exc, then)
        if error is None:
            raise
        raise error from exc
