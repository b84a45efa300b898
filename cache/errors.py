"""Errors raised by the node-local cache.

Each error carries the facts a caller needs to act (path, filesystem type, mount) and
pickles, because the agent reports errors to user processes and multiprocessing
workers re-raise them in their parent (filelock's ``Timeout`` defines ``__reduce__``
for the same reason).
"""

from __future__ import annotations

from typing import Any


class CacheError(Exception):
    """Base of every error the cache raises on purpose."""


class UnsafeCacheLocation(CacheError):
    """The cache directory cannot be trusted to hold an LMDB environment.

    ``reason`` is the clause that follows the path in the message: what is wrong,
    why it matters and what to do, for example ``"is on nfs4 (server:/export mounted
    at /home): a network filesystem cannot hold the cache; set DBGUARD_CACHE to a
    local disk such as /tmp"``. ``fstype``, ``mount_source`` and ``mountpoint``
    describe the mount the directory lives on, whatever the reason.
    """

    def __init__(self, path: str, fstype: str, mount_source: str, mountpoint: str, reason: str) -> None:
        self.path = path
        self.fstype = fstype
        self.mount_source = mount_source
        self.mountpoint = mountpoint
        self.reason = reason
        super().__init__(f"cache directory {path} {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.path, self.fstype, self.mount_source, self.mountpoint, self.reason),
        )


class CacheCorrupt(CacheError):
    """An LMDB environment of the cache will not open or is damaged."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"cache environment {path} is damaged or is not an LMDB environment "
            f"({detail}): its entries cannot be read, so `dbguard clear` will not drop it; "
            f"move the directory aside (keep it: it may hold records never flushed) and a "
            f"fresh cache is made for the project"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.detail))


class CacheFull(CacheError):
    """The disk (or this user's quota on it) that holds the cache directory ``path`` has no
    room left: a write failed and was undone; ``errno`` and ``detail`` say what refused."""

    def __init__(self, path: str, errno: int, detail: str) -> None:
        self.path = path
        self.errno = errno
        self.detail = detail
        super().__init__(
            f"the disk of the cache directory {path} has no room left ({detail}); that write "
            f"did not happen and nothing written before it was lost. Free space on that disk "
            f"(`dbguard clear PROJECT` drops the cache of a project once it is flushed; "
            f"`dbguard recover` lists data kept aside in {path}/aside), or set DBGUARD_CACHE "
            f"to a local disk with more room once this host has nothing unflushed (unflushed "
            f"records are flushed from {path} only)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.errno, self.detail))


class DirtyNotAnnounced(CacheError):
    """A store opened with ``require_announced`` was asked to make a clean project dirty before
    its owner announced it (`CacheStore.announce`). Nothing was written.

    The owner (dbguard's agent) must tell whoever needs to know that this host is about to
    hold unflushed data before the first such write is acknowledged; the writer announces,
    then writes again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"cache environment {path} must be announced dirty before it is written")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path,))
