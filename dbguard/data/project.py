"""Project identity and the human-readable writer record in ``<project>/.dbguard/``.

Hosts mount one share at different paths, so a project is known by the UUID in
``.dbguard/project.json``, never by its path. ``.dbguard/writer.json`` says who writes the
project now (host, user, since, token) for anyone to ``cat``; the broker stays the authority.
It also keeps the highest token the project has seen, a floor the broker's tokens must exceed
even if the broker's own state is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbguard.data.durable import fsync_dir, write_synced
from dbguard.data.store import ProjectStore
from dbguard.errors import GuardError, IntegrityError, UsageError, share_access

MARKER = ".dbguard"
# What to do once the share lets this host in again (dbguard.errors names its refusals).
_AFTER_READ = "then run the command again"
_AFTER_INIT = "then run the command again; nothing was created"
_AFTER_WRITER_RECORD = (
    "then run `dbguard acquire` again. This host did not become the writer: a writer must be able "
    "to write the project's .dbguard directory"
)
IDENTITY_FILE = "project.json"
WRITER_FILE = "writer.json"


@dataclass(frozen=True)
class Project:
    id: str
    path: Path  # as this host sees it
    # What a person should know about how the id was found: set when project.json was lost and
    # the id came from the project store instead (and whether project.json was written again).
    recovered: str = field(default="", compare=False)

    @property
    def meta_dir(self) -> Path:
        return self.path / MARKER


def find_root(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` that is a dbguard project, if any: one with
    its identity file, or with a project store that survived the loss of that file."""
    start = start.resolve()
    for candidate in (start, *start.parents):
        if (candidate / MARKER / IDENTITY_FILE).is_file() or _has_store(candidate):
            return candidate
    return None


def _has_store(root: Path) -> bool:
    """Whether ``root`` holds a project store with at least one manifest (cheap when not)."""
    store = ProjectStore(root, "")
    if not store.manifests_dir.is_dir():
        return False
    try:
        return bool(store.generations())
    except GuardError:
        return True  # there is something; reading the identity says what is wrong with it


def open_project(path: Path | str | None = None, *, create: bool = False) -> Project:
    """The project at or above ``path`` (default: the current directory).

    With ``create``, a directory that is not yet a project becomes one (as `dbguard init`).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"a project is a directory path, not {type(path).__name__} {path!r}")
    start = Path(path) if path is not None else Path.cwd()
    with share_access(start, _AFTER_READ):
        if not start.is_dir():
            raise UsageError(f"{start} is not a directory; give the project directory, or cd into it")
        root = find_root(start)
        if root is None:
            if not create:
                raise UsageError(
                    f"{start.resolve()} is not a dbguard project; run `dbguard init {start}` first"
                )
            return init(start)
        project_id, recovered = _identity(root)
        if recovered and create:
            return init(root)  # writes project.json again, with that id
        return Project(project_id, root, recovered)


def read_identity(root: Path) -> str:
    return _identity(root)[0]


def _identity(root: Path) -> tuple[str, str]:
    """The project's id, and, if project.json was lost and the id was taken from the store
    instead, a sentence that says so."""
    path = root / MARKER / IDENTITY_FILE
    try:
        with share_access(path, _AFTER_READ):
            data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"it holds {type(data).__name__}, not an object")
        project_id = str(uuid.UUID(str(data["id"])))
    except FileNotFoundError:
        project_id, generation = _identity_from_store(root, path)
        return project_id, (
            f"{path} is missing; the project store records the id {project_id} (generation "
            f"{generation}), so that id is used. `dbguard init {root}` writes project.json again"
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(
            f"{path} is damaged ({exc.__class__.__name__}: {exc}); it names this project for every "
            "host, so restore it from a backup or from another host's copy rather than re-creating it",
            path=str(path),
        ) from exc
    return project_id, ""


def _identity_from_store(root: Path, path: Path) -> tuple[str, int]:
    """The id that the newest whole manifest of the project store records, and its generation:
    every manifest records its project's id, so a lost project.json need not mean a new id (a
    new one would orphan the store, the leases and every host's cache of the project)."""
    store = ProjectStore(root, "")
    found = store.recorded_identity()
    if found is not None:
        with contextlib.suppress(ValueError):
            if str(uuid.UUID(found[0])) == found[0]:
                return found
    if not store.generations():
        raise IntegrityError(
            f"{path} is missing and there is no project store beside it: {root} is no longer the "
            "project it was (a share not mounted, a directory moved or restored only in part)",
            path=str(path),
        )
    raise IntegrityError(
        f"{path} is missing, and the project store {store.root} records no id that can be read (its "
        "manifests are damaged); restore project.json from a backup or from another host's copy. A new "
        "id would leave the store's data behind",
        path=str(path),
    )


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
    with share_access(root, _AFTER_INIT):
        if not root.is_dir():
            raise UsageError(f"{root} is not a directory; create it first, or give the project directory")
        enclosing = find_root(root)
        if enclosing is not None:
            project_id, recovered = _identity(enclosing)
            if recovered:
                # Lost, but the store still says who the project is: that id is written back.
                _publish_identity(enclosing / MARKER, project_id)
                project_id, _ = _identity(enclosing)  # whoever published first, every host agrees
                recovered = (
                    f"{enclosing / MARKER / IDENTITY_FILE} was missing; it was written again with the id "
                    f"its project store records ({project_id}) rather than a new one"
                )
            return Project(project_id, enclosing, recovered)
        meta = root / MARKER
        meta.mkdir(exist_ok=True)
        _publish_identity(meta)
    return Project(read_identity(root), root)


