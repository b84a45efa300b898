"""dbguard.guard() and DBGUARD_GUARD=1: writes into a project this host does not hold are refused.

Each guarded process is a real process (guard() changes builtins.open for a whole process); the
done-when test runs them on simulated hosts with their own hostnames, caches and sshfs mounts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbguard.files.startup import HOOK_LINE, HOOK_NAME, _is_own_service, install_hook
from tests.support import MakeSimHost, build_wheel, sim_hosts
from tools.testbed import BrokerProcess

# The five writes of the done-when, each in its own file; prints one JSON line per write:
# "ok", or the error's class and the host it names.
WRITES = """
import json, os, sys
import h5py, mrcfile, numpy as np, tifffile
{setup}
project = sys.argv[1] if len(sys.argv) > 1 else {project!r}
def write_h5(path):
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(4)
def write_mrc(path):
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((2, 2), np.float32))
def write_tif(path):
    tifffile.imwrite(path, np.zeros((2, 2), np.uint8))
def write_npy(path):
    np.save(path, np.arange(3))
def write_txt(path):
    with open(path, "w") as f:
        f.write("hello")
for name, write in [("{prefix}.h5", write_h5), ("{prefix}.mrc", write_mrc), ("{prefix}.tif", write_tif),
                    ("{prefix}.npy", write_npy), ("{prefix}.txt", write_txt)]:
    try:
        write(os.path.join(project, name))
        print(json.dumps([name, "ok", None]))
    except Exception as exc:
        print(json.dumps([name, type(exc).__name__, (getattr(exc, "holder", None) or {{}}).get("host")]))
"""


def writes(project: Path, prefix: str, *, call_guard: bool) -> str:
    setup = "import dbguard; dbguard.guard()" if call_guard else ""
    return WRITES.format(setup=setup, project=str(project), prefix=prefix)


def outcomes(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str | None]]:
    assert result.returncode == 0, result.stderr
    return {name: (outcome, host) for name, outcome, host in map(json.loads, result.stdout.splitlines())}


@pytest.fixture
def make_host(
    tmp_path: Path, broker: BrokerProcess, shared: Path, request: pytest.FixtureRequest
) -> Iterator[MakeSimHost]:
    with sim_hosts(tmp_path, broker, shared, request) as make:
        yield make


def test_a_guarded_process_on_another_host_cannot_write_the_field_formats_into_a_held_project(
    make_host: MakeSimHost, shared: Path
) -> None:
    a, b = make_host("ws-a", "/mnt/a/proj"), make_host("ws-b", "/mnt/b/proj")
    # A runs guarded too: the agent its acquire starts must come up regardless.
    a.env["DBGUARD_GUARD"] = "1"
    assert a.run("init").returncode == 0
    assert a.run("acquire").returncode == 0, a.run("status").stdout
    before = sorted(os.listdir(shared))

    refused = outcomes(b.python(writes(b.project, "b", call_guard=True)))
    assert refused == {f"b.{ext}": ("LeaseHeld", "ws-a") for ext in ("h5", "mrc", "tif", "npy", "txt")}
    # No code change, only the variable: the start-up hook guards a plain script.
    b.env["DBGUARD_GUARD"] = "1"
    plain = outcomes(b.python(writes(b.project, "plain", call_guard=False)))
    assert plain == {f"plain.{ext}": ("LeaseHeld", "ws-a") for ext in ("h5", "mrc", "tif", "npy", "txt")}
    assert sorted(os.listdir(shared)) == before, "a refused write left something on the share"

    # Reads need no lease, and a guarded B still writes outside the project.
    (shared / "given.txt").write_text("from the share")
    reads = b.python(
        f"import os; print(open({str(b.project / 'given.txt')!r}).read()); "
        "open('/tmp/elsewhere.txt', 'w').write('x'); print(os.path.exists('/tmp/elsewhere.txt'))"
    )
    assert reads.returncode == 0, reads.stderr
    assert reads.stdout.split() == ["from", "the", "share", "True"]

    allowed = outcomes(a.python(writes(a.project, "a", call_guard=True)))
    assert allowed == {f"a.{ext}": ("ok", None) for ext in ("h5", "mrc", "tif", "npy", "txt")}
    assert {f"a.{ext}" for ext in ("h5", "mrc", "tif", "npy", "txt")} <= set(os.listdir(shared))
    assert a.run("release").returncode == 0


# ---------------------------------------------------------- one host, no lease held by anyone


GUARDED = """
import json, os, sys, pathlib
import numpy as np, h5py, mrcfile, tifffile
import dbguard
dbguard.guard()
p = sys.argv[1]
def attempt(what, call):
    try:
        call()
        print(json.dumps([what, "ok"]))
    except Exception as exc:
        print(json.dumps([what, type(exc).__name__]))
