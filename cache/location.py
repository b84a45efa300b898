"""Where the node-local cache may live, and making that directory safe to use.

The cache is an LMDB environment. LMDB keeps its reader table and writer mutex in a
memory-mapped lock file and reads data through a shared mmap, so it needs a filesystem
whose mmap and locks are coherent, and the cache must by design belong to one host.
Network and cluster filesystems give neither guarantee (docs/design.md, invariant 6), so
they are refused before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# No stubs for psutil in the dev environment; the ignore stays harmless if they appear.
import psutil  # type: ignore[import-untyped, unused-ignore]

from .errors import UnsafeCacheLocation

NETWORK_FILESYSTEMS: frozenset[str] = frozenset(
    {
        # NFS: close-to-open consistency only; the client caches pages and attributes,
        # so an mmap on one host does not see writes from another, and locks go
        # through lockd/NLM, which LMDB's shared-memory lock table cannot use.
        "nfs",
        "nfs4",
        # SMB/CIFS: client caching governed by oplocks/leases, byte-range locks with
        # Windows semantics; no coherent shared mmap.
        "cifs",
        "smb3",
        "smbfs",
        "smb",
        # sshfs: no locking at all, kernel page cache with timeouts.
        "fuse.sshfs",
        "sshfs",
        # Cluster and parallel filesystems: shared between nodes by design, client-side
        # caching, and mmap coherence across nodes is not promised; a cache there would
        # be one LMDB written by several hosts.
        "ceph",
        "fuse.ceph",
        "fuse.ceph-fuse",
        "glusterfs",
        "fuse.glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ocfs2",
        "gfs2",
        "panfs",
        "wekafs",
        # Host/remote shares: 9p (virtio, plan9) caches per client; AFS and Coda cache
        # whole files and write back on close; WebDAV and NCP are remote file servers.
        "9p",
        "afs",
        "coda",
        "ncpfs",
        "davfs",
        "fuse.davfs2",
        "vboxsf",
        "fuse.vmhgfs-fuse",
        # Object stores behind FUSE: not POSIX; writes are uploaded on close and mmap
        # writes are not coherent.
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.gcsfuse",
    }
)

# The default directory sits in /tmp, as EMAN2's database cache did: node-local on
# cluster nodes and workstations alike.
_DEFAULT_PARENT = "/tmp"
_ENV_VAR = "DBGUARD_CACHE"
_FIX = f"set {_ENV_VAR} to a local disk such as /tmp"


@dataclass(frozen=True)
class MountEntry:
    """One line of the mount table."""

    mountpoint: str
    fstype: str
    source: str


def mount_table() -> list[MountEntry]:
    """Return the mount table of this host, in mount order."""
    return [
        MountEntry(mountpoint=p.mountpoint, fstype=p.fstype, source=p.device)
        for p in psutil.disk_partitions(all=True)
    ]


def _real_path(path: str | Path) -> str:
    # Non-strict realpath resolves every component that exists (dangling links to
    # their target) and keeps a missing tail as written: for a directory not created
    # yet, that is the nearest existing ancestor, resolved, plus the tail.
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _is_under(path: str, mountpoint: str) -> bool:
    # Component-wise: /home2 is not under /home.
    mp = mountpoint.rstrip("/")
    return path == mp or path.startswith(mp + "/") or mp == ""


def find_mount(path: str | Path, table: Sequence[MountEntry] | None = None) -> MountEntry:
    """Return the mount entry that holds ``path`` (which need not exist yet).

    The entry is the one with the longest mount point that is a component-wise prefix
    of the real path; among entries with the same mount point the last one wins,
    because it was mounted on top of the others. With no matching entry the
    filesystem type cannot be checked, so :class:`UnsafeCacheLocation` is raised
    (fail closed).
    """
    real = _real_path(path)
    entries = mount_table() if table is None else table
    best: MountEntry | None = None
    for entry in entries:
        if not _is_under(real, entry.mountpoint):
            continue
        # ">=" lets a later entry on the same mount point replace an earlier one.
        if best is None or len(entry.mountpoint.rstrip("/")) >= len(best.mountpoint.rstrip("/")):
            best = entry
    if best is None:
        raise UnsafeCacheLocation(
            str(path),
            "unknown",
            "",
            "",
            f"is not under any mount point of the mount table: its filesystem type cannot be checked; {_FIX}",
        )
    return best


def is_network_fstype(fstype: str) -> bool:
    """Whether ``fstype`` names a network, cluster or remote filesystem."""
    name = fstype.lower()
    if name in NETWORK_FILESYSTEMS or name.startswith("nfs"):
        return True
    # FUSE filesystems show up as "fuse.<subtype>"; the subtype tells what is behind.
    return name.startswith("fuse.") and name.removeprefix("fuse.") in NETWORK_FILESYSTEMS


def check_not_network(path: str | Path, table: Sequence[MountEntry] | None = None) -> MountEntry:
    """Return the mount entry of ``path``; raise if it is a network filesystem."""
    entry = find_mount(path, table)
    if is_network_fstype(entry.fstype):
        raise UnsafeCacheLocation(
            str(path),
            entry.fstype,
            entry.source,
            entry.mountpoint,
            f"is on {entry.fstype} ({entry.source} mounted at {entry.mountpoint}): "
            f"a network filesystem cannot hold the cache; {_FIX}",
        )
    return entry


def _user_name() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        # No login name in the environment and no passwd entry (containers).
        name = str(os.geteuid())
    # The name comes from $LOGNAME/$USER and ends up as a path component.
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or str(os.geteuid())


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return ``$DBGUARD_CACHE`` if set and non-empty, else ``/tmp/dbguard-<user>``."""
    env = os.environ if environ is None else environ
    configured = env.get(_ENV_VAR, "")
    if configured:
        return Path(configured).expanduser()
    return Path(_DEFAULT_PARENT) / f"dbguard-{_user_name()}"


