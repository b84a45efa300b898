"""Errors keep their type, fields and exit code wherever they are met (issue 11, part 3).

Every `GuardError` class is found by walking the class tree after importing every dbguard module,
so a class added later without its own wire definition fails here. Each crosses a real agent
reply; the ones a user meets in practice are also triggered for real (a held project, a fenced
store, a damaged manifest, a read-only or full share, a full cache disk, permissions) and
checked in the user's process: the command's exit code and message, the API's class and fields.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dbguard
from dbguard import cache
from dbguard.agent.server import socket_address
from dbguard.cache.errors import CacheError
from dbguard.data.project import init as init_project
from dbguard.data.store import PendingRecord, ProjectStore
from dbguard.errors import (
    CacheDiskFull,
    ExitCode,
    GuardError,
    from_cache_error,
    from_reply,
)
from dbguard.lease import protocol
from dbguard.lease.client import Client
from dbguard.lease.protocol import AgentOp, ErrorKind
from dbguard.settings import load
from tests.support import all_cache_errors, all_guard_errors, sample, small_tmpfs
from tools.testbed import Host, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
ON_CI = os.environ.get("CI") == "true"
# Root without the capabilities that let it past file permissions: what an ordinary user meets.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


# --------------------------------------------------------------------------- the classes


def describe(error: GuardError) -> dict[str, Any]:
    return {"class": type(error).__name__, "message": error.message, "fields": error.fields()}


def test_every_guard_error_declares_its_kind_and_survives_encoding_and_pickling() -> None:
    classes = all_guard_errors()
    assert {cls.__name__ for cls in classes} >= {
        "GuardError",
        "UsageError",
        "LeaseHeld",
        "LeaseLost",
        "ProjectBusy",
        "Fenced",
        "IntegrityError",
        "ShareRefused",
        "CacheDiskFull",
        "UnflushedData",
        "AgentAlreadyRunning",
    }
    for cls in classes:
        assert "kind" in cls.__dict__, f"{cls.__qualname__} declares no wire kind of its own"
        assert cls.exit_code in ExitCode
        error = sample(cls)
        assert isinstance(error, GuardError)
        for name in cls.field_names():  # every field is kept under its own name, not the default
            default = inspect.signature(cls.__init__).parameters[name].default
            assert getattr(error, name) not in (default, None, {}), (cls, name)
        # Through JSON, as the agent and the broker send it.
        reply = protocol.decode(protocol.encode(error.to_reply("req-1")))
        assert reply["ok"] is False and reply["error"] == cls.kind and reply["id"] == "req-1"
        back = from_reply(reply)
        assert type(back) is cls and describe(back) == describe(error)
        assert back.exit_code == cls.exit_code
        # Through pickle, as multiprocessing sends it.
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is cls and describe(again) == describe(error)
    kinds = [kind for cls in classes for kind in (cls.kind, *cls.__dict__.get("also", ()))]
    assert len(kinds) == len(set(kinds)), "two classes claim one wire kind"
    assert set(ErrorKind) <= set(kinds), f"kinds no class decodes: {set(ErrorKind) - set(kinds)}"


def test_the_broker_kinds_and_fields_keep_decoding_as_before() -> None:
    """Replies as the broker and etcd service send them, older kinds included."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"error": "held", "holder": {"host": "h", "user": "u"}, "state": "held"}, "LeaseHeld"),
        ({"error": "grace", "retry_after": 3.0}, "BrokerUnavailable"),
        ({"error": "unavailable"}, "BrokerUnavailable"),
        ({"error": "bad-request"}, "UsageError"),
        ({"error": "unsupported-version"}, "UsageError"),
        ({"error": "usage"}, "UsageError"),
        ({"error": "lost", "reason": "superseded", "current_token": 5}, "LeaseLost"),
        ({"error": "not-holder"}, "LeaseLost"),
        ({"error": "internal"}, "GuardError"),
        ({"error": "from-a-newer-server"}, "GuardError"),
    ]
    for reply, name in cases:
        error = from_reply({"ok": False, "message": "m", **reply}, address="tcp://b:1")
        assert type(error).__name__ == name, reply
    assert from_reply({"error": "grace", "message": "m"}, address="tcp://b:1").fields() == {
        "address": "tcp://b:1"
    }
    lost = from_reply({"error": "lost", "message": "m", "reason": "superseded"})
    assert lost.fields() == {"project": "", "reason": "superseded"}
    # A field of the wrong type (a buggy or hostile server) falls back to its default.
    held = from_reply({"error": "held", "message": "m", "holder": "not a dict"})
    assert held.fields() == {"holder": {}}
    fenced = from_reply({"error": "fenced", "message": "m", "token": True, "current": "9"})
    assert fenced.fields() == {"token": 0, "current": 0}


