"""Helpers and constants that several test modules share: lease timings, simulated hosts, a small
tmpfs, commands run on a host, damaged-data checks and samples of every error class. Fixtures stay
in conftest.py; test modules import from here, never from one another."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dbguard
from dbguard.cache.errors import CacheError
from dbguard.data.store import PendingRecord
from dbguard.errors import GuardError, error_classes
from tools.sshfs import SshServer
from tools.testbed import Host, LeaseBackend, SimHost

# Short timings keep the suite fast; every test that waits for an expiry uses these.
TTL = 1.5
LOCK_DELAY = 0.5


INTEGRITY = 6  # the exit code of an IntegrityError


# ------------------------------------------------------------ test outcomes


def failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


def fail_or_skip(why: str) -> None:
    # CI runs as root on a machine that has (or installs) what the tests need: there a missing
    # piece is a failure, not a skip.
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


# ---------------------------------------------------------- simulated hosts


# Makes a whole simulated host: name, the path it mounts the shared directory at, its settings.
MakeSimHost = Callable[..., SimHost]


@contextlib.contextmanager
def sim_hosts(
    root: Path, backend: LeaseBackend, shared: Path, request: pytest.FixtureRequest
) -> Iterator[MakeSimHost]:
    """Whole simulated hosts (tools.testbed.SimHost) that mount ``shared`` over loopback sshfs and
    use ``backend``; stopped at the end, with their agents' logs printed if the test failed."""
    made: list[SimHost] = []
    with SshServer(root / "sshd") as server:

        def make(name: str, mount: str, **settings: str) -> SimHost:
            host = SimHost(name, root / "hosts", backend, server, shared, mount, **settings)  # type: ignore[arg-type]
            made.append(host.start())
            return host

        yield make
        for host in made:
            if failed(request):
                print(f"\n----- agent log of {host.name} -----\n{host.agent_log()}")
            host.stop()


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str = "2m") -> Iterator[Path]:
    """A small tmpfs at ``directory``: a filesystem that really runs out of space (needs root)."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        fail_or_skip(f"mounting a small tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


# ------------------------------------------------------- commands on a host


def status(host: Host, project: Path) -> dict[str, Any]:
    result = host.run("status", str(project), "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def project_state(host: Host, project: Path) -> dict[str, Any]:
    item: dict[str, Any] = status(host, project)["projects"][0]
    return item


def acquire(host: Host, project: Path, *args: str) -> dict[str, Any]:
    result = host.run("acquire", str(project), "--json", *args)
    assert result.returncode == 0, f"acquire on {host.name} failed ({result.returncode}): {result.stderr}"
    lease: dict[str, Any] = json.loads(result.stdout)
    return lease


def script(host: Host, code: str) -> str:
    """Run Python on a host; return its stdout, failing the test with stderr if it fails."""
    result = host.python(textwrap.dedent(code))
    assert result.returncode == 0, f"on {host.name}:\n{result.stderr}"
    return result.stdout


def dbguard_json(host: Host, *args: str) -> Any:
    result = host.run(*args, "--json")
    assert result.returncode == 0, f"dbguard {' '.join(args)} on {host.name}: {result.stderr}"
    return json.loads(result.stdout)


def write_images(host: Host, project: Path, count: int, start: int = 0, db: str = "images") -> None:
    script(
        host,
        f"""
        import numpy as np, dbguard
        with dbguard.open({str(project)!r}, {db!r}, "a") as db:
            for i in range({start}, {start + count}):
                db.append(np.full((32, 48), i, np.float32), attrs={{"n": i, "host": {host.name!r}}})
        """,
    )


def read_all(host: Host, project: Path, db: str = "images") -> list[tuple[float, dict[str, Any]]]:
    out = script(
        host,
        f"""
        import json, dbguard
        with dbguard.open({str(project)!r}, {db!r}, "r") as db:
            print(json.dumps([(float(db[i][0, 0]), db.attrs(i)) for i in range(len(db))]))
        """,
    )
    return [(value, attrs) for value, attrs in json.loads(out)]


# ------------------------------------------------------------- damaged data


RunPython = Callable[..., subprocess.CompletedProcess[str]]


def image(n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Record ``n``: every record differs in every byte range, so a mix-up would show."""
    return (np.arange(16 * 24, dtype=np.float32).reshape(16, 24) + 1000 * n).astype(np.float32)


def pending(n: int) -> PendingRecord:
    array = image(n)
    return PendingRecord("images", n, array.dtype.str, array.shape, array.tobytes(), json.dumps({"n": n}))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes, to show nothing was rewritten or removed. LMDB's
    lock.mdb is left out: it is the reader table that every opening process writes to."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock.mdb")
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *phrases: str) -> None:
    """The command failed with ``code``, without a traceback, saying each of ``phrases``."""
    said = result.stderr + result.stdout
    assert result.returncode == code, f"exit {result.returncode}, not {code}:\n{said}"
    assert "Traceback" not in said, said
    for phrase in phrases:
        assert phrase in said, f"{phrase!r} not in:\n{said}"