def _unsafe(path: Path, table: Sequence[MountEntry] | None, reason: str) -> UnsafeCacheLocation:
    entry = find_mount(path, table)
    return UnsafeCacheLocation(str(path), entry.fstype, entry.source, entry.mountpoint, reason)


def _refuse_symlink(path: Path, table: Sequence[MountEntry] | None) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(
            path,
            table,
            f"is a symlink to {os.readlink(path)}: another user could redirect the "
            f"cache; remove it or set {_ENV_VAR}",
        )


def _make_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Made by someone else between our checks? _secure() inspects what is there.
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


def _open_dir_nofollow(path: Path, table: Sequence[MountEntry] | None) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            # Replaced by a symlink after our lstat.
            _refuse_symlink(path, table)
        if exc.errno == errno.ENOTDIR:
            raise _unsafe(path, table, f"is not a directory: remove it or set {_ENV_VAR}") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            # Another user's cache: its 0700 keeps this one out before ownership can be checked.
            _refuse_foreign(path, os.lstat(path).st_uid, table)
        raise


def _refuse_foreign(path: Path, uid: int, table: Sequence[MountEntry] | None) -> None:
    if uid != os.geteuid():
        raise _unsafe(
            path,
            table,
            f"is owned by uid {uid}, not by you (uid {os.geteuid()}): its owner "
            f"could read or replace cached data; remove it or set {_ENV_VAR}",
        )


def _secure(path: Path, table: Sequence[MountEntry] | None) -> None:
    # Checks run on an fd opened with O_NOFOLLOW, so the directory cannot be swapped
    # for a symlink between the check and the chmod.
    fd = _open_dir_nofollow(path, table)
    try:
        st = os.fstat(fd)
        _refuse_foreign(path, st.st_uid, table)
        # Group/other bits are the danger; owner bits are restored too, since a cache
        # we cannot write is as useless as one others can.
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def prepare_cache_dir(path: str | Path, table: Sequence[MountEntry] | None = None) -> Path:
    """Create (if needed) and vet the cache directory; return its real path.

    The filesystem type is checked before anything is created. The directory must
    not be a symlink and must be owned by the effective user; its mode is set to
    0700. Raises :class:`UnsafeCacheLocation` when any of this fails.
    """
    check_not_network(path, table)
    target = Path(os.path.abspath(os.fspath(path)))
    try:
        _refuse_symlink(target, table)
        _make_dir(target)
        _refuse_symlink(target, table)
        _secure(target, table)
    except PermissionError as exc:
        # A directory on the way that another user's permissions close to this one.
        raise _unsafe(
            target,
            table,
            f"cannot be reached or made by this user (uid {os.geteuid()}): {exc.strerror} at "
            f"{exc.filename or target}; set {_ENV_VAR} to a directory of your own on a local disk "
            f"such as /tmp",
        ) from exc
    real = Path(os.path.realpath(target))
    check_not_network(real, table)
    return real
