"""Copying one file, link or directory between a deployment and the share so that a reader on
another host sees the old file or the new one, never a torn one: the bytes go to a temporary
name in the same directory, are fsynced, get the source's mode and modification time, and only
then take the final name (a rename, atomic on NFS and sshfs too). The CRC-32 of the bytes is
taken on the way, for undeploy's final check, without a second pass over the data."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from zlib_ng.zlib_ng import crc32

from dbguard.stage.tree import TEMP_PREFIX, Item

_CHUNK = 4 << 20
# Before a name is published (a rename or an unlink on the share): raises if this host may no
# longer publish (its lease fenced off). A sync passes its fence check; a deploy passes nothing.
BeforePublish = Callable[[], None]


def _temp_beside(target: Path) -> Path:
    return target.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{target.name}"[:255])


def copy_file(
    source: Path,
    target: Path,
    item: Item,
    *,
    before_publish: BeforePublish | None = None,
    progress: Callable[[int], None] | None = None,
    uncached: bool = False,
) -> int:
    """Copy ``source`` (whose scan is ``item``) to ``target`` atomically; its CRC-32.
    ``uncached`` reads the source past this host's page cache (a share's file that this host's
    client may remember as it was)."""
    temp = _temp_beside(target)
    crc = 0
    try:
        with open(temp, "wb", buffering=0) as writer:
            for chunk in _chunks(source, uncached, item.size):
                crc = crc32(chunk, crc)
                written = 0
                while written < len(chunk):
                    written += writer.write(chunk[written:]) or 0
                if progress is not None:
                    progress(len(chunk))
            os.fchmod(writer.fileno(), item.mode)
            os.fsync(writer.fileno())
        os.utime(temp, ns=(item.mtime_ns, item.mtime_ns))
        if before_publish is not None:
            before_publish()
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return crc


def _chunks(source: Path, uncached: bool, size: int = _CHUNK) -> Iterator[memoryview]:
    if uncached:
        from dbguard.data.uncached import UncachedFile

        with UncachedFile(source) as handle:
            # To the end of the file, whatever size this host's client remembers for it.
            for _, piece in handle.pieces([(0, 1 << 60)]):
                yield piece
        return
    buffer = bytearray(max(4096, min(_CHUNK, size + 1)))  # a small file needs no 4 MiB buffer
    view = memoryview(buffer)
    with open(source, "rb", buffering=0) as reader:
        with contextlib.suppress(OSError, AttributeError):  # advice only
            os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := reader.readinto(buffer):
            yield view[:n]


def file_crc(path: Path, *, uncached: bool = False) -> int:
    """The CRC-32 of a file's bytes; ``uncached`` reads past this host's page cache (what the
    share holds, not what this host remembers writing)."""
    if uncached:
        from dbguard.data.uncached import UncachedFile

        crc = 0
        with UncachedFile(path) as handle:
            for _, piece in handle.pieces([(0, handle.size)]):
                crc = crc32(piece, crc)
        return crc
    crc = 0
    with open(path, "rb", buffering=0) as reader:
        while chunk := reader.read(_CHUNK):
            crc = crc32(chunk, crc)
    return crc


def make_link(target: Path, item: Item, *, before_publish: BeforePublish | None = None) -> bool:
    """Make ``target`` a symbolic link to ``item.target`` (atomically replacing what is there);
    False if the filesystem cannot hold symbolic links (it is then recorded instead)."""
    temp = _temp_beside(target)
    try:
        os.symlink(item.target, temp)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    try:
        if before_publish is not None:
            before_publish()
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return True


def make_dir(target: Path, item: Item, *, before_publish: BeforePublish | None = None) -> None:
    if before_publish is not None:
        before_publish()
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()
    target.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(target, item.mode or 0o755)


def remove(target: Path, item: Item, *, before_publish: BeforePublish | None = None) -> None:
    """Remove a file, link or (empty) directory that a sync found deleted."""
    if before_publish is not None:
        before_publish()
    try:
        if item.kind == "dir" and not target.is_symlink():
            target.rmdir()
        else:
            target.unlink()
    except FileNotFoundError:
        pass