"""


def guarded(tmp_path: Path, body: str, *args: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DBGUARD_")}
    env.update(DBGUARD_CACHE=str(tmp_path / "cache"), DBGUARD_BROKER="tcp://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-c", GUARDED + textwrap.dedent(body), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(map(json.loads, result.stdout.splitlines()))


@pytest.fixture
def local_project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    (path / "sub").mkdir(parents=True)
    made = subprocess.run(
        [sys.executable, "-m", "dbguard", "init", str(path)], capture_output=True, check=False
    )
    assert made.returncode == 0, made.stderr
    return path


def test_every_writing_mode_of_every_wrapped_call_is_refused_and_creates_nothing(
    tmp_path: Path, local_project: Path
) -> None:
    found = guarded(
        tmp_path,
        """
        s = os.path.join(p, "sub")
        attempt("open-a", lambda: open(os.path.join(s, "a"), "a"))
        attempt("open-x", lambda: open(os.path.join(s, "x"), "xb"))
        attempt("io.open-w", lambda: __import__("io").open(os.path.join(s, "w"), mode="w"))
        attempt("os.open", lambda: os.open(os.path.join(s, "o"), os.O_WRONLY | os.O_CREAT))
        fd = os.open(s, os.O_RDONLY)
        attempt("os.open-dir_fd", lambda: os.open("d", os.O_CREAT | os.O_RDWR, dir_fd=fd))
        attempt("write_text", lambda: pathlib.Path(s, "t").write_text("x"))
        attempt("write_bytes", lambda: pathlib.Path(s, "b").write_bytes(b"x"))
        attempt("touch", lambda: pathlib.Path(s, "touched").touch())
        for mode in ("w", "w-", "x", "a"):
            attempt(f"h5py-{mode}", lambda: h5py.File(os.path.join(s, f"h{mode}.h5"), mode))
        attempt("mrcfile.new", lambda: mrcfile.new(os.path.join(s, "n.mrc")))
        attempt("mrcfile.open-w+", lambda: mrcfile.open(os.path.join(s, "o.mrc"), "w+"))
        attempt("mrcfile.mmap-w+", lambda: mrcfile.mmap(os.path.join(s, "m.mrc"), "w+"))
        image = np.zeros((2, 2), "u1")
        attempt("tifffile.imwrite", lambda: tifffile.imwrite(os.path.join(s, "i.tif"), image))
        attempt("TiffWriter", lambda: tifffile.TiffWriter(os.path.join(s, "w.tif")))
        attempt("np.save", lambda: np.save(os.path.join(s, "s.npy"), 1))
        attempt("np.savez", lambda: np.savez(os.path.join(s, "z.npz"), a=1))
        attempt("np.savetxt", lambda: np.savetxt(os.path.join(s, "t.txt"), [1]))
        attempt("np.memmap-w+", lambda: np.memmap(os.path.join(s, "m.dat"), "u1", "w+", shape=(2,)))
        """,
        str(local_project),
    )
    assert found and set(found.values()) == {"LeaseHeld"}, found
    assert os.listdir(local_project / "sub") == []


def test_existing_files_are_refused_in_update_modes_and_read_freely(
    tmp_path: Path, local_project: Path
) -> None:
    import h5py
    import mrcfile
    import numpy as np

    with h5py.File(local_project / "d.h5", "w") as f:
        f["x"] = np.arange(3)
    with mrcfile.new(local_project / "d.mrc") as m:
        m.set_data(np.ones((2, 2), np.float32))
    np.save(local_project / "d.npy", np.arange(3))
    found = guarded(
        tmp_path,
        """
        j = lambda name: os.path.join(p, name)
        attempt("h5py-r+", lambda: h5py.File(j("d.h5"), "r+"))
        attempt("mrcfile-r+", lambda: mrcfile.open(j("d.mrc"), "r+"))
        attempt("memmap-r+", lambda: np.memmap(j("d.npy"), "u1", "r+"))
        attempt("open-r+", lambda: open(j("d.npy"), "r+b"))
        attempt("read-h5py", lambda: h5py.File(j("d.h5"), "r").close())
        attempt("read-mrcfile", lambda: mrcfile.open(j("d.mrc")).close())
        attempt("read-npy", lambda: np.load(j("d.npy")))
        attempt("read-memmap", lambda: np.memmap(j("d.npy"), "u1", "r"))
        attempt("read-os.open", lambda: os.close(os.open(j("d.npy"), os.O_RDONLY)))
        """,
        str(local_project),
    )
    assert {key for key, value in found.items() if value != "ok"} == {
        "h5py-r+",
        "mrcfile-r+",
        "memmap-r+",
        "open-r+",
    }
    assert {found[key] for key in ("h5py-r+", "mrcfile-r+", "memmap-r+", "open-r+")} == {"LeaseHeld"}


def test_outside_projects_and_inside_dbguard_s_own_directory_writes_pass(
    tmp_path: Path, local_project: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(local_project / "sub")
    found = guarded(
        tmp_path,
        f"""
        o = {str(outside)!r}
        attempt("outside-open", lambda: open(os.path.join(o, "x.txt"), "w").close())
        attempt("outside-h5py", lambda: h5py.File(os.path.join(o, "x.h5"), "w").close())
        attempt("outside-npy", lambda: np.save(os.path.join(o, "x.npy"), 1))
        attempt("internal", lambda: open(os.path.join(p, ".dbguard", "note"), "w").close())
        attempt("through-a-linked-directory", lambda: open({str(tmp_path / "link" / "y")!r}, "w"))
        """,
        str(local_project),
    )
    assert found == {
        "outside-open": "ok",
        "outside-h5py": "ok",
        "outside-npy": "ok",
        "internal": "ok",
        "through-a-linked-directory": "LeaseHeld",
    }


def test_h5py_imported_after_guard_is_wrapped(tmp_path: Path, local_project: Path) -> None:
    script = f"""
