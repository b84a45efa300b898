"""Damaged files on disk, through the real command line and API.

For each kind of damage (a manifest, a segment, a project's identity, the broker's state, a
host's cache, a project directory that cannot be written) the commands that meet it exit with
the documented code, print no traceback, say what is wrong and what to do, and neither lose nor
rewrite the data that is still good: the damaged file is left as it was for the user to inspect,
and readers fall back to the previous whole generation or refuse, never serve wrong bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dbguard.cache import CacheStore
from dbguard.data.project import Project
from dbguard.data.project import init as init_project
from dbguard.data.store import ProjectStore
from dbguard.lease.client import Client
from tests.support import (
    INTEGRITY,
    LOCK_DELAY,
    TTL,
    RunPython,
    assert_refused,
    identity,
    image,
    is_refusal,
    pending,
    python_on,
    read_images,
    snapshot,
    status,
    try_to_write,
    write_numbered_images,
)
from tools.testbed import BrokerProcess, Host, free_port

REFUSED = 7  # the share refused a write
UNFLUSHED = 8  # not released: unflushed data remains


# ------------------------------------------------------------------ helpers


def build_store(path: Path, batches: list[list[int]]) -> tuple[Project, ProjectStore]:
    """A project whose store has one generation (and one segment) per batch of records, written
    with the library as a writer's flush would under token 1."""
    path.mkdir(parents=True, exist_ok=True)
    project = init_project(path)
    store = ProjectStore(project.path, project.id)
    for batch in batches:
        store.flush([pending(n) for n in batch], token=1, writer={"host": "host-w", "user": "w"})
    return project, store


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Settings for commands that need no agent; nothing listens at the broker address, which
    read-only commands tolerate."""
    return {
        **os.environ,
        "DBGUARD_BROKER": f"tcp://127.0.0.1:{free_port()}",
        "DBGUARD_CACHE": str(tmp_path / "reader-cache"),
        "DBGUARD_REQUEST_TIMEOUT": "1",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }


def dbguard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbguard", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def python_in(env: dict[str, str]) -> RunPython:
    def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


# ---------------------------------------------------------------- manifests


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_json(path: Path) -> None:
    path.write_bytes(b"\x00\x00\x00 this is not a manifest \xff\xfe")


def _wrong_checksum(path: Path) -> None:
    body = json.loads(path.read_bytes())
    body["checksum"] += 1
    path.write_text(json.dumps(body, indent=1))


MANIFEST_DAMAGE = {
    "bit-flip": _flip_a_bit,
    "truncated": _truncate,
    "not-json": _not_json,
    "wrong-checksum": _wrong_checksum,
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE.values(), ids=MANIFEST_DAMAGE.keys())
def test_a_damaged_newest_manifest_is_named_by_verify_and_readers_get_the_generation_before(
    tmp_path: Path, env: dict[str, str], damage: Callable[[Path], None]
) -> None:
    project, store = build_store(tmp_path / "project", [[0, 1, 2], [3, 4]])
    newest = store.manifest_path(2)
    damage(newest)
    before = snapshot(project.path)

    verify = dbguard(env, "verify", str(project.path))
    assert_refused(verify, INTEGRITY, str(newest), "damaged", "previous generation")

    browse = dbguard(env, "browse", str(project.path), "--json")
    assert browse.returncode == 0, browse.stderr
    info = json.loads(browse.stdout)
    assert info["generation"] == 1 and info["databases"][0]["count"] == 3  # the whole one before

    seen = read_images(python_in(env), project.path)
    assert seen["generation"] == 1 and seen["len"] == 3
    assert seen["records"] == {str(n): image(n).tolist() for n in range(3)}
    assert snapshot(project.path) == before  # the damaged manifest is left for the user to inspect


def test_no_single_bit_flip_of_a_manifest_gives_readers_a_different_generation(tmp_path: Path) -> None:
    _, store = build_store(tmp_path / "project", [[0, 1], [2]])
    newest = store.manifest_path(2)
    good = newest.read_bytes()
    original = store.read_manifest(2)
    caught = 0
    for position in range(len(good)):
        for bit in range(8):
            damaged = bytearray(good)
            damaged[position] ^= 1 << bit
            newest.write_bytes(bytes(damaged))
            seen = store.latest()
            if seen.generation == 1:
                caught += 1
            else:  # e.g. the 17th digit of a float: the same number, so the same manifest
                assert seen == original, f"flipping bit {bit} of byte {position} changed the manifest"
    assert caught > 0.99 * 8 * len(good)
    newest.write_bytes(good)
    assert store.latest().generation == 2 and list(store.verify()) == []


def test_a_damaged_only_manifest_is_an_integrity_error_for_readers(
    tmp_path: Path, env: dict[str, str]
) -> None:
    project, store = build_store(tmp_path / "project", [[0, 1]])
    only = store.manifest_path(1)
    _truncate(only)
    before = snapshot(project.path)
    for command in ("browse", "verify"):
        assert_refused(dbguard(env, command, str(project.path)), INTEGRITY, str(only), "damaged")
    assert_refused(dbguard(env, "ls", str(project.path)), INTEGRITY, str(only))
    seen = read_images(python_in(env), project.path)
    assert is_refusal(seen["open"], "IntegrityError", str(only), "damaged")
    assert snapshot(project.path) == before


def test_a_writer_cannot_flush_or_take_over_past_a_damaged_newest_manifest(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_numbered_images(a, project, range(4))
    assert a.run("flush", str(project)).returncode == 0
    write_numbered_images(a, project, range(4, 6))  # unflushed
    project_id = identity(project)
    dirty = CacheStore.dirty_bytes_of(a.cache, project_id)
    store = ProjectStore(project, project_id)
    newest = store.manifest_path(store.generations()[-1])
    _truncate(newest)
    before = snapshot(store.root)

    flushed = a.run("flush", str(project))
    assert_refused(flushed, INTEGRITY, str(newest), "damaged", "restore", "stays in this host's cache")
    assert CacheStore.dirty_bytes_of(a.cache, project_id) == dirty
    assert snapshot(store.root) == before  # no segment or manifest left behind

    assert b.run("break", str(project), "--force").returncode == 0
    taken = b.run("acquire", str(project))
    assert_refused(taken, INTEGRITY, str(newest), "damaged")
    state = json.loads(b.run("status", str(project), "--json").stdout)["projects"][0]
    assert state["state"] == "free", "a refused writer must not keep the lease"
    assert snapshot(store.root) == before


# ----------------------------------------------------------------- segments


def _segment_of(store: ProjectStore, generation: int) -> Path:
    manifest = store.read_manifest(generation)
    added = [name for name, info in manifest.segments.items() if info.get("added") == generation]
    assert len(added) == 1
    return store.segment_path(added[0])


def test_a_bit_flip_in_a_segment_fails_verify_and_that_record_but_not_the_other_segments(
    tmp_path: Path, env: dict[str, str]
) -> None:
    project, store = build_store(tmp_path / "project", [[0, 1, 2], [3, 4, 5]])
    segment = _segment_of(store, 2)
    entry = next(e for e in store.read_index(segment.stem) if e.index == 4)
    data = bytearray(segment.read_bytes())
    data[entry.offset + entry.length // 2] ^= 0x10  # inside record 4's payload
    segment.write_bytes(bytes(data))
    before = snapshot(project.path)

    verify = dbguard(env, "verify", str(project.path))
    assert_refused(verify, INTEGRITY, "record 4 of 'images'", str(segment), "checksum", "restore")

    seen = read_images(python_in(env), project.path)
    assert seen["len"] == 6
    for n in range(3):  # another segment: still readable, byte for byte
        assert seen["records"][str(n)] == image(n).tolist()
    assert is_refusal(seen["records"]["4"], "IntegrityError", segment.name, "checksum", "dbguard verify")
    for n in (3, 5):  # same segment: served right or refused, never wrong
        value = seen["records"][str(n)]
        assert value == image(n).tolist() or is_refusal(value, "IntegrityError", segment.name)
    # Reads fetch record by record: the good ones may be kept locally, the damaged one never.
    copy = Path(env["DBGUARD_CACHE"]) / "segments" / project.id / segment.name
    if copy.exists():
        kept = copy.read_bytes()[entry.offset : entry.offset + entry.length]
        damaged = bytes(data[entry.offset : entry.offset + entry.length])
        assert kept != damaged, "a record that failed its checksum must not be kept"
    assert snapshot(project.path) == before


def test_a_truncated_segment_fails_verify_and_is_never_served(tmp_path: Path, env: dict[str, str]) -> None:
    project, store = build_store(tmp_path / "project", [[0, 1, 2], [3, 4, 5]])
    segment = _segment_of(store, 2)
    _truncate(segment)
    before = snapshot(project.path)

    assert_refused(dbguard(env, "verify", str(project.path)), INTEGRITY, str(segment), "damaged", "restore")
    # Listing needs every segment's index, which was at the end of the lost half.
    for command in (("ls", str(project.path), "images"), ("browse", str(project.path))):
        assert_refused(dbguard(env, *command), INTEGRITY, str(segment), "damaged", "restore")

    seen = read_images(python_in(env), project.path)
    assert seen["len"] == 6
    for n in range(6):
        value = seen["records"][str(n)]
        if n >= 3:
            assert is_refusal(value, "IntegrityError", str(segment)), value
        else:  # served right, or refused while a later segment's index is unreadable
            assert value == image(n).tolist() or is_refusal(value, "IntegrityError", str(segment))
    assert snapshot(project.path) == before


# ---------------------------------------------------------- project identity


GARBLED_IDENTITIES = {
    "not-json": b"{not json",
    "empty": b"",
    "binary": b"\xff\xfe\x00garbage\x80",
    "a-list": b'["id"]',
    "not-a-uuid": b'{"id": "project-1"}',
    "no-id": b'{"format": 1}',
}
EVERY_COMMAND = [
    ("init",),
    ("acquire",),
    ("release",),
    ("status",),
    ("flush",),
    ("clear",),
    ("break", "--force"),
    ("browse",),
    ("ls",),
    ("verify",),
]


@pytest.mark.parametrize("garbled", GARBLED_IDENTITIES.values(), ids=GARBLED_IDENTITIES.keys())
def test_a_garbled_project_identity_stops_every_command_with_exit_6_and_is_left_alone(
    hosts: dict[str, Host], project: Path, garbled: bytes
) -> None:
    a = hosts["a"]
    assert a.run("init", str(project)).returncode == 0
    identity_file = project / ".dbguard" / "project.json"
    identity_file.write_bytes(garbled)
    before = snapshot(project)
    # Every command for one kind of damage; two commands for the others (each costs a process).
    commands = EVERY_COMMAND if garbled == GARBLED_IDENTITIES["not-json"] else [("acquire",), ("ls",)]
    for command in commands:
        name, *options = command
        result = a.run(name, str(project), *options)
        assert_refused(result, INTEGRITY, str(identity_file), "damaged", "restore it")
    opened = read_images(python_on(a), project)
    assert is_refusal(opened["open"], "IntegrityError", str(identity_file), "restore it")
    assert snapshot(project) == before  # nothing re-created, nothing written beside it
    assert a.agent_pid() is None, "no command got as far as starting an agent"


# ------------------------------------------------------------- broker state


def _garbage_everywhere(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _garbage_after_the_meta_pages(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8192] + os.urandom(len(data) - 8192))


def _text(path: Path) -> None:
    path.write_text("leases: none, honestly\n" * 50)


BROKER_DAMAGE = {
    "garbage": _garbage_everywhere,
    "garbage-after-meta": _garbage_after_the_meta_pages,
    "truncated": _truncate,
    "text": _text,
}


@pytest.fixture(scope="module")
def broker_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of a broker that granted a few tokens, then stopped cleanly."""
    state = tmp_path_factory.mktemp("broker") / "state"
    broker = BrokerProcess(state, ttl=TTL, lock_delay=LOCK_DELAY)
    broker.start()
    try:
        with Client(broker.address, timeout=5.0) as client:
            holder = {"host": "h", "user": "u", "agent": "a", "cache": "/c"}
            for n in range(40):
                client.call_ok("acquire", project=f"project-{n}", holder=holder)
    finally:
        broker.stop()
    return state