def _publish_identity(meta: Path, project_id: str | None = None) -> None:
    target = meta / IDENTITY_FILE
    record: dict[str, Any] = {
        "id": project_id or str(uuid.uuid4()),
        "created": _now_text(),
        "created_by": f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}",
        "format": 1,
    }
    if project_id:
        record["note"] = "written again from the id the project store records, after project.json was lost"
    temp = meta / f".{IDENTITY_FILE}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    write_synced(temp, (json.dumps(record, indent=2) + "\n").encode())
    try:
        os.link(temp, target)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(meta)


def read_writer_record(project: Project) -> dict[str, Any]:
    """The writer record, or an empty one; a damaged record counts as empty (it is advisory).

    Anyone who can write the share can write it, so only what has the form dbguard writes is
    kept: ``writer`` (None, or host, user, since and token) and ``last_token``.
    """
    try:
        data = json.loads((project.meta_dir / WRITER_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    record: dict[str, Any] = {}
    writer = data.get("writer")
    if isinstance(writer, dict) and all(isinstance(writer.get(key), str) for key in ("host", "user")):
        since, token = writer.get("since"), writer.get("token")
        record["writer"] = {
            "host": writer["host"],
            "user": writer["user"],
            "since": since if isinstance(since, str) else "",
            "token": token if _is_token(token) else None,
        }
    if _is_token(data.get("last_token")):
        record["last_token"] = data["last_token"]
    return record


# A floor the broker's tokens must exceed: one beyond this was not written by dbguard (no site
# grants 2**53 leases), and taken at its word it would push tokens towards the protocol's limit
# of 2**63 - 1, past which no lease of the project could be renewed.
_MAX_FLOOR = 1 << 53


def _is_token(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_FLOOR


def token_floor(project: Project) -> int:
    """The highest fencing token this project's directory has recorded."""
    value = read_writer_record(project).get("last_token", 0)
    return int(value)


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
    with share_access(project.meta_dir, _AFTER_WRITER_RECORD):
        try:
            write_synced(temp, (json.dumps(record, indent=2) + "\n").encode())
            os.replace(temp, project.meta_dir / WRITER_FILE)
        except OSError:
            with contextlib.suppress(OSError):  # nothing of a failed attempt left beside it
                temp.unlink()
            raise


def _now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