def test_every_cache_error_becomes_the_guard_error_that_carries_its_facts() -> None:
    expected = {
        "CacheError": "GuardError",
        "UnsafeCacheLocation": "UnsafeCachePath",
        "CacheCorrupt": "IntegrityError",
        "CacheFull": "CacheDiskFull",
    }
    for cls in all_cache_errors():
        error = sample(cls)
        assert isinstance(error, CacheError)
        guard = from_cache_error(error)
        assert type(guard).__name__ == expected.get(cls.__name__, "GuardError"), cls
        assert guard.message == str(error)
        for name in guard.field_names():
            assert getattr(guard, name) == getattr(error, name), (cls, name)


def test_the_readme_lists_every_error_class_with_its_exit_code() -> None:
    text = (REPO / "README.md").read_text()
    table = text[text.index("### Exit codes") : text.index("### Settings")]
    rows = {int(m[1]): m[2] for m in re.finditer(r"^\| (\d) \|(.*)$", table, re.MULTILINE)}
    assert sorted(rows) == [int(code) for code in ExitCode]
    for cls in all_guard_errors():
        assert f"`{cls.__name__}`" in rows[int(cls.exit_code)], f"{cls.__name__} not in row {cls.exit_code}"
        for name in cls.field_names():
            assert f"`{name}`" in rows[int(cls.exit_code)], f"{cls.__name__}.{name} not listed"


# ------------------------------------------------------------- every class via an agent


# A real agent process whose acquire raises the error named in <cache>/raise: every class crosses
# the real socket, the real `_answer` and the real client (test code only; no product switch).
RAISING_AGENT = textwrap.dedent(
    """
    from dbguard.cache import prepare_cache_dir
    from dbguard.agent.server import Agent
    from dbguard.settings import load
    from tests.support import all_cache_errors, all_guard_errors, sample

    classes = {f"{c.__module__}.{c.__qualname__}": c for c in all_guard_errors() + all_cache_errors()}
    settings = load()
    directory = prepare_cache_dir(settings.cache)

    def refuse(self, project, *, wait, takeover, **_):
        raise sample(classes[(directory / "raise").read_text()])

    Agent._acquire = refuse
    Agent(settings, directory).run()
    """
)


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """Settings of a user process: a cache of its own, no broker listening."""
    return {
        **os.environ,
        "DBGUARD_BROKER": f"tcp://127.0.0.1:{free_port()}",
        "DBGUARD_CACHE": str(tmp_path / "cache"),
        "DBGUARD_REQUEST_TIMEOUT": "1",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PYTHONPATH": str(REPO),
    }


def dbguard_command(env: dict[str, str], *args: str, prefix: list[str] | None = None) -> Any:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "dbguard", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
        cwd="/",
    )


