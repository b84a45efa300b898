"""Project identity and the human-readable writer record in ``<project>/.dbguard/``.

Hosts mount one share at different paths, so a project is known by the UUID in
``.dbguard/project.json``, never by its path. ``.dbguard/writer.json`` says who writes the
project now (host, user, since, token) for anyone to ``cat``; the broker stays the authority.
It also keeps the highest token the project has seen, a floor the broker's tokens must exceed
even if the broker's own state is lost.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbguard.durable import fsync_dir, write_synced
from dbguard.errors import IntegrityError, UsageError

MARKER = ".dbguard"
IDENTITY_FILE = "project.json"
WRITER_FILE = "writer.json"


@dataclass(frozen=True)
class Project:
    id: str
    path: Path  # as this host sees it

    @property
    def meta_dir(self) -> Path:
        return self.path / MARKER


def find_root(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` that is a dbguard project, if any."""
    start = start.resolve()
    for candidate in (start, *start.parents):
        if (candidate / MARKER / IDENTITY_FILE).is_file():
            return candidate
    return None


def open_project(path: Path | str | None = None, *, create: bool = False) -> Project:
    """The project at or above ``path`` (default: the current directory).

    With ``create``, a directory that is not yet a project becomes one (as `dbguard init`).
    """
    start = Path(path) if path is not None else Path.cwd()
    if not start.is_dir():
        raise UsageError(f"{start} is not a directory; give the project directory, or cd into it")
    root = find_root(start)
    if root is None:
        if not create:
            raise UsageError(f"{start.resolve()} is not a dbguard project; run `dbguard init {start}` first")
        return init(start)
    return Project(read_identity(root), root)


def read_identity(root: Path) -> str:
    path = root / MARKER / IDENTITY_FILE
    try:
        data = json.loads(path.read_text())
        project_id = str(uuid.UUID(str(data["id"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(
            f"{path} is damaged ({exc.__class__.__name__}: {exc}); it names this project for every "
            "host, so restore it from a backup or from another host's copy rather than re-creating it",
            path=str(path),
        ) from exc
    return project_id


def init(root: Path) -> Project:
    """Make ``root`` a project, or return the project it already is or lies in.

    A directory inside a project is never made a project of its own: two nested projects
    would let two hosts hold leases on overlapping files.

    Two hosts may run this at once over a shared filesystem. The identity is written to a
    private temporary file and then hard-linked into place: link(2) fails if the name exists,
    atomically even over NFS, which is the same trick flufl.lock relies on. The loser reads the
    winner's identity.
    """
    root = root.resolve()
    enclosing = find_root(root)
    if enclosing is not None:
        return Project(read_identity(enclosing), enclosing)
    meta = root / MARKER
    try:
        meta.mkdir(exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create {meta}: {exc.strerror}; the project directory must be writable"
        ) from exc
    target = meta / IDENTITY_FILE
    record = {
        "id": str(uuid.uuid4()),
        "created": _now_text(),
        "created_by": f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}",
        "format": 1,
    }
    temp = meta / f".{IDENTITY_FILE}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    write_synced(temp, (json.dumps(record, indent=2) + "\n").encode())
    try:
        os.link(temp, target)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(meta)
    return Project(read_identity(root), root)


def read_writer_record(project: Project) -> dict[str, Any]:
    """The writer record, or an empty one; a damaged record counts as empty (it is advisory)."""
    try:
        data = json.loads((project.meta_dir / WRITER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def token_floor(project: Project) -> int:
    """The highest fencing token this project's directory has recorded."""
    value = read_writer_record(project).get("last_token", 0)
    return value if isinstance(value, int) and value >= 0 else 0


def write_writer_record(project: Project, *, writer: dict[str, Any] | None, token: int) -> None:
    """Record the current writer (None after a release), atomically by rename.

    A host never lowers the recorded token: one that lost its lease while paused must not
    overwrite its successor's record when it wakes.
    """
    if token < token_floor(project):
        return
    record = {
        "project": project.id,
        "writer": writer,
        "last_token": token,
        "updated": _now_text(),
        "note": "written by dbguard for people to read; the lease broker is the authority",
    }
    temp = project.meta_dir / f".{WRITER_FILE}.{socket.gethostname()}.{os.getpid()}"
    write_synced(temp, (json.dumps(record, indent=2) + "\n").encode())
    os.replace(temp, project.meta_dir / WRITER_FILE)


def _now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
