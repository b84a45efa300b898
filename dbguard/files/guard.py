"""Refuse, in this process, writes into a project whose writer lease this host does not hold.

`guard()` wraps every way the field's libraries open a file for writing: ``open`` / ``io.open``
(and so ``pathlib.Path.write_*``, mrcfile, tifffile, ``numpy.save`` / ``savez`` / ``savetxt``
/ ``memmap``, which all open through them), ``os.open``, and ``h5py.File``, which opens its
files in C and so gets a wrapper of its own, installed when h5py is imported. A write whose path
lies in a dbguard project raises `LeaseHeld` (or `LeaseLost`) before anything is created, unless
this host's agent holds the project's lease; reads, and writes outside projects, pass through.

Cost: a read is a mode test. A write is a dictionary lookup of its directory's project; a
directory not seen for `FORGET_AFTER` seconds is looked up again (its real path, so symlinked
directories lead to their project, then a walk up to ``.dbguard/project.json``). Inside a
project, `WriterGuard` stats ``leases.json`` at most every ``RECHECK`` seconds (no round trip).
A file that is itself a symlink is not followed: an ``lstat`` per write costs a round trip on a
network mount (about 0.3 ms on sshfs, tools/bench_guard.py), so a link placed outside a project
to a file inside it escapes the check; links to directories do not.

What dbguard itself writes under ``<project>/.dbguard/`` (the writer record, the store's
segments and manifests) is never checked: the agent and the flushes that put it there are
fenced by tokens instead (invariants 2 and 8).
"""

from __future__ import annotations

import builtins
import functools
import importlib.abc
import importlib.machinery
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from dbguard.agent.lease_check import WriterGuard
from dbguard.agent.local import cache_dir
from dbguard.data.project import IDENTITY_FILE, MARKER, open_project
from dbguard.errors import LeaseHeld, LeaseLost
from dbguard.settings import load

# os.open flags that can change or create a file.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# open() mode letters that can: write, append, exclusive create, update.
_WRITE_LETTERS = frozenset("wax+")
# h5py.File's writing modes (h5py documents "w-" and "x" as the same).
H5PY_WRITE_MODES = frozenset({"w", "w-", "x", "a", "r+"})
# Seconds a directory's project (or its having none) is trusted before it is looked up again: a
# directory made a project by `dbguard init` while a process runs is guarded after at most this.
FORGET_AFTER = 5.0
_MAX_REMEMBERED = 4096  # directories; past this the memory starts again

_original_open = builtins.open
_original_os_open = os.open
_lock = threading.Lock()
_installed = False
# directory as given (absolute) -> (project root, or None outside projects, monotonic expiry)
_roots: dict[str, tuple[str | None, float]] = {}
_guards: dict[str, WriterGuard] = {}
_cache_root: Path | None = None


def guard() -> None:
    """Install the checks in this process (again is harmless). h5py is wrapped now if it was
    imported, otherwise as soon as it is."""
    global _installed
    with _lock:
        if _installed:
            return
        builtins.open = io.open = _guarded_open
        os.open = _guarded_os_open
        for name, patch in _ON_IMPORT.items():
            if name in sys.modules:
                patch(sys.modules[name])
        sys.meta_path.insert(0, _PatchOnImport())
        _installed = True


def installed() -> bool:
    return _installed


def check_write(path: str | bytes | os.PathLike[Any]) -> None:
    """Raise `LeaseHeld` / `LeaseLost` if writing ``path`` would change a project this host does
    not hold the writer lease of; return quietly for paths outside projects."""
    name = os.path.abspath(os.fsdecode(path))
    root = _project_root(os.path.dirname(name))
    if root is None:
        return
    try:
        _writer_guard(root).check()
    except LeaseHeld as exc:
        raise LeaseHeld(f"cannot write {name}: {exc.message}", holder=exc.holder) from None
    except LeaseLost as exc:
        raise LeaseLost(
            f"cannot write {name}: {exc.message}", project=exc.project, reason=exc.reason
        ) from None


def _project_root(directory: str) -> str | None:
    """The project root that guards files in ``directory``: None outside projects and inside a
    project's own ``.dbguard/`` (dbguard's writes; fenced by tokens, not by this check)."""
    now = time.monotonic()
    known = _roots.get(directory)
    if known is not None and known[1] > now:
        return known[0]
    real = os.path.realpath(directory)
    root = _find_root(real, now)
    if root is not None and (real + os.sep).startswith(os.path.join(root, MARKER) + os.sep):
        root = None
    if len(_roots) >= _MAX_REMEMBERED:
        _roots.clear()
    _roots[directory] = _roots[real] = (root, now + FORGET_AFTER)
    return root


def _find_root(real: str, now: float) -> str | None:
    """The nearest directory at or above ``real`` with ``.dbguard/project.json``, or with a
    ``.dbguard`` directory whose project.json was lost (`open_project` then recovers its id or
    says what is wrong): one stat per level, up to the first level whose answer is remembered
    (a new directory in a known one costs one stat)."""
    candidate = real
    while True:
        marker = os.path.join(candidate, MARKER)
        if os.path.isdir(marker) and (
            os.path.isfile(os.path.join(marker, IDENTITY_FILE))
            or os.path.isdir(os.path.join(marker, "store"))
        ):
            return candidate
        parent = os.path.dirname(candidate)
        if parent == candidate:
            return None
        known = _roots.get(parent)
        if known is not None and known[1] > now:
            return known[0]
        candidate = parent


def _writer_guard(root: str) -> WriterGuard:
    global _cache_root
    found = _guards.get(root)
    if found is None:
        if _cache_root is None:
            _cache_root = cache_dir(load())
        found = _guards[root] = WriterGuard(_cache_root, open_project(root))
    return found


def _writes(mode: object) -> bool:
    return isinstance(mode, str) and not _WRITE_LETTERS.isdisjoint(mode)


def _guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    if _writes(mode) and isinstance(file, (str, bytes, os.PathLike)):
        check_write(file)
    return _original_open(file, mode, *args, **kwargs)


def _guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    if flags & WRITE_FLAGS and isinstance(path, (str, bytes, os.PathLike)):
        name = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(name):
            name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
        check_write(name)
    return _original_os_open(path, flags, mode, dir_fd=dir_fd)


_guarded_open.__doc__ = _original_open.__doc__
_guarded_os_open.__doc__ = _original_os_open.__doc__


def _patch_h5py_files(module: ModuleType) -> None:
    """h5py opens and creates files in the HDF5 C library, past Python's ``open``."""
    cls = module.File
    original = cls.__init__
    if getattr(original, "__dbguard__", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, name: Any, mode: str | None = "r", *args: Any, **kwargs: Any) -> None:
        in_memory = kwargs.get("driver") == "core" and not kwargs.get("backing_store", True)
        if mode in H5PY_WRITE_MODES and not in_memory and isinstance(name, (str, bytes, os.PathLike)):
            check_write(name)
        original(self, name, mode, *args, **kwargs)

    __init__.__dbguard__ = True  # type: ignore[attr-defined]  # marks the wrapper: patch once
    cls.__init__ = __init__


# Modules patched when they are imported (or at once, if they already were).
_ON_IMPORT: dict[str, Callable[[ModuleType], None]] = {"h5py._hl.files": _patch_h5py_files}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the modules of `_ON_IMPORT` with the rest of ``sys.meta_path`` and patches each
    right after it has run, so ``import h5py`` after `guard()` gets the wrapped ``File``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = _ON_IMPORT.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if isinstance(spec.loader, importlib.abc.Loader) and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, resource readers...
        return getattr(self._loader, name)
