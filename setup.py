"""Everything about the package is in pyproject.toml; this file only adds the start-up hook.

setuptools installs no ``.pth`` file from package data, so `BuildPy` writes
``dbguard-guard.pth`` (``DBGUARD_GUARD=1``, see dbguard/files/startup.py) into the root of what
it builds: the wheel's root, which becomes site-packages, and, for an editable install
(``pip install -e .``), the root of the editable wheel, which setuptools takes from the install
command's ``install_lib``. The line comes from startup.py, read without importing dbguard (its
dependencies are not installed while it builds).
"""

import ast
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP = Path(__file__).parent / "dbguard" / "files" / "startup.py"


def _constant(name: str) -> str:
    for node in ast.parse(STARTUP.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, str)
            return value
    raise LookupError(f"{STARTUP} defines no {name}")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        roots = [Path(self.build_lib)]
        if getattr(self, "editable_mode", False):
            roots.append(Path(self.get_finalized_command("install").install_lib))
        for root in roots:
            root.mkdir(parents=True, exist_ok=True)
            (root / _constant("HOOK_NAME")).write_text(_constant("HOOK_LINE"))


setup(cmdclass={"build_py": BuildPy})