def test_every_error_class_arrives_whole_through_a_real_agent_reply(
    tmp_path: Path, user_env: dict[str, str]
) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", RAISING_AGENT],
        env=user_env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cache_dir = Path(user_env["DBGUARD_CACHE"])
        assert wait_for(lambda: (cache_dir / "agent.sock").exists(), 20), agent.stderr
        project = tmp_path / "project"
        project.mkdir()
        identity = init_project(project).id
        client = Client(socket_address(cache_dir.resolve()), timeout=10, attempts=1, what="agent")
        raised = [*all_guard_errors(), *all_cache_errors()]
        for cls in raised:
            (cache_dir / "raise").write_text(f"{cls.__module__}.{cls.__qualname__}")
            expected = sample(cls)
            if isinstance(expected, CacheError):
                expected = from_cache_error(expected)
            assert isinstance(expected, GuardError)
            # The API's side: this process is the user's.
            with pytest.raises(GuardError) as caught:
                client.call_ok(AgentOp.ACQUIRE, project=identity, path=str(project))
            assert describe(caught.value) == describe(expected), cls
            assert type(caught.value) is type(expected)
            # The command's side: the documented exit code and the message.
            result = dbguard_command(user_env, "acquire", str(project))
            assert result.returncode == int(expected.exit_code), (cls, result.stderr)
            assert "Traceback" not in result.stderr
            if type(expected).__name__ == "LeaseHeld":  # the API words it from the holder
                assert "held by zed on host-z" in result.stderr, result.stderr
            else:
                assert expected.message in result.stderr, (cls, result.stderr)
        client.close()
    finally:
        agent.terminate()
        agent.wait(timeout=10)


# ------------------------------------------------------------------- real triggers

PROBE = textwrap.dedent(
    """
    import json, sys
    import dbguard
    try:
        exec(sys.argv[1])
    except dbguard.GuardError as exc:
        print(json.dumps({"class": type(exc).__name__, "exit_code": int(exc.exit_code),
                          "message": exc.message, "fields": exc.fields()}))
    else:
        print(json.dumps({"class": None}))
    """
)


