"""What a deployment writes down, and where.

On the share, in the project's `.dbguard/` (read by `status` on every host, untrusted input):

- ``deployment.json``: who deployed the project where, since when, under which token, and
  whether the copy finished (``deploying`` / ``deployed``). Human-readable.
- ``symlinks.json``: the symbolic links of the project that the share cannot hold (OneData,
  some CIFS mounts), by relative path; deploy re-creates them.
- ``trees/<n>.json``: what the project folder held after each sync, every path with its kind,
  size and CRC-32, under a new name each time (never rewritten, so no client cache can serve
  an old copy): the next host's deploy finds files its own mount's stale directory listing does
  not show yet, and checks what it copies against it.

On this host, in the cache directory (node-local, this user's only): ``deployments/<id>.json``,
what was last synced: every item of the deployed folder as it was when its copy reached the
share, with the CRC-32 of each file's bytes, for the next sync's comparison and undeploy's final
check.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbguard.data.durable import fsync_dir, write_synced
from dbguard.names import child
from dbguard.stage.tree import OWN, Item, Tree

DEPLOYMENT = "deployment.json"
SYMLINKS = "symlinks.json"
TREES = "trees"
_TREES_KEPT = 2
LOCAL_DIR = "deployments"
_MAX_RECORD = 64 << 20  # a symlink record of a million links is far less


def _write_atomic(path: Path, data: dict[str, Any], *, indent: int | None = 1) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_synced(temp, json.dumps(data, indent=indent, sort_keys=True).encode() + b"\n")
    os.replace(temp, path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_RECORD + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if len(raw) > _MAX_RECORD:
        return None
    with contextlib.suppress(ValueError, RecursionError):
        value = json.loads(raw)
        return value if isinstance(value, dict) else None
    return None


# ------------------------------------------------------------------ on the share


def read_deployment(project_dir: Path) -> dict[str, Any] | None:
    """The deployment record of a project, its fields checked; None if there is none (or it is
    not a record dbguard wrote)."""
    data = _read_json(project_dir / OWN / DEPLOYMENT)
    if data is None:
        return None
    fields: dict[str, type | tuple[type, ...]] = {
        "host": str,
        "user": str,
        "dir": str,
        "since": (int, float),
        "token": int,
        "state": str,
    }
    if not all(isinstance(data.get(name), kinds) for name, kinds in fields.items()):
        return None
    if data["state"] not in ("deploying", "deployed") or not 0 <= data["since"] < 1e11:
        return None  # not a time (nan, 1e300): a hand or a bug wrote it, not dbguard
    # Printed by status on every host: no control characters from a file anyone may edit.
    return {name: _printable(data[name]) for name in fields}


def _printable(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return "".join(c if c.isprintable() else "?" for c in value)[:4096]


def write_deployment(
    project_dir: Path, *, host: str, user: str, directory: Path, token: int, state: str
) -> None:
    record = {
        "host": host,
        "user": user,
        "dir": str(directory),
        "since": time.time(),
        "token": token,
        "state": state,
        "note": "written by dbguard deploy: the project is being worked on in dir on host",
    }
    _write_atomic(project_dir / OWN / DEPLOYMENT, record)


def remove_deployment(project_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (project_dir / OWN / DEPLOYMENT).unlink()


def read_links(project_dir: Path) -> dict[str, str]:
    data = _read_json(project_dir / OWN / SYMLINKS) or {}
    links = data.get("links")
    if not isinstance(links, dict):
        return {}
    return {str(k): v for k, v in links.items() if isinstance(v, str) and v and "\0" not in v}


def write_links(project_dir: Path, links: dict[str, str]) -> None:
    path = project_dir / OWN / SYMLINKS
    if not links:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    note = "symbolic links the share cannot hold"
    _write_atomic(path, {"links": dict(sorted(links.items())), "note": note})


def publish_tree(project_dir: Path, synced: dict[str, tuple[Item, int]], token: int) -> int:
    """Publish the tree a sync left on the share as the next ``trees/<n>.json``; its number."""
    directory = project_dir / OWN / TREES
    directory.mkdir(exist_ok=True)
    body = {
        "token": token,
        "at": time.time(),
        "tree": {path: [*item.to_json(), crc] for path, (item, crc) in sorted(synced.items())},
    }
    data = json.dumps(body, separators=(",", ":")).encode()
    temp = directory / f".tree.{os.getpid()}.{time.monotonic_ns()}.tmp"
    write_synced(temp, data)
    try:
        number = (tree_numbers(project_dir) or [0])[-1] + 1
        while True:
            try:
                os.link(temp, directory / f"{number}.json")  # a new name, or a lost race
                break
            except FileExistsError:
                number += 1
        fsync_dir(directory)
    finally:
        temp.unlink()
    for old in tree_numbers(project_dir)[:-_TREES_KEPT]:
        with contextlib.suppress(FileNotFoundError):
            (directory / f"{old}.json").unlink()
    return number


def tree_numbers(project_dir: Path) -> list[int]:
    """The published tree records, oldest first, probing past a stale directory listing."""
    directory = project_dir / OWN / TREES
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    numbers = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit() and len(n) < 20)
    probe = (numbers[-1] if numbers else 0) + 1
    while (directory / f"{probe}.json").exists():
        numbers.append(probe)
        probe += 1
    return numbers


def read_tree(project_dir: Path) -> dict[str, tuple[Item, int]]:
    """The newest tree record that parses (empty if none): path -> (item, crc)."""
    for number in reversed(tree_numbers(project_dir)):
        data = _read_json(project_dir / OWN / TREES / f"{number}.json")
        tree = data.get("tree") if data else None
        if not isinstance(tree, dict):
            continue
        found: dict[str, tuple[Item, int]] = {}
        for path, value in tree.items():
            item = Item.from_json(value[:5]) if isinstance(value, list) and len(value) == 6 else None
            if item is not None and isinstance(value[5], int) and not isinstance(value[5], bool):
                found[str(path)] = (item, value[5])
        return found
    return {}


# ------------------------------------------------------------------ on this host


@dataclass
class LocalState:
    """This host's deployment of one project."""

    project: str  # id
    path: str  # the project directory on the share, as this host sees it
    dir: str  # the deployment
    token: int
    state: str = "deploying"  # deploying, deployed, fenced
    # Every item of the deployment as it reached the share: (item, crc of a file's bytes).
    synced: dict[str, tuple[Item, int]] = field(default_factory=dict)
    last_sync: float = 0.0  # wall clock
    # Set while a sync runs: found set, the last sync was cut short and may have left its
    # temporary files on the share, which the next one removes.
    syncing: bool = False
    # What deploy wrote into the folder's marker file (tree.MARKER): a folder made again empty
    # at the same path (a reboot, a scratch cleaner) has none, and is never taken for one whose
    # files were all deleted. (Its inode is no proof: a new folder may get the old number.)
    dir_id: str = ""

    def tree(self) -> Tree:
        return {path: item for path, (item, _) in self.synced.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "path": self.path,
            "dir": self.dir,
            "token": self.token,
            "state": self.state,
            "last_sync": self.last_sync,
            "syncing": self.syncing,
            "dir_id": self.dir_id,
            "synced": {path: [*item.to_json(), crc] for path, (item, crc) in self.synced.items()},
        }


