"""Whether this host may write a project, checked without a round trip per image.

The agent keeps the leases it holds in ``leases.json`` in the cache directory and rewrites it
(atomically, by rename) whenever one is granted, lost or released. A writing process reads it
when it opens a database and then only stats it, at most every `RECHECK` seconds: a lost lease
is noticed within that time, and a write that slips through is still fenced at flush time and
kept aside (invariants 2 and 5), so the check is about telling the user early, not about safety.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dbguard.agent.server import LEASES_NAME, read_saved_leases
from dbguard.data.project import Project, read_writer_record
from dbguard.errors import LeaseHeld, LeaseLost

RECHECK = 0.5  # seconds


class WriterGuard:
    def __init__(self, cache_root: Path, project: Project) -> None:
        self.path = cache_root / LEASES_NAME
        self.project = project
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self.lease: dict[str, Any] = {}

    def check(self) -> dict[str, Any]:
        """This host's lease on the project, or raise LeaseHeld / LeaseLost saying what to do."""
        now = time.monotonic()
        if now < self._next_check and self.lease:
            return self.lease
        self._next_check = now + RECHECK
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or not self.lease:
            self._stamp = stamp
            self.lease = self._read()
        state = self.lease.get("state")
        if state == "held":
            return self.lease
        if state in ("lost", "uncertain"):
            raise LeaseLost(
                f"this host no longer holds the writer lease of {self.project.path} "
                f"({self.lease.get('reason') or state}); what was written since is kept aside. "
                "Run `dbguard status` to see who holds it",
                project=self.project.id,
                reason=str(self.lease.get("reason") or state),
            )
        writer = (read_writer_record(self.project).get("writer")) or {}
        holder = f" (the writer is {writer.get('user')} on {writer.get('host')})" if writer else ""
        raise LeaseHeld(
            f"this host does not hold the writer lease of {self.project.path}{holder}; run "
            f"`dbguard acquire {self.project.path}` first, or open it with mode 'r' to browse",
            holder=writer,
        )

    def _read(self) -> dict[str, Any]:
        for lease in read_saved_leases(self.path.parent):
            if lease["project"] == self.project.id:
                return lease
        return {}
