"""The histories of a chaos run, and its progress log.

Every party of a run appends what it does to a history file of JSON lines, each flushed and
fsynced before the call returns, so that it survives a crash of the host: the clients (one file
each, in their host's /tmp), the nemesis (``faults.jsonl``) and the harness's status poller
(``status.jsonl``). The nemesis tails the writers' histories while the run goes on (`Tail`); the
checker reads them all afterwards (`read_jsonl`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


class History:
    """JSON lines, each flushed and fsynced before the call returns."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  # lives as long as the process
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ev": event, "t": time.monotonic(), "wall": time.time(), **fields})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())


class Tail:
    """The whole lines appended to a history file since this object was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):  # the rest of a line begun before we started
                events.append(json.loads(line))
        return events


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every whole line; a line cut short by a crash (only ever the last one) is skipped."""
    events = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as handle:
        for line in handle:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def log(message: str) -> None:
    """A line of progress on stderr, for a person watching the run (the checker reads none)."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