# Reads every record of "images" through dbguard.open(project, "images", "r"); each record comes
# back as its values, or as [error class, exit code, message].
READER = textwrap.dedent(
    """
    import json, sys, dbguard

    def attempt(read):
        try:
            return read()
        except dbguard.GuardError as exc:
            return [type(exc).__name__, int(exc.exit_code), str(exc)]

    db = attempt(lambda: dbguard.open(sys.argv[1], "images", "r"))
    if isinstance(db, list):
        print(json.dumps({"open": db}))
        sys.exit(0)
    with db:
        records = {i: attempt(lambda: db[i].tolist()) for i in range(len(db))}
        print(json.dumps({"generation": db.generation, "len": len(db), "records": records}))
    """
)


def read_images(run_python: RunPython, project: Path) -> Any:
    result = run_python(READER, str(project))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def python_on(host: Host) -> RunPython:
    def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            host.on_host([sys.executable, "-c", code, *args]),
            env=host.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


def is_refusal(value: Any, kind: str, *phrases: str) -> bool:
    return (
        isinstance(value, list)
        and value[0] == kind
        and value[1] == INTEGRITY
        and all(phrase in value[2] for phrase in phrases)
    )


def identity(project: Path) -> str:
    return str(json.loads((project / ".dbguard" / "project.json").read_text())["id"])


def write_numbered_images(host: Host, project: Path, numbers: range) -> None:
    """Write ``image(n)`` as record ``n`` for each of ``numbers``."""
    result = python_on(host)(
        textwrap.dedent(
            f"""
            import numpy as np, dbguard
            with dbguard.open({str(project)!r}, "images", "a") as db:
                for n in {list(numbers)!r}:
                    db[n] = (np.arange(16 * 24, dtype=np.float32).reshape(16, 24) + 1000 * n)
            """
        )
    )
    assert result.returncode == 0, result.stderr


def try_to_write(host: Host, project: Path) -> Any:
    result = python_on(host)(
        textwrap.dedent(
            f"""
            import json, numpy as np, dbguard
            try:
                with dbguard.open({str(project)!r}, "images", "a") as db:
                    db.append(np.zeros((16, 24), np.float32))
                print(json.dumps("written"))
            except dbguard.GuardError as exc:
                print(json.dumps([type(exc).__name__, int(exc.exit_code), str(exc)]))
            """
        )
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


# -------------------------------------------------------- every error class


def all_guard_errors() -> list[type[GuardError]]:
    """Every GuardError class of dbguard, after importing every module that may define one."""
    for module in pkgutil.walk_packages(dbguard.__path__, "dbguard."):
        if not module.name.endswith("__main__"):  # that one runs the command
            importlib.import_module(module.name)
    return [cls for cls in error_classes() if cls.__module__.startswith("dbguard")]


def all_cache_errors() -> list[type[CacheError]]:
    found: list[type[CacheError]] = [CacheError]
    for cls in found:
        found.extend(sub for sub in cls.__subclasses__() if sub not in found)
    return found


def _sample_value(hint: Any, name: str, n: int) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _sample_value(args[0], name, n)
    base = typing.get_origin(hint) or hint
    if base is int:
        return 40 + n
    if base is dict:
        return {"host": "host-z", "user": "zed", "since": 1.5, "token": 40 + n, "unflushed": 7}
    return f"/{name}-{n}"


def sample(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` whose every field has a value of its own type, none the default."""
    hints = typing.get_type_hints(cls.__init__)
    names = list(inspect.signature(cls.__init__).parameters)[1:]
    if issubclass(cls, GuardError):
        values = {name: _sample_value(hints[name], name, n) for n, name in enumerate(names[1:])}
        return cls(f"{cls.__name__} happened, because of /a/path; do this", **values)
    return cls(*(_sample_value(hints.get(name, str), name, n) for n, name in enumerate(names)))


# -------------------------------------------------------------------------- the wheel


def build_wheel(directory: Path) -> Path:
    """The wheel `pip install .` would install, built from a copy of the tree in ``directory``
    (links kept as links: setuptools builds in the source tree, and the checkout stays clean),
    with this environment's setuptools rather than one fetched afresh."""
    import shutil

    repo = Path(__file__).resolve().parent.parent
    source = directory / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy(repo / name, source / name)
    for name in ("dbguard", "cache"):
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(repo / name, source / name, symlinks=True, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", directory, source],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = directory.glob("dbguard-*.whl")
    return wheel
