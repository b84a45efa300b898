"""What a project folder holds, as `deploy`, `sync` and `undeploy` compare it: every file,
directory and symbolic link under a root, by relative path, with what tells a change (size and
modification time for files, the target for links). dbguard's own `.dbguard/` folder is never
part of a tree: it is the share's, not the deployment's."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OWN = ".dbguard"  # dbguard's folder in a project: never deployed, synced or deleted
# What `sync` writes before a rename on the share; never taken for the project's own files.
TEMP_PREFIX = ".dbguard-sync-"
# In a deployment folder: who made it (stage.sync.check_folder). Never synced.
MARKER = ".dbguard-deployment"


@dataclass(frozen=True)
class Item:
    kind: str  # "file", "dir" or "link"
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0o644
    target: str = ""  # a link's

    def same_content(self, other: Item | None) -> bool:
        """Whether ``other`` is this same file, directory or link as far as a sync is concerned."""
        if other is None or other.kind != self.kind:
            return False
        if self.kind == "file":
            return self.size == other.size and self.mtime_ns == other.mtime_ns
        if self.kind == "link":
            return self.target == other.target
        return True

    def to_json(self) -> list[object]:
        return [self.kind, self.size, self.mtime_ns, self.mode, self.target]

    @classmethod
    def from_json(cls, value: object) -> Item | None:
        """An item as `to_json` wrote it; None for anything else (a damaged local state)."""
        if not isinstance(value, list) or len(value) != 5:
            return None
        kind, size, mtime_ns, mode, target = value
        if kind not in ("file", "dir", "link") or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (size, mtime_ns, mode)
        ):
            return None
        if not isinstance(target, str):
            return None
        return cls(kind, size, mtime_ns, mode, target)


Tree = dict[str, Item]


def scan(root: Path) -> Tree:
    """Every file, directory and symlink under ``root`` (not following links), by path relative
    to it with "/" separators; dbguard's own folder and a sync's temporary files left out.
    Anything else (a socket, a device) is not a project's data and is skipped."""
    tree: Tree = {}
    for relative, entry in _walk(root, ""):
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            tree[relative] = Item("link", target=os.readlink(entry.path))
        elif stat.S_ISDIR(info.st_mode):
            tree[relative] = Item("dir", mode=stat.S_IMODE(info.st_mode))
        elif stat.S_ISREG(info.st_mode):
            tree[relative] = Item("file", info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode))
    return tree


def _walk(root: Path, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    with os.scandir(root / prefix if prefix else root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if not prefix and entry.name in (OWN, MARKER):
                continue
            if entry.name.startswith(TEMP_PREFIX):
                continue
            relative = f"{prefix}/{entry.name}" if prefix else entry.name
            yield relative, entry
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(root, relative)


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` for a relative path read from a tree or a record, refusing one that
    climbs out of ``root`` (records on the share are untrusted input)."""
    parts = relative.split("/")
    climbs = any(p in ("", ".", "..") for p in parts)
    if not relative or relative.startswith("/") or climbs or "\0" in relative:
        raise ValueError(f"{relative!r} is not a path inside the project")
    if parts[0] == OWN:
        raise ValueError(f"{relative!r} is inside dbguard's own folder")
    path = root.joinpath(*parts)
    # Never through a symbolic link: a record saying "x -> /home/u" and then "x/.bashrc" would
    # otherwise write outside the tree. Every folder on the way must be a real folder in it.
    parent = os.path.realpath(path.parent)
    if parent != os.path.join(os.path.realpath(root), *parts[:-1]).rstrip(os.sep):
        raise ValueError(f"{relative!r} lies under a symbolic link or outside the tree")
    return path