def probe_on(host: Host, code: str) -> dict[str, Any]:
    """Run ``code`` with the Python API in a process of ``host``; the GuardError it raised."""
    result = subprocess.run(
        host.on_host([sys.executable, "-c", PROBE, code]),
        env=host.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return found


def probe(env: dict[str, str], code: str, prefix: list[str] | None = None) -> dict[str, Any]:
    result = subprocess.run(
        [*(prefix or []), sys.executable, "-c", PROBE, code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return found


def refused(result: subprocess.CompletedProcess[str], code: int, *phrases: str) -> str:
    said = result.stderr + result.stdout
    assert result.returncode == code, f"exit {result.returncode}, not {code}:\n{said}"
    assert "Traceback" not in said, said
    for phrase in phrases:
        assert phrase in said, f"{phrase!r} not in:\n{said}"
    return said


def project_id(project: Path) -> str:
    return str(json.loads((project / ".dbguard" / "project.json").read_text())["id"])


def write_on(host: Host, project: Path, count: int, side: int = 16) -> None:
    result = host.python(
        f"import numpy as np, dbguard\n"
        f"with dbguard.open({str(project)!r}, 'images', 'a') as db:\n"
        f"    for n in range({count}):\n"
        f"        db.append(np.full(({side}, {side}), n, np.float32))\n"
    )
    assert result.returncode == 0, result.stderr


def test_a_held_project_and_a_malformed_request_keep_their_class_through_the_agent(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    refused(b.run("acquire", str(project)), ExitCode.HELD, "held by", "on host-a", "--takeover")
    held = probe_on(b, f"dbguard.acquire({str(project)!r})")
    assert held["class"] == "LeaseHeld" and held["exit_code"] == ExitCode.HELD
    assert held["fields"]["holder"]["host"] == "host-a" and held["fields"]["holder"]["token"] == 1
    assert "host-a" in held["message"]

    # A request the agent cannot act on is a usage error (it was "unexpected", exit 1).
    with Client(socket_address(a.cache.resolve()), timeout=5, attempts=1, what="agent") as agent:
        with pytest.raises(GuardError) as caught:
            agent.call_ok(AgentOp.ACQUIRE, project="../not-a-project-id", path=str(project))
        assert type(caught.value).__name__ == "UsageError" and caught.value.exit_code == ExitCode.USAGE
        assert "not-a-project-id" in caught.value.message
        if hasattr(AgentOp, "MARK_DIRTY"):
            # A writer whose token is stale asks to write: the agent's LeaseLost, whole.
            with pytest.raises(GuardError) as caught:
                agent.call_ok(AgentOp.MARK_DIRTY, project=project_id(project), token=99)
            assert type(caught.value).__name__ == "LeaseLost" and caught.value.exit_code == ExitCode.HELD
            assert caught.value.fields()["project"] == project_id(project)
            assert "no longer holds" in caught.value.message


def test_a_lost_lease_and_a_busy_project_keep_their_class(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_on(a, project, 3)

    # Still open for writing here: clear refuses with ProjectBusy (exit 2, not 1).
    holder = a.popen_python(
        f"import time, dbguard\n"
        f"db = dbguard.open({str(project)!r}, 'images', 'a')\n"
        f"print('open', flush=True)\n"
        f"time.sleep(120)\n"
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        refused(a.run("clear", str(project)), ExitCode.USAGE, "open for writing", "--force")
        busy = probe_on(a, f"dbguard.clear({str(project)!r})")
        assert busy["class"] == "ProjectBusy" and busy["exit_code"] == ExitCode.USAGE
        assert "open for writing" in busy["message"]
    finally:
        holder.kill()
        holder.wait()

    # Broken by an operator: once a's agent has noticed, flush says the lease was lost.
    assert b.run("break", str(project), "--force").returncode == 0
    assert wait_for(lambda: '"state": "lost"' in a.run("status", str(project), "--json").stdout, 15)
    said = refused(a.run("flush", str(project)), ExitCode.HELD, "lost the writer lease", "dbguard recover")
    assert "Traceback" not in said
    lost = probe_on(a, f"dbguard.flush({str(project)!r})")
    assert lost["class"] == "LeaseLost" and lost["exit_code"] == ExitCode.HELD
    assert lost["fields"]["project"] == project_id(project) and lost["fields"]["reason"]


def test_a_fenced_store_arrives_as_fenced_with_both_tokens(hosts: dict[str, Host], project: Path) -> None:
    a = hosts["a"]
    identity = init_project(project).id
    # A newer writer fenced the store with token 100, and neither the broker (fresh) nor the
    # writer record knows: the token the broker grants is older than the store's.
    ProjectStore(project, identity).fence(100, {"host": "host-x", "user": "x"})
    said = refused(a.run("acquire", str(project)), ExitCode.INTEGRITY, "fencing token 100", "host-x")
    assert "Traceback" not in said
    fenced = probe_on(a, f"dbguard.acquire({str(project)!r})")
    assert fenced["class"] == "Fenced" and fenced["exit_code"] == ExitCode.INTEGRITY
    assert fenced["fields"]["current"] == 100 and 0 < fenced["fields"]["token"] < 100
    assert "fencing token 100" in fenced["message"]


def build_store(path: Path, batches: list[list[int]]) -> tuple[str, ProjectStore]:
    path.mkdir(parents=True, exist_ok=True)
    identity = init_project(path).id
    store = ProjectStore(path, identity)
    for batch in batches:
        records = [
            PendingRecord("images", n, "<f4", (4, 4), np.full((4, 4), n, np.float32).tobytes(), "{}")
            for n in batch
        ]
        store.flush(records, token=1, writer={"host": "host-w", "user": "w"})
    return identity, store


def test_a_damaged_manifest_arrives_as_integrity_error_with_its_path(
    hosts: dict[str, Host], project: Path
) -> None:
    a = hosts["a"]
    _, store = build_store(project, [[0, 1]])
    manifest = store.manifest_path(1)
    manifest.write_bytes(b"{ not json")
    refused(a.run("acquire", str(project)), ExitCode.INTEGRITY, str(manifest), "damaged")
    damaged = probe_on(a, f"dbguard.acquire({str(project)!r})")
    assert damaged["class"] == "IntegrityError" and damaged["fields"] == {"path": str(manifest)}


# ------------------------------------------------------------------ the share refuses


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Read-only for every process, root included (a read-only bind mount: writes get EROFS)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_share_is_a_refusal_with_its_own_exit_code_not_a_request_to_flush_again(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, c = hosts["a"], hosts["c"]
    other = tmp_path / "shared" / "other"
    other.mkdir()
    assert c.run("init", str(other)).returncode == 0
    assert a.run("acquire", str(project)).returncode == 0
    write_on(a, project, 3)
    store = project / ".dbguard" / "store"

    with read_only(project), read_only(other):
        # acquire: told to fix the share and acquire again, never to flush
        said = refused(
            c.run("acquire", str(other)), ExitCode.REFUSED, "Read-only file system", "dbguard acquire"
        )
        assert "flush" not in said and "Remount it read-write" in said
        taken = probe_on(c, f"dbguard.acquire({str(other)!r})")
        assert taken["class"] == "ShareRefused" and taken["exit_code"] == ExitCode.REFUSED
        assert taken["fields"]["errno"] == errno.EROFS
        assert taken["fields"]["path"].startswith(str(other / ".dbguard"))
        # flush: the data stays in the cache, flush again once fixed
        said = refused(a.run("flush", str(project)), ExitCode.REFUSED, str(store), "Read-only file system")
        assert "dbguard flush" in said and "stays in this host's cache" in said
        flushed = probe_on(a, f"dbguard.flush({str(project)!r})")
        assert flushed["class"] == "ShareRefused" and flushed["fields"]["errno"] == errno.EROFS
        # release: refused because data is unflushed, which is not damage, and says why
        said = refused(
            a.run("release", str(project)), ExitCode.UNFLUSHED, "not released", "Read-only file system"
        )
        released = probe_on(a, f"dbguard.release({str(project)!r})")
        assert released["class"] == "UnflushedData" and released["exit_code"] == ExitCode.UNFLUSHED
        assert released["fields"]["project"] == project_id(project) and released["fields"]["unflushed"] > 0
    flushed_after = a.run("flush", str(project), "--json")
    assert flushed_after.returncode == 0 and json.loads(flushed_after.stdout)["records"] == 3


def test_a_full_share_is_a_refusal_that_names_the_path_and_the_errno(
    hosts: dict[str, Host], tmp_path: Path
) -> None:
    a = hosts["a"]
    with small_tmpfs(tmp_path / "tiny-share") as share:
        project = share / "project"
        project.mkdir()
        assert a.run("acquire", str(project)).returncode == 0
        write_on(a, project, 12, side=256)  # 3 MiB of records for a 2 MiB filesystem
        said = refused(
            a.run("flush", str(project)), ExitCode.REFUSED, "No space left on device", "Free some space"
        )
        assert "dbguard flush" in said
        full = probe_on(a, f"dbguard.flush({str(project)!r})")
        assert full["class"] == "ShareRefused" and full["fields"]["errno"] == errno.ENOSPC
        assert full["fields"]["path"].startswith(str(project / ".dbguard" / "store"))
        a.kill_agent()  # it keeps files of the tmpfs open


def test_a_share_closed_to_this_user_is_a_refusal_naming_the_path(
    hosts: dict[str, Host], tmp_path: Path
) -> None:
    a = hosts["a"]
    project = tmp_path / "shared" / "theirs"
    project.mkdir(parents=True)
    init_project(project)
    # Another user's project, readable by all and writable only by its owner.
    for path in (project, *project.rglob("*")):
        os.chown(path, 65534, 65534)
    said = refused(
        subprocess.run(
            NO_DAC + a.command(["acquire", str(project)]), env=a.env, capture_output=True, text=True
        ),
        ExitCode.REFUSED,
        "Permission denied",
        str(project / ".dbguard"),
        "ask its owner, nobody",
    )
    assert "flush" not in said


# ------------------------------------------------------------------ the cache's disk


def test_a_full_cache_disk_is_a_guard_error_naming_the_cache_and_the_fix(
    tmp_path: Path, project: Path, broker: Any
) -> None:
    host = Host("host-f", tmp_path / "hosts", broker, flush_interval="3600")
    other = tmp_path / "shared" / "other"
    other.mkdir()
    with small_tmpfs(host.cache) as cache_dir:
        try:
            assert host.run("acquire", str(project)).returncode == 0
            full = probe_on(
                host,
                f"import numpy as np\n"
                f"with dbguard.open({str(project)!r}, 'images', 'a') as db:\n"
                f"    for n in range(100):\n"
                f"        db.append(np.full((256, 256), n, np.float32))\n",
            )
            assert full["class"] == "CacheDiskFull" and full["exit_code"] == ExitCode.REFUSED
            assert full["fields"]["path"] == str(cache_dir.resolve())
            assert full["fields"]["errno"] in (errno.ENOSPC, errno.EDQUOT, errno.EIO)
            assert "DBGUARD_CACHE" in full["message"] and "Free space" in full["message"]
            # A new project's cache cannot even be made: the command says so, and the agent lives.
            agent = host.agent_pid()
            said = refused(
                host.run("acquire", str(other)), ExitCode.REFUSED, str(cache_dir.resolve()), "DBGUARD_CACHE"
            )
            assert "lmdb" not in said
            assert host.agent_pid() == agent
            taken = probe_on(host, f"dbguard.acquire({str(other)!r})")
            assert taken["class"] == "CacheDiskFull"
        finally:
            host.stop()


def test_cache_full_is_raised_by_the_cache_itself_on_a_full_disk(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "tiny-cache") as directory:
        root = cache.prepare_cache_dir(directory / "c")
        with cache.CacheStore(root, "p1") as store, pytest.raises(cache.CacheFull) as caught:
            for n in range(100):
                store.append("images", np.full((256, 256), n, np.float32))
        assert caught.value.path == str(root)
        # Opening a new environment there is refused, not killed by SIGBUS in LMDB.
        with pytest.raises(cache.CacheFull):
            cache.CacheStore(root, "p2")
        assert isinstance(from_cache_error(caught.value), CacheDiskFull)


# ---------------------------------------------------------- usage, damage, permissions


@pytest.mark.parametrize("address", ["tcp://", "tcp://host:abc", "tcp://:7390", "tcp://host:70000"])
def test_a_malformed_broker_address_is_a_usage_error_naming_the_setting(
    user_env: dict[str, str], address: str
) -> None:
    env = {**user_env, "DBGUARD_BROKER": address}
    refused(dbguard_command(env, "status"), ExitCode.USAGE, "DBGUARD_BROKER", address, "tcp://host:port")
    found = probe(env, "dbguard.status()")
    assert found["class"] == "UsageError" and "DBGUARD_BROKER" in found["message"]


def test_an_address_zeromq_cannot_connect_to_is_a_usage_error(user_env: dict[str, str]) -> None:
    env = {**user_env, "DBGUARD_BROKER": "tcp://*:7390"}
    refused(dbguard_command(env, "status"), ExitCode.USAGE, "tcp://*:7390", "DBGUARD_BROKER")


def test_a_missing_segment_is_an_integrity_error_naming_the_file(
    tmp_path: Path, user_env: dict[str, str]
) -> None:
    project = tmp_path / "project"
    _, store = build_store(project, [[0, 1], [2, 3]])
    segment = next(iter(sorted(store.segments_dir.iterdir())))
    segment.unlink()
    # (`ls PROJECT` alone reads only the manifest's counts, and does not meet it.)
    for command in (["ls", str(project), "images"], ["browse", str(project)]):
        env = {**user_env, "DBGUARD_CACHE": str(tmp_path / f"cache-{len(command)}-{command[0]}")}
        refused(dbguard_command(env, *command), ExitCode.INTEGRITY, str(segment), "missing", "restore")
    found = probe(user_env, f"dbguard.api.ls({str(project)!r}, 'images')")
    assert found["class"] == "IntegrityError" and found["fields"] == {"path": str(segment)}


def test_a_store_directory_replaced_by_a_file_is_an_integrity_error(
    tmp_path: Path, user_env: dict[str, str]
) -> None:
    project = tmp_path / "project"
    _, store = build_store(project, [[0, 1]])
    subprocess.run(["rm", "-r", str(store.root)], check=True)
    store.root.write_text("not a directory\n")
    for command in ("browse", "ls", "verify"):
        refused(dbguard_command(user_env, command, str(project)), ExitCode.INTEGRITY, str(store.root), "file")
    found = probe(user_env, f"dbguard.api.browse({str(project)!r})")
    assert found["class"] == "IntegrityError" and found["fields"] == {"path": str(store.root)}


def test_permissions_of_another_user_name_the_path_and_their_cache_is_unsafe(
    tmp_path: Path, user_env: dict[str, str]
) -> None:
    if os.geteuid() != 0:
        if ON_CI:
            pytest.fail("CI runs as root and must run the permission tests")
        pytest.skip("making directories of another user needs root")
    closed = tmp_path / "closed"
    closed.mkdir()
    project = closed / "project"
    build_store(project, [[0]])
    theirs = tmp_path / "their-cache"
    theirs.mkdir()
    for path in (closed, theirs):
        os.chown(path, 65534, 65534)
        path.chmod(0o700)

    # A project another user's directory hides: the share refuses, naming the directory.
    env = {**user_env, "DBGUARD_CACHE": str(tmp_path / "my-cache")}
    refused(
        dbguard_command(env, "browse", str(project), prefix=NO_DAC),
        ExitCode.REFUSED,
        str(closed),
        "Permission denied",
    )
    found = probe(env, f"dbguard.api.browse({str(project)!r})", prefix=NO_DAC)
    assert found["class"] == "ShareRefused" and found["fields"]["errno"] == errno.EACCES

    # Another user's 0700 cache directory: unsafe, exit 5.
    env = {**user_env, "DBGUARD_CACHE": str(theirs)}
    refused(dbguard_command(env, "recover", prefix=NO_DAC), ExitCode.UNSAFE_CACHE, str(theirs), "uid 65534")
    found = probe(env, "dbguard.api.recover()", prefix=NO_DAC)
    assert found["class"] == "UnsafeCachePath" and found["fields"]["path"] == str(theirs)
    # A cache directory inside another user's closed directory: unsafe too, naming it.
    env = {**user_env, "DBGUARD_CACHE": str(closed / "cache")}
    refused(
        dbguard_command(env, "recover", prefix=NO_DAC),
        ExitCode.UNSAFE_CACHE,
        str(closed / "cache"),
        "DBGUARD_CACHE",
    )


def test_unflushed_records_without_the_lease_are_not_damage(hosts: dict[str, Host], project: Path) -> None:
    a = hosts["a"]
    assert a.run("acquire", str(project)).returncode == 0
    write_on(a, project, 2)
    a.kill_agent()  # nothing holds the lease here to flush under
    said = refused(a.run("flush", str(project)), ExitCode.UNFLUSHED, "unflushed", "dbguard acquire")
    assert "damaged" not in said
    found = probe_on(a, f"dbguard.flush({str(project)!r})")
    assert found["class"] == "UnflushedData" and found["exit_code"] == ExitCode.UNFLUSHED
    assert found["fields"]["project"] == project_id(project) and found["fields"]["unflushed"] > 0


def test_the_api_raises_guard_errors_for_what_a_caller_can_pass(
    tmp_path: Path, user_env: dict[str, str]
) -> None:
    project = tmp_path / "project"
    build_store(project, [[0, 1]])
    settings = load(environ=user_env)
    for call in (
        lambda: dbguard.open(project, 123, "r", settings=settings),  # type: ignore[arg-type]
        lambda: dbguard.open(project, "images", "x", settings=settings),
        lambda: dbguard.open(123, "images", "r", settings=settings),  # type: ignore[arg-type]
        lambda: dbguard.init(123),  # type: ignore[arg-type]
        lambda: dbguard.acquire(project, wait="soon", settings=settings),  # type: ignore[arg-type]
    ):
        with pytest.raises(dbguard.UsageError):
            call()
    with dbguard.open(project, "images", "r", settings=settings) as db:
        assert db[1].tolist() == np.full((4, 4), 1, np.float32).tolist()
        with pytest.raises(dbguard.UsageError):
            db["first"]  # type: ignore[index]
        with pytest.raises(IndexError):
            db[5]
        with pytest.raises(dbguard.UsageError):
            db.append(np.zeros(3))  # read-only
