"""Reading a file's bytes as its storage holds them, past this host's page cache.

`clear` drops the last copy of a project's records outside the share, so before it does, it
reads back what the flush wrote. A plain read may be answered from this host's page cache:
the client cache of NFS, CIFS or FUSE (sshfs), which still holds the pages the flush wrote, or
on a local disk pages that were never read back from the device. Neither shows damage done on
the server or the disk after the write.

- O_DIRECT reads go to the server (NFS, FUSE) or the device, bypassing the page cache. They
  need the buffer, the offset and the length aligned to the logical block size: 4096 covers
  every Linux filesystem, and an anonymous mmap is page aligned.
- Where O_DIRECT is refused (see ``_NO_DIRECT``), the file is opened normally and
  posix_fadvise(POSIX_FADV_DONTNEED) first drops this file's clean cached pages, so that the
  reads that follow fetch them again from the server or the device.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

# Logical block size that satisfies O_DIRECT on every Linux filesystem (most need 512).
ALIGN = 4096
# One read request: large enough to stream at the device's speed, small enough to keep memory flat.
CHUNK = 8 << 20
# Ranges closer than this are read in one request, the gap with them: a second request costs more.
GAP = 1 << 20

DIRECT = "O_DIRECT"
DROPPED = "POSIX_FADV_DONTNEED"

# O_DIRECT refused: EINVAL from open(2) where the filesystem has no direct I/O (tmpfs before
# Linux 6.6, some FUSE filesystems) or from read(2) when it wants a larger alignment than
# ALIGN; EOPNOTSUPP from some FUSE and 9p filesystems.
_NO_DIRECT = (errno.EINVAL, errno.EOPNOTSUPP)


class UncachedFile:
    """A file opened for reads that this host's page cache cannot answer; ``method`` says how."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.method = DIRECT
        self.bytes_read = 0
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in _NO_DIRECT:
                raise
            self._fd = self._open_dropped()
        self.size = os.fstat(self._fd).st_size
        self._buffer = mmap.mmap(-1, CHUNK)
        self._view = memoryview(self._buffer)

    def _open_dropped(self) -> int:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            os.close(fd)
            raise
        self.method = DROPPED
        return fd

    def _read(self, offset: int, length: int) -> memoryview:
        """Up to ``length`` bytes (at most CHUNK) from ``offset``, fewer only at the end of the
        file. With O_DIRECT both must be multiples of ALIGN."""
        done = 0
        while done < length:
            try:
                got = os.preadv(self._fd, [self._view[done:length]], offset + done)
            except OSError as exc:
                if self.method != DIRECT or exc.errno not in _NO_DIRECT:
                    raise
                os.close(self._fd)
                self._fd = self._open_dropped()
                continue
            if got == 0:
                break
            done += got
        self.bytes_read += done
        return self._view[:done]

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at ``offset`` (fewer at the end of the file); for small reads such as a trailer."""
        out = bytearray()
        for _, piece in self.pieces([(offset, length)]):
            out += piece
        return bytes(out)

    def pieces(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(i, piece)`` for consecutive pieces of every ``ranges[i] = (offset, length)``,
        reading the file once from the first range to the last. Ranges must be sorted and must
        not overlap. A range that runs past the end of the file gets fewer bytes than it asked
        for. A piece is valid only until the next one is yielded."""
        i = 0
        while i < len(ranges):
            # One span: this range and every next one that starts within GAP of its end.
            j = i
            end = ranges[i][0] + ranges[i][1]
            while j + 1 < len(ranges) and ranges[j + 1][0] - end <= GAP:
                j += 1
                end = max(end, ranges[j][0] + ranges[j][1])
            position = ranges[i][0] - ranges[i][0] % ALIGN
            stop = -(-end // ALIGN) * ALIGN
            k = i
            while position < stop and k <= j:
                data = self._read(position, min(CHUNK, stop - position))
                top = position + len(data)
                while k <= j:
                    start, length = ranges[k]
                    low, high = max(start, position), min(start + length, top)
                    if low < high:
                        yield k, data[low - position : high - position]
                    if start + length > top:
                        break  # continues in the next chunk
                    k += 1
                if len(data) < min(CHUNK, stop - position):
                    return  # the end of the file: later ranges get nothing
                position = top
            i = j + 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(BufferError):  # a caller still holds a piece; freed with it
            self._view.release()
            self._buffer.close()

    def __enter__(self) -> UncachedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