import dbguard, sys
dbguard.guard()
assert "h5py" not in sys.modules
import h5py
try:
    h5py.File({str(local_project / "late.h5")!r}, "w")
except dbguard.LeaseHeld:
    print("refused")
"""
    env = {**os.environ, "DBGUARD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"
    assert not (local_project / "late.h5").exists()


# ---------------------------------------------------------------------------- the start-up hook


def test_the_installed_hook_is_the_packaged_line_and_imports_nothing_while_the_variable_is_unset() -> None:
    hook = Path(sysconfig.get_paths()["purelib"]) / HOOK_NAME
    assert hook.read_text() == HOOK_LINE, f"{hook} is missing or stale: reinstall with pip install -e ."
    env = {key: value for key, value in os.environ.items() if key != "DBGUARD_GUARD"}
    probe = "import sys, builtins; print('dbguard' in sys.modules, builtins.open.__name__)"
    for value in (None, "0", ""):
        if value is not None:
            env["DBGUARD_GUARD"] = value
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False
        )
        assert result.stdout.split() == ["False", "open"], (value, result.stderr)
    env["DBGUARD_GUARD"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False
    )
    assert result.stdout.split() == ["True", "_guarded_open"], result.stderr


def test_dbguard_s_own_services_are_never_guarded() -> None:
    assert _is_own_service(["/usr/bin/python3", "-P", "-m", "dbguard", "agent"])
    assert _is_own_service(["python", "-m", "dbguard", "broker", "--address", "tcp://x:1"])
    assert not _is_own_service(["python", "-m", "dbguard", "acquire"])
    assert not _is_own_service(["python", "-c", "x", "-m", "dbguard", "agent"])
    assert not _is_own_service(["python", "script.py"])


def test_install_hook_writes_the_line_once(tmp_path: Path) -> None:
    path = install_hook(tmp_path)
    assert path == tmp_path / HOOK_NAME and path.read_text() == HOOK_LINE
    assert install_hook(tmp_path) == path and os.listdir(tmp_path) == [HOOK_NAME]


def test_the_wheel_carries_the_start_up_hook_at_its_root(tmp_path: Path) -> None:
    import zipfile

    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(HOOK_NAME).decode() == HOOK_LINE
