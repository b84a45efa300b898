"""``DBGUARD_GUARD=1``: the guards in every Python process, with no change to its code.

The package installs `HOOK_NAME` beside itself in site-packages (``setup.py`` writes it into
wheels and editable installs; `install_hook` writes it for an installation made otherwise). The
``site`` module runs its single line at every interpreter start-up. With the variable unset, or
``0``, that line is one dictionary lookup in ``os.environ`` (``site`` has imported ``os``
already) and imports nothing. With it set, it imports this module and calls `install`.

This file is read by ``setup.py`` (for `HOOK_LINE`) without being imported, so `HOOK_NAME` and
`HOOK_LINE` stay plain string literals.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

VARIABLE = "DBGUARD_GUARD"
HOOK_NAME = "dbguard-guard.pth"
# Sorts after setuptools' "__editable__.*.pth", whose finder an editable install needs first.
HOOK_LINE = (
    "import os; os.environ.get('DBGUARD_GUARD', '0') not in ('', '0') "
    "and __import__('dbguard.files.startup').files.startup.install()\n"
)
# dbguard's own long-running processes never guard themselves: `python -m dbguard agent` writes
# only its cache and the projects' .dbguard/ directories, and must start whatever the user's
# environment says.
_OWN_SERVICES = frozenset({"agent", "broker"})


def install() -> None:
    """Called by the start-up hook: guard this process, unless it is one of dbguard's own
    services. A failure is reported on stderr and the process goes on unguarded, rather than
    leaving every Python program on the host unable to start."""
    if _is_own_service(sys.orig_argv):
        return
    try:
        from dbguard.files.guard import guard

        guard()
    except Exception as exc:  # any failure: report it, never stop Python from starting
        print(
            f"dbguard: {VARIABLE} is set but the write guards could not be installed "
            f"({exc.__class__.__name__}: {exc}); this process is NOT guarded. Unset {VARIABLE} "
            "or repair the dbguard installation",
            file=sys.stderr,
        )


def _is_own_service(argv: list[str]) -> bool:
    """Whether ``argv`` (the interpreter's own) runs ``python [options] -m dbguard agent|broker``."""
    for index, arg in enumerate(argv[:-2]):
        if arg == "-c":
            return False
        if arg == "-m":
            return argv[index + 1] == "dbguard" and argv[index + 2] in _OWN_SERVICES
    return False


def hook_path() -> Path:
    """Where this Python's start-up hook belongs: its site-packages (purelib)."""
    return Path(sysconfig.get_paths()["purelib"]) / HOOK_NAME


def install_hook(directory: Path | None = None) -> Path:
    """Write the start-up hook into ``directory`` (default: this Python's site-packages), for
    installations that did not get it from the wheel. Returns its path; harmless when present."""
    path = (directory or hook_path().parent) / HOOK_NAME
    if not path.exists() or path.read_text() != HOOK_LINE:
        temp = path.with_name(f".{HOOK_NAME}.{os.getpid()}")
        temp.write_text(HOOK_LINE)
        os.replace(temp, path)
    return path