def local_path(cache_root: Path, project_id: str) -> Path:
    return child(cache_root / LOCAL_DIR, project_id, ".json")


def read_local(cache_root: Path, project_id: str) -> LocalState | None:
    data = _read_json(local_path(cache_root, project_id))
    if data is None:
        return None
    try:
        synced: dict[str, tuple[Item, int]] = {}
        for path, value in dict(data.get("synced") or {}).items():
            item = Item.from_json(value[:5]) if isinstance(value, list) and len(value) == 6 else None
            if item is not None and isinstance(value[5], int):
                synced[str(path)] = (item, value[5])
        return LocalState(
            project=str(data["project"]),
            path=str(data["path"]),
            dir=str(data["dir"]),
            token=int(data["token"]),
            state=str(data.get("state", "deploying")),
            synced=synced,
            last_sync=float(data.get("last_sync") or 0.0),
            syncing=bool(data.get("syncing", False)),
            dir_id=str(data.get("dir_id") or ""),
        )
    except (KeyError, TypeError, ValueError):
        return None


def write_local(cache_root: Path, state: LocalState) -> None:
    path = local_path(cache_root, state.project)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    _write_atomic(path, state.to_json(), indent=None)


def remove_local(cache_root: Path, project_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        local_path(cache_root, project_id).unlink()


def all_local(cache_root: Path) -> list[LocalState]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted((cache_root / LOCAL_DIR).glob("*.json")):
            state = read_local(cache_root, entry.stem)
            if state is not None:
                found.append(state)
    return found
