"""What `pip install .` puts into an environment: dbguard and nothing else at the top level.

The node-local cache lives in the repository's top-level folder cache/ but is installed only
as dbguard.cache: a top-level package called `cache` would clash with anything else of that
name in a user's environment.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import build_wheel

REPO = Path(__file__).resolve().parent.parent


def test_pip_install_puts_only_dbguard_at_the_top_level_and_the_cache_inside_it(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    # Packages only: the start-up hook (dbguard-guard.pth) is a file beside them.
    assert {name for name in top if not name.endswith((".dist-info", ".pth"))} == {"dbguard"}
    assert "dbguard/cache/store.py" in names
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, wheel],
        capture_output=True,
        text=True,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    assert not (site / "cache").exists()
    # Imported from the installed copy alone (not this checkout), the cache works as dbguard.cache.
    probe = subprocess.run(
        [sys.executable, "-P", "-c", "import dbguard.cache, sys; print(dbguard.cache.__file__)"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith(str(site / "dbguard" / "cache"))


def test_the_cache_imports_nothing_from_dbguard() -> None:
    """The cache knows nothing of leases: it imports only its own modules (relatively)."""
    for path in sorted((REPO / "cache").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("dbguard", "cache"), f"{path.name} imports {name}"


def test_the_link_that_installs_the_cache_inside_dbguard_points_at_the_cache_folder() -> None:
    link = REPO / "dbguard" / "cache"
    assert link.is_symlink() and link.resolve() == (REPO / "cache").resolve()