@pytest.mark.parametrize("damage", BROKER_DAMAGE.values(), ids=BROKER_DAMAGE.keys())
def test_a_broker_with_damaged_state_refuses_to_start_instead_of_serving_lost_tokens(
    broker_state: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    state = tmp_path / "state"
    shutil.copytree(broker_state, state)
    data = state / "leases" / "data.mdb"
    damage(data)
    before = snapshot(state)
    port = free_port()
    started = subprocess.run(
        [
            sys.executable,
            "-m",
            "dbguard",
            "broker",
            "--address",
            f"tcp://127.0.0.1:{port}",
            "--state",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=15,  # one that serves instead of refusing fails the test here
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert started.returncode > 0, f"the broker served, or died of signal {-started.returncode}"
    assert_refused(started, INTEGRITY, str(state / "leases"), "damaged", "move that directory aside")
    assert snapshot(state) == before


# ------------------------------------------------------------------- caches


def test_a_damaged_cache_environment_is_refused_by_every_writer_and_reader_and_the_agent_lives_on(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_numbered_images(a, project, range(4))
    assert a.run("flush", str(project)).returncode == 0
    write_numbered_images(a, project, range(4, 7))  # unflushed
    environment = a.cache / "projects" / identity(project)
    _garbage_everywhere(environment / "data.mdb")
    damaged = snapshot(environment)
    agent = a.agent_pid()
    assert agent is not None
    fix = "move the directory aside"

    assert_refused(a.run("flush", str(project)), INTEGRITY, str(environment), "damaged", fix)
    written = try_to_write(a, project)
    assert is_refusal(written, "IntegrityError", str(environment), fix), written
    read = read_images(python_on(a), project)  # its own unflushed records cannot be shown
    assert is_refusal(read["open"], "IntegrityError", str(environment), fix), read
    cleared = a.run("clear", str(project))
    assert_refused(cleared, INTEGRITY, str(environment), fix)
    released = a.run("release", str(project))
    assert released.returncode != 0 and "Traceback" not in released.stderr
    assert "not released" in released.stderr

    # The agent is alive and still renews the lease, reporting unflushed data it cannot read.
    time.sleep(2 * TTL)
    seen = status(a, project)
    assert a.agent_pid() == agent
    assert seen["projects"][0]["state"] == "held" and seen["projects"][0]["writer"]["host"] == "host-a"
    assert seen["projects"][0]["writer"]["unflushed"] > 0
    assert any(str(environment) in notice["text"] for notice in seen["agent"]["notices"])
    assert snapshot(environment) == damaged  # nothing dropped or rewritten

    # The advice works: moved aside, the project gets a fresh cache and the writer goes on.
    environment.rename(tmp_path / "kept-for-inspection")
    write_numbered_images(a, project, range(4, 6))
    assert a.run("flush", str(project)).returncode == 0
    seen = read_images(python_on(b), project)
    assert seen["records"] == {str(n): image(n).tolist() for n in range(6)}
    assert a.run("release", str(project)).returncode == 0

    # A cache damaged between two leases: the next acquire is refused and holds nothing.
    _garbage_everywhere(environment / "data.mdb")
    assert_refused(a.run("acquire", str(project)), INTEGRITY, str(environment), fix)
    assert status(a, project)["projects"][0]["state"] != "held"
    assert a.agent_pid() == agent


# --------------------------------------------------- unwritable project dirs


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` read-only for every process, root included: chmod does not stop root, a
    read-only bind mount of the directory over itself does (writes fail with EROFS)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_unwritable_project_fails_flush_and_acquire_clearly_and_keeps_the_cached_data(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b, c = hosts["a"], hosts["b"], hosts["c"]
    other = tmp_path / "shared" / "other"
    other.mkdir()
    assert c.run("init", str(other)).returncode == 0
    assert a.run("acquire", str(project)).returncode == 0
    write_numbered_images(a, project, range(5))
    assert a.run("flush", str(project)).returncode == 0
    write_numbered_images(a, project, range(5, 8))  # unflushed
    project_id = identity(project)
    with CacheStore(a.cache, project_id) as cache:
        dirty, entries = cache.dirty_bytes(), cache.dirty_entries()
    assert dirty > 0
    store = ProjectStore(project, project_id).root
    before = snapshot(store)
    fix = "Remount it read-write"

    with read_only(project), read_only(other):
        flushed = a.run("flush", str(project))
        assert_refused(
            flushed, REFUSED, str(store), "Read-only file system", fix, "stays in this host's cache"
        )
        released = a.run("release", str(project))
        assert released.returncode == UNFLUSHED and "not released" in released.stderr
        assert "Traceback" not in released.stderr
        seen = status(a, project)
        assert seen["projects"][0]["state"] == "held" and seen["projects"][0]["writer"]["host"] == "host-a"
        assert any("Read-only file system" in n["text"] for n in seen["agent"]["notices"])
        taken = c.run("acquire", str(other))
        assert_refused(taken, REFUSED, str(other / ".dbguard" / "store"), "Read-only file system", fix)
        assert status(c, other)["projects"][0]["state"] == "free"  # the refused writer let go

    with CacheStore(a.cache, project_id) as cache:
        assert cache.dirty_bytes() == dirty and cache.dirty_entries() == entries
    assert snapshot(store) == before
    # Writable again: the same data flushes, and another host reads all of it.
    flushed = a.run("flush", str(project), "--json")
    assert flushed.returncode == 0 and json.loads(flushed.stdout)["records"] == 3
    seen = read_images(python_on(b), project)
    assert seen["records"] == {str(n): image(n).tolist() for n in range(8)}
