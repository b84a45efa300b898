"""Names that come from outside (a key name on the command line, a file name in a directory that
people edit) and the paths built from them.

A name is checked against one allowed form before it becomes a path, and every such path is
built by `child`, which refuses a result outside its root: no `..`, no separator, no absolute
name, no symlink that leads out.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# One path component: letters, digits, '.', '_', '-', starting with a letter or digit (so never
# '.', '..' or a hidden file), short enough for any filesystem with a suffix added.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PLAIN_NAME_RULE = "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_plain_name(name: object) -> bool:
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


# An image database's name, as `dbguard.open` takes it and manifests record it. It is a key, not
# a path: where one must name a file (`recover --export`), `file_name_for` makes one of it.
DATABASE_NAME_RULE = "1 to 200 characters, none of them NUL"


def is_database_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 200 and "\x00" not in name


def file_name_for(name: str) -> str:
    """A plain name that stands for ``name`` as a file name: ``name`` itself if it is plain, else
    its letters, digits, '.', '_' and '-' (others become '_') and a hash that keeps two names
    apart which differ only in the others."""
    if is_plain_name(name):
        return name
    kept = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"x{kept}-{digest}"


class OutsideRoot(ValueError):
    """A name that would leave the directory it must stay in."""


def child(root: Path, name: str, suffix: str = "") -> Path:
    """``root / (name + suffix)``, for a plain ``name`` only, and only if the result (symlinks
    resolved) stays inside ``root``; otherwise `OutsideRoot` saying why."""
    if not is_plain_name(name):
        raise OutsideRoot(f"{name!r} is not a plain name ({PLAIN_NAME_RULE})")
    path = root / f"{name}{suffix}"
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root) or path.resolve() == real_root:
        raise OutsideRoot(f"{path} leads outside {root}")
    return path
