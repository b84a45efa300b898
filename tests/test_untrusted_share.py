"""What a project directory and a cache hold is read as untrusted (issue 12): anyone with write
access to the share (a colleague, a buggy script, a half-restored backup) may have left anything
there, and a cache directory may be cut short by a full disk or a careless `truncate`.

One test per row of the issue's table: a truncated cache environment; files where dbguard keeps
directories and the other way round; a manifest that names a segment outside the store; a lost
project.json. Each is met by the real command line and API in real processes, with a documented
exit code and a message that names the file and the fix, and the agent goes on serving the other
projects. Then property tests: damaged manifests, indexes, segments and writer records, generated
by hypothesis, never crash `browse`, `ls`, `verify`, `status`, reads or `acquire`, never touch a
path outside the project, cache and state directories, and never return a record that fails its
checksum. Last, what else the audit found: the agent's saved lease table, local segment copies
and their indexes, notes of data kept aside.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import struct
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zlib_ng.zlib_ng import crc32

import dbguard
from dbguard import api
from dbguard.cache import CacheStore
from dbguard.data import flushing as flushing_module
from dbguard.data.project import init as init_project
from dbguard.data.project import write_writer_record
from dbguard.data.store import ProjectStore, _crc_json, record_crc
from dbguard.errors import ExitCode, GuardError
from dbguard.results import Status
from dbguard.settings import Settings
from tests.support import (
    INTEGRITY,
    TTL,
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
from tools.testbed import BrokerProcess, Host, wait_for

TRAILER = struct.Struct("<8sIQQI")  # a segment's trailer (data.store._TRAILER)


def shared(tmp_path: Path, *names: str) -> list[Path]:
    """Project directories that every simulated host sees."""
    made = []
    for name in names:
        path = tmp_path / "shared" / name
        path.mkdir(parents=True)
        made.append(path)
    return made


def held_by(host: Host, project: Path, name: str, seen: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's lease, which host ``name`` must hold (as `status` said, if ``seen``)."""
    state = (seen or status(host, project))["projects"][0]
    assert state["state"] == "held" and state["writer"]["host"] == name, state
    return dict(state)


# ------------------------------------------------------------ a truncated cache


def test_a_truncated_cache_is_refused_with_exit_6_and_the_agent_keeps_serving_the_other_projects(
    hosts: dict[str, Host], tmp_path: Path
) -> None:
    a = hosts["a"]
    damaged, other = shared(tmp_path, "damaged", "other")
    for project in (damaged, other):
        assert a.run("acquire", str(project)).returncode == 0
    write_numbered_images(a, damaged, range(4))
    assert a.run("flush", str(damaged)).returncode == 0
    write_numbered_images(a, damaged, range(4, 6))  # unflushed
    environment = a.cache / "projects" / identity(damaged)
    os.truncate(environment / "data.mdb", 8192)  # the issue's `truncate -s 8192 .../data.mdb`
    agent = a.agent_pid()
    assert agent is not None
    fix = "move the directory aside"

    # Each died of SIGBUS (exit 135, no message) before: now exit 6, naming the directory.
    for command in ("flush", "clear"):
        assert_refused(a.run(command, str(damaged)), INTEGRITY, str(environment), "truncated", fix)
    written = try_to_write(a, damaged)
    assert is_refusal(written, "IntegrityError", str(environment), "truncated", fix), written
    read = read_images(python_on(a), damaged)
    assert is_refusal(read["open"], "IntegrityError", str(environment), fix), read

    # The agent lives on and renews both leases; the damaged one as holding unflushed data.
    time.sleep(2 * TTL)
    assert a.agent_pid() == agent
    assert held_by(a, other, "host-a")["writer"]["unflushed"] == 0
    seen = status(a, damaged)
    assert held_by(a, damaged, "host-a", seen)["writer"]["unflushed"] > 0
    notices = seen["agent"]["notices"]
    assert any(str(environment) in n["text"] and "truncated" in n["text"] for n in notices), notices

    # A restarted agent (a crash, a reboot) takes both leases back instead of dying again.
    a.kill_agent()
    assert a.run("status", str(other)).returncode == 0  # starts it: it has leases to reclaim
    assert wait_for(lambda: a.agent_pid() is not None, 10)
    restarted = a.agent_pid()
    time.sleep(2 * TTL)
    assert a.agent_pid() == restarted, f"the agent died again:\n{a.agent_log()[-3000:]}"
    held_by(a, other, "host-a")
    held_by(a, damaged, "host-a")
    assert_refused(a.run("flush", str(damaged)), INTEGRITY, str(environment), fix)

    # The advice works: moved aside, the project gets a fresh cache and can be cleared.
    environment.rename(tmp_path / "kept-for-inspection")
    assert a.run("clear", str(damaged)).returncode == 0
    assert status(a, damaged)["projects"][0]["state"] == "free"
    held_by(a, other, "host-a")
    assert a.agent_pid() == restarted


# ------------------------------------------ files and directories in each other's place


def _directory_for_a_file(meta: Path, relative: str) -> None:
    (meta / relative).mkdir(parents=True)


def _file_for_a_directory(meta: Path, relative: str) -> None:
    (meta / relative).parent.mkdir(parents=True, exist_ok=True)
    (meta / relative).write_text("not a directory\n")


# What is in the way, made how, and the path the message must name.
IN_THE_WAY: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "writer.json": (_directory_for_a_file, "writer.json"),
    "store": (_file_for_a_directory, "store"),
    "store/manifests": (_file_for_a_directory, "store/manifests"),
    "store/segments": (_file_for_a_directory, "store/segments"),
    "store/manifests/000000000001.json": (_directory_for_a_file, "store/manifests/000000000001.json"),
}


def test_files_where_directories_belong_and_back_refuse_acquire_with_exit_6_and_release_the_grant(
    hosts: dict[str, Host], tmp_path: Path
) -> None:
    a = hosts["a"]
    (other,) = shared(tmp_path, "other")
    assert a.run("acquire", str(other)).returncode == 0
    agent = a.agent_pid()
    for number, (relative, (make, named)) in enumerate(IN_THE_WAY.items()):
        (project,) = shared(tmp_path, f"project-{number}")
        init_project(project)  # what `dbguard init` does, without starting a process for it
        meta = project / ".dbguard"
        make(meta, relative)
        before = sorted(str(p.relative_to(meta)) for p in meta.rglob("*"))

        # Before: the agent died after the grant (or answered exit 1) and the lease stayed held.
        result = a.run("acquire", str(project))
        refused_at = time.monotonic()
        assert_refused(result, INTEGRITY, str(meta / named), "move that", "aside")
        assert status(a, project)["projects"][0]["state"] == "free", "the grant must be given back"
        assert a.agent_pid() == agent, f"the agent died on {relative}:\n{a.agent_log()[-3000:]}"
        after = sorted(str(p.relative_to(meta)) for p in meta.rglob("*"))
        assert [p for p in after if p not in before and not p.startswith("store")] == [], after

        # The advice works: moved aside, the project can be acquired and written.
        (meta / named).rename(tmp_path / f"aside-{number}")
        assert a.run("acquire", str(project)).returncode == 0, a.agent_log()[-2000:]
        write_numbered_images(a, project, range(2))
        assert a.run("release", str(project)).returncode == 0

    # Every other lease was renewed all along: one the agent stopped renewing at the last refusal
    # would have expired two TTLs after it (the steps since took part of that).
    time.sleep(max(0.0, refused_at + 2 * TTL - time.monotonic()))
    held_by(a, other, "host-a")
    assert a.agent_pid() == agent


# ------------------------------------------------- names that lead out of the store


def resign(path: Path, body: dict[str, Any]) -> None:
    """Write ``body`` as a manifest with a checksum that matches: a checksum proves a file whole,
    not sane (anyone can compute one)."""
    body = {key: value for key, value in body.items() if key != "checksum"}
    body["checksum"] = _crc_json(body)
    path.write_text(json.dumps(body, indent=1))


AUDIT_HOOK = textwrap.dedent(
    """
    import json, os, sys
    watched, seen = os.path.realpath(sys.argv[2]), []
    def hook(event, args):
        events = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove",
                  "shutil.copyfile", "os.link")
        if event in events:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)):
                    real = os.path.realpath(os.fsdecode(path))
                    if real == watched or real.startswith(watched + os.sep):
                        seen.append([event, real])
    sys.addaudithook(hook)
    import dbguard
    outcome = {}
    try:
        with dbguard.open(sys.argv[1], "images", "r") as db:
            outcome["records"] = {i: db[i].tolist() for i in range(len(db))}
            outcome["generation"] = db.generation
    except dbguard.GuardError as exc:
        outcome["error"] = [type(exc).__name__, int(exc.exit_code), str(exc)]
    outcome["touched"] = seen
    print(json.dumps(outcome))
    """
)


def test_a_manifest_naming_a_segment_outside_the_store_is_never_followed_and_verify_reports_it(
    hosts: dict[str, Host], tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    (project,) = shared(tmp_path, "project")
    assert a.run("acquire", str(project)).returncode == 0
    write_numbered_images(a, project, range(3))
    assert a.run("release", str(project)).returncode == 0  # flushes
    store = ProjectStore(project, identity(project))
    newest = store.generations()[-1]
    body = json.loads(store.manifest_path(newest).read_text())
    (name,) = body["segments"]
    # Outside: a perfectly good copy of the segment, so a reader that followed the name would
    # succeed; the reader read it and wrote an index file beside it.
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(store.segment_path(name), outside / "X.seg")
    escape = "../../../../../outside/X"
    assert (store.segments_dir / f"{escape}.seg").resolve() == (outside / "X.seg").resolve()
    body["generation"] = newest + 1
    body["segments"] = {escape: body["segments"][name]}
    hostile = store.manifest_path(newest + 1)
    resign(hostile, body)
    before = snapshot(tmp_path / "outside")

    verify = b.run("verify", str(project))
    assert_refused(verify, INTEGRITY, str(hostile), escape, "not a plain name")
    browse = b.run("browse", str(project), "--json")
    assert browse.returncode == 0, browse.stderr
    assert json.loads(browse.stdout)["generation"] == newest  # the whole one before it
    read = python_on(b)(AUDIT_HOOK, str(project), str(outside))
    assert read.returncode == 0 and "Traceback" not in read.stderr, read.stderr
    seen = json.loads(read.stdout)
    assert seen["touched"] == [], "a reader touched a path outside the project"
    assert seen["generation"] == newest
    assert seen["records"] == {str(n): image(n).tolist() for n in range(3)}
    assert snapshot(tmp_path / "outside") == before  # no index file written outside the cache
    assert sorted(p.name for p in outside.iterdir()) == ["X.seg"]

    # A writer does not publish past it either: it cannot tell whose it is.
    assert_refused(a.run("acquire", str(project)), INTEGRITY, str(hostile))
    assert status(a, project)["projects"][0]["state"] == "free"


# ------------------------------------------------------------- a lost identity


def test_a_lost_project_json_is_recovered_from_the_store_instead_of_minting_a_new_id(
    hosts: dict[str, Host], tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    (project,) = shared(tmp_path, "project")
    assert a.run("acquire", str(project)).returncode == 0
    write_numbered_images(a, project, range(3))
    assert a.run("release", str(project)).returncode == 0
    original = identity(project)
    identity_file = project / ".dbguard" / "project.json"
    identity_file.unlink()
    (project / "micrographs").mkdir()

    # Readers find the project from a subdirectory, by its store, and write nothing.
    browse = b.run("browse", str(project / "micrographs"), "--json")
    assert browse.returncode == 0, browse.stderr
    assert json.loads(browse.stdout)["project"] == original
    assert not identity_file.exists() and not (project / "micrographs" / ".dbguard").exists()
    assert read_images(python_on(b), project)["records"] == {str(n): image(n).tolist() for n in range(3)}

    # Before: a new id, then exit 6 and no way forward. Now: the store's id, written back.
    acquired = a.run("acquire", str(project))
    assert acquired.returncode == 0, acquired.stderr
    assert "was missing" in acquired.stderr and original in acquired.stderr, acquired.stderr
    assert identity(project) == original
    write_numbered_images(a, project, range(3, 5))
    assert a.run("release", str(project)).returncode == 0
    assert read_images(python_on(b), project)["len"] == 5

    # Where the old bug already made a new id, the message says how to get back.
    identity_file.write_text(json.dumps({"id": str(uuid.uuid4())}))
    refused = a.run("acquire", str(project))
    assert_refused(refused, INTEGRITY, "belongs to project", original, "move it aside")
    assert status(a, project)["projects"][0]["state"] == "free"
    identity_file.rename(tmp_path / "wrong-project.json")
    assert a.run("acquire", str(project)).returncode == 0
    assert identity(project) == original
    assert a.run("release", str(project)).returncode == 0


# ------------------------------------------------------------------ property tests

# Names that lead out of the store, or are no names at all; ``{root}`` is the example's root,
# whose sentinel directory any escape aims at.
ESCAPES = [
    "../../../../sentinel/x",
    "../../../sentinel/x",
    "{root}/sentinel/x",
    "..",
    ".",
    "",
    "a/b",
    "x\x00y",
    ".hidden",
    "../" * 12 + "etc/passwd",
    "x" * 300,
]

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(ESCAPES),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
ENTRY_FIELDS = ["db", "i", "off", "len", "dtype", "shape", "crc", "attrs"]
# Last, dtypes whose items have no size: numpy makes arrays of "V0" (np.zeros(3, "V0")), and
# none of "S" or "U0" (it gives them one character).
HOSTILE_DTYPES = [
    "O",
    "i4,f8",
    "(2,)f4",
    "V99999999",
    "not a dtype",
    "<f4",
    "u1",
    "S3",
    "M8[ns]",
    "S",
    "V0",
    "U0",
]
# The shape of a forged entry: none, empty, small, and as big as a count may be.
FORGED_SHAPE = st.lists(st.sampled_from([0, 1, 3, 384, 2**31, 2**62]), max_size=3)
MANIFEST_FIELDS = ["generation", "token", "project", "created", "writer", "segments", "databases", "retired"]


class Example:
    """One project, written as a writer's flushes would (two generations, five records), with a
    sentinel directory beside it that nothing may touch, and this example's cache and state.

    Each example is a copy of one template, made once (`template`), at the same path: hypothesis
    replays an example to shrink it and to check that it fails again, and only the same bytes at
    the same place make a replayed damage (a byte position, the n-th file, a name leading to
    ``{root}``) hit what it hit the first time."""

    def __init__(self, root: Path, template: Path, *, fresh_id: bool = False) -> None:
        shutil.rmtree(root, ignore_errors=True)  # what the previous example left
        shutil.copytree(template, root, symlinks=True)
        self.root = root
        self.project_dir = root / "project"
        if fresh_id:
            self._give_new_identity()
        self.project = init_project(self.project_dir)  # the one the copy is: nothing is written
        self.store = ProjectStore(self.project.path, self.project.id)
        self.cache = root / "cache"
        self.state = root / "state"
        self.sentinel = self.stamp(root / "sentinel")
        # The checksum of every record as written: anything served must be one of them.
        self.originals = {record_crc(image(n).tobytes(), json.dumps({"n": n})) for n in range(5)}

    @staticmethod
    def make_template(root: Path) -> Path:
        root.mkdir(parents=True)
        project_dir = root / "project"
        project_dir.mkdir()
        project = init_project(project_dir)
        store = ProjectStore(project.path, project.id)
        for batch in ([0, 1, 2], [3, 4]):
            store.flush([pending(n) for n in batch], token=1, writer={"host": "w", "user": "u"})
        write_writer_record(project, writer={"host": "w", "user": "u", "since": "", "token": 1}, token=1)
        sentinel = root / "sentinel"
        sentinel.mkdir()
        # A good copy of a segment and an index beside it, so that following a name out of the
        # store would succeed rather than fail by luck.
        first = next(iter(store.latest().segments))
        shutil.copyfile(store.segment_path(first), sentinel / "x.seg")
        (sentinel / "x").write_text("sentinel\n")
        (sentinel / "x.idx").write_text("sentinel\n")
        return root

    def _give_new_identity(self) -> None:
        """A project of its own (for a lease service and an agent that remember projects by id):
        the template's id replaced, in the same number of characters, wherever it is written."""
        meta = self.project_dir / ".dbguard"
        old = json.loads((meta / "project.json").read_text())["id"]
        new = str(uuid.uuid4())
        for path in (meta / "project.json", meta / "writer.json"):
            path.write_text(path.read_text().replace(old, new))
        for path in (meta / "store" / "manifests").glob("*.json"):
            resign(path, json.loads(path.read_text().replace(old, new)))

    @staticmethod
    def stamp(root: Path) -> dict[str, tuple[int, bytes]]:
        return {
            str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))
        } | {str(root): (root.stat().st_mtime_ns, b"")}

    def escape(self, name: str) -> str:
        return name.replace("{root}", str(self.root))

    def allowed(self) -> list[Path]:
        return [self.project_dir, self.cache, self.state]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Example.make_template(tmp_path_factory.mktemp("template") / "example")


# Damage is drawn whole before any of it is done: what the draws are must never depend on what
# the files hold when it is done (an earlier damage may have cut a manifest short, or deleted a
# segment), or hypothesis cannot replay an example ("Inconsistent data generation").
Damage = Callable[[Example], None]

# Which one of a list whose length the draws cannot know (files, entries, byte positions).
WHICH = st.integers(0, 1 << 16)


def nth(items: list[Any], which: int) -> Any:
    return items[which % len(items)]


def newest_manifest(store: ProjectStore) -> tuple[Path, dict[str, Any]]:
    path = store.manifest_path(store.generations()[-1])
    return path, json.loads(path.read_text())


def damage_manifest(data: st.DataObject) -> Damage:
    """A manifest rewritten with a hostile field and a checksum that matches, in place or as a
    new generation."""
    kind = data.draw(
        st.sampled_from(["field", "drop", "segment-name", "segment-info", "database", "retired"])
    )
    field, which, escape, as_count = "", 0, "", False
    value: Any = None
    if kind in ("field", "drop"):
        field = data.draw(st.sampled_from(MANIFEST_FIELDS))
        value = data.draw(JSON_VALUE) if kind == "field" else None
    elif kind == "segment-name":
        which, escape = data.draw(WHICH), data.draw(st.sampled_from(ESCAPES))
    elif kind == "segment-info":
        which, field = data.draw(WHICH), data.draw(st.sampled_from(["size", "index_crc", "records", "added"]))
        value = data.draw(JSON_VALUE)
    elif kind == "database":
        as_count = data.draw(st.booleans())
        if as_count:
            value = data.draw(JSON_VALUE)  # as the count of images
        else:
            escape = data.draw(st.sampled_from(ESCAPES))
    else:
        escape = data.draw(st.sampled_from(ESCAPES))
    as_next = data.draw(st.booleans())  # as the next generation, which readers would take first

    def done(example: Example) -> None:
        path, body = newest_manifest(example.store)
        if kind == "field":
            body[field] = value
        elif kind == "drop":
            body.pop(field, None)
        elif kind == "segment-name":
            name = nth(sorted(body["segments"]), which)
            body["segments"][example.escape(escape)] = body["segments"].pop(name)
        elif kind == "segment-info":
            body["segments"][nth(sorted(body["segments"]), which)][field] = value
        elif kind == "database" and as_count:
            body["databases"]["images"]["count"] = value
        elif kind == "database":
            body["databases"][example.escape(escape)] = {"count": 2}
        else:
            body["retired"] = {example.escape(escape): 0.0}
        if as_next:
            last = example.store.generations()[-1]
            path = example.store.manifest_path(last + 1)
            if body.get("generation") == last:
                body["generation"] = last + 1
        resign(path, body)

    return done


def damage_index(data: st.DataObject) -> Damage:
    """A segment's index rewritten with hostile entries, its trailer and the manifest's record
    of it made to match: everything checks out but the entries themselves."""
    segment_which, entry_which, other_which = data.draw(WHICH), data.draw(WHICH), 0
    kind = data.draw(st.sampled_from(["field", "near", "swap", "drop", "whole", "dtype", "forged"]))
    field: Any = None
    value: Any = None
    if kind == "field":
        field, value = data.draw(st.sampled_from(ENTRY_FIELDS)), data.draw(JSON_VALUE)
    elif kind == "near":  # plausible values: inside the file, an index of another record
        field, value = data.draw(st.sampled_from(["off", "len", "i", "crc"])), data.draw(WHICH)
    elif kind == "swap":  # where another record lies, with this one's checksum
        other_which = data.draw(WHICH)
    elif kind == "drop":
        field = data.draw(st.sampled_from(ENTRY_FIELDS))
    elif kind == "dtype":
        value = data.draw(st.sampled_from(HOSTILE_DTYPES))
    elif kind == "forged":  # as one who computes checksums would write it: every check passes
        value, field = data.draw(st.sampled_from(HOSTILE_DTYPES)), data.draw(FORGED_SHAPE)
    else:
        value = data.draw(JSON_VALUE)  # as the whole index

    def change(example: Example, entries: Any, segment: bytes) -> Any:
        entry = nth(entries, entry_which)
        if kind == "field":
            entry[field] = value
        elif kind == "near":
            entry[field] = value % (len(segment) + 65)
        elif kind == "swap":
            other = nth(entries, other_which)
            entry["off"], other["off"] = other["off"], entry["off"]
        elif kind == "drop":
            del entry[field]
        elif kind == "dtype":
            entry["dtype"] = value
        elif kind == "forged":
            forge(example, entry, segment, value, field)
        else:
            return value
        return entries

    return lambda example: rewrite_index(example, segment_which, functools.partial(change, example))


def rewrite_index(example: Example, which: int, change: Callable[[Any, bytes], Any]) -> None:
    """The index of a segment of the newest generation made ``change(entries, segment bytes)``,
    with a trailer and a manifest (re-signed) that match it."""
    path, body = newest_manifest(example.store)
    name = nth(sorted(body["segments"]), which)
    segment = example.store.segment_path(name)
    raw = segment.read_bytes()
    _, _, offset, length, _ = TRAILER.unpack(raw[-TRAILER.size :])
    index = json.dumps(change(json.loads(raw[offset : offset + length]), raw)).encode()
    crc = crc32(index)
    segment.write_bytes(raw[:offset] + index + TRAILER.pack(b"DBGSEG01", 1, offset, len(index), crc))
    body["segments"][name].update(size=segment.stat().st_size, index_crc=crc)
    resign(path, body)


def forge(example: Example, entry: dict[str, Any], segment: bytes, dtype: str, shape: list[int]) -> None:
    """``entry`` made to name ``dtype`` and ``shape`` as one who computes checksums would: its
    length what they take, its checksum that of the bytes there."""
    with contextlib.suppress(TypeError, ValueError, SyntaxError):  # not a dtype: the length kept
        entry["len"] = np.dtype(dtype).itemsize * math.prod(shape)
    payload = segment[entry["off"] : entry["off"] + entry["len"]]
    entry.update(dtype=dtype, shape=shape, crc=record_crc(payload, entry["attrs"]))
    # A checksum proves a record whole, not who wrote it: this one a reader may be given.
    example.originals.add(entry["crc"])


def damage_bytes(data: st.DataObject) -> Damage:
    """Bytes flipped, cut off or replaced in a manifest or a segment, or the file deleted or made
    a directory: no checksum matches any more."""
    which, position = data.draw(WHICH), data.draw(WHICH)
    kind = data.draw(st.sampled_from(["flip", "cut", "garbage", "delete", "directory"]))
    garbage = data.draw(st.binary(max_size=64)) if kind == "garbage" else b""

    def done(example: Example) -> None:
        files = sorted(example.store.manifests_dir.glob("*.json")) + sorted(
            example.store.segments_dir.glob("*.seg")
        )
        target = nth(files, which)
        if kind in ("flip", "cut"):
            raw = target.read_bytes()
            at = position % len(raw)
            if kind == "flip":
                target.write_bytes(raw[:at] + bytes([raw[at] ^ 0x5A]) + raw[at + 1 :])
            else:
                target.write_bytes(raw[:at])
        elif kind == "garbage":
            target.write_bytes(garbage)
        else:
            target.unlink()
            if kind == "directory":
                target.mkdir()

    return done


def damage_writer_record(data: st.DataObject) -> Damage:
    kind = data.draw(st.sampled_from(["json", "field", "bytes", "directory"]))
    field: Any = None
    value: Any = None
    if kind == "json":
        value = data.draw(JSON_VALUE)
    elif kind == "field":
        field = data.draw(st.sampled_from(["writer", "last_token", "project"]))
        value = data.draw(st.one_of(JSON_VALUE, st.just(2**63 - 1), st.just(2**80)))
    elif kind == "bytes":
        value = data.draw(st.binary(max_size=64))

    def done(example: Example) -> None:
        path = example.project.meta_dir / "writer.json"
        if kind == "json":
            path.write_text(json.dumps(value))
        elif kind == "field":
            record = json.loads(path.read_text())
            record[field] = value
            path.write_text(json.dumps(record))
        elif kind == "bytes":
            path.write_bytes(value)
        else:
            path.unlink()
            path.mkdir()

    return done


def damage_identity(data: st.DataObject) -> Damage:
    def done(example: Example) -> None:
        (example.project.meta_dir / "project.json").unlink()

    return done


DAMAGE: dict[str, Callable[[st.DataObject], Damage]] = {
    "manifest": damage_manifest,
    "index": damage_index,
    "bytes": damage_bytes,
    "writer-record": damage_writer_record,
    "identity": damage_identity,
}


def damage(example: Example, data: st.DataObject) -> list[str]:
    """One to three kinds of damage, drawn, then done; returns their names (for the failure
    report)."""
    kinds = data.draw(st.lists(st.sampled_from(sorted(DAMAGE)), min_size=1, max_size=3))
    for done in [DAMAGE[kind](data) for kind in kinds]:
        # An earlier damage may have removed what this one would damage: damaged enough.
        with contextlib.suppress(
            OSError,
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            AttributeError,
            ZeroDivisionError,
            GuardError,
            struct.error,
        ):
            done(example)
    return kinds


# The hook sees every file operation of this process; while `_touched` is a list, those whose
# path lies under `_watched` are recorded there.
_touched: list[tuple[str, str]] | None = None
_watched = ""
_EVENTS = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "os.mkdir",
        "os.rename",
        "os.remove",
        "os.rmdir",
        "os.link",
        "os.symlink",
        "os.truncate",
        "os.chmod",
        "shutil.copyfile",
        "shutil.rmtree",
    }
)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _touched is None or event not in _EVENTS:
        return
    for path in args[:2]:
        if isinstance(path, (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(path))
            if real == _watched or real.startswith(_watched + os.sep):
                _touched.append((event, real))


_hooked = False


@contextlib.contextmanager
def watching(root: Path) -> Iterator[list[tuple[str, str]]]:
    """Record the file operations of this process under ``root`` (audit hooks cannot be removed:
    one is added once, and records only inside this block)."""
    global _touched, _watched, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _touched, _watched = [], os.path.realpath(root)
    try:
        yield _touched
    finally:
        _touched = None


def attempt(call: Callable[[], Any]) -> Any:
    """What ``call`` returns, or the GuardError it raises, which must carry a documented exit code
    other than "unexpected": damage is an integrity error (or a refusal), never a crash."""
    try:
        return call()
    except GuardError as exc:
        assert exc.exit_code != ExitCode.UNEXPECTED, f"{type(exc).__name__}: {exc}"
        return exc


def read_everything(example: Example, config: Settings, names: list[str]) -> tuple[int, int]:
    """Read every record of every database (at most 20 each) through `dbguard.open`; each one
    served must match its checksum and be one that was written. Returns (served, refused)."""
    served = refused = 0
    for name in names:
        db = attempt(functools.partial(dbguard.open, example.project_dir, name, "r", settings=config))
        if isinstance(db, GuardError):
            refused += 1
            continue
        with db:
            for position in range(min(len(db), 20)):
                try:
                    array = attempt(functools.partial(db.__getitem__, position))
                except IndexError:
                    continue  # a hole: an index never written
                if isinstance(array, GuardError):
                    refused += 1
                    continue
                entry = db._view.entry(name, position)
                assert entry is not None
                crc = record_crc(np.ascontiguousarray(array).tobytes(), entry.attrs)
                assert crc == entry.crc, f"record {position} of {name!r} fails its checksum"
                assert crc in example.originals, f"record {position} of {name!r} was never written"
                served += 1
    return served, refused


@pytest.fixture(scope="module")
def quiet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker for `status` and `browse` to ask; every example's project is new to it."""
    process = BrokerProcess(tmp_path_factory.mktemp("broker") / "state", ttl=TTL, lock_delay=0.5)
    process.start()
    yield process
    process.stop()


@settings(
    max_examples=int(os.environ.get("DBGUARD_DAMAGE_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), warm=st.booleans())
def test_damaged_store_files_never_crash_escape_or_serve_a_bad_record(
    tmp_path: Path, quiet_broker: BrokerProcess, template: Path, data: st.DataObject, warm: bool
) -> None:
    example = Example(tmp_path / "example", template)
    config = Settings(
        broker=quiet_broker.address, cache=example.cache, state=example.state, request_timeout=2.0
    )
    if warm:  # this host read it before: local copies of segments and indexes are in the cache
        assert read_everything(example, config, ["images"]) == (5, 0)
    kinds = damage(example, data)
    try:
        with watching(example.root) as touched:
            browsed = attempt(lambda: api.browse(example.project_dir, settings=config))
            listed = attempt(lambda: api.ls(example.project_dir, settings=config))
            verified = attempt(lambda: api.verify(example.project_dir))
            found = attempt(lambda: api.status(example.project_dir, settings=config))
            names = ["images"]
            if isinstance(browsed, dict):
                names = sorted({"images", *(db["name"] for db in browsed["databases"][:3])})
                for name in names[:3]:
                    attempt(functools.partial(api.ls, example.project_dir, name, settings=config))
            served, refused = read_everything(example, config, names)
        allowed = [Path(os.path.realpath(root)) for root in example.allowed()]
        outside = [
            (event, path)
            for event, path in touched
            if not any(Path(path).is_relative_to(root) for root in allowed)
            # making the cache directory tries each directory on the way (they exist: EEXIST)
            and not (event == "os.mkdir" and any(root.is_relative_to(path) for root in allowed))
        ]
        assert outside == [], f"{kinds}: touched outside the project, cache and state: {outside}"
        assert Example.stamp(example.root / "sentinel") == example.sentinel, kinds
        if isinstance(found, Status):
            assert found.projects[0].state == "free"
        if isinstance(verified, dict) and not verified["problems"]:
            # `verify` said ok: then every record a reader is shown can be read.
            assert refused == 0, f"{kinds}: verify said ok, yet {refused} reads were refused"
        del listed, served
    finally:
        shutil.rmtree(example.root, ignore_errors=True)


def test_a_forged_index_entry_is_served_whole_or_refused_whatever_dtype_and_shape_it_names(
    tmp_path: Path, quiet_broker: BrokerProcess, template: Path
) -> None:
    """Every dtype and shape a forger may name, its length and checksum made to match (the
    property test draws these among much else). Before: `verify` set aside memory for a length
    far past the end of the file (MemoryError), and where it said ok, items of no size crashed
    a reader (ValueError from numpy), as did more items than numpy can count (OverflowError)."""
    shapes = [[], [3], [0, 384], [384, 4], [3, 2**62], [2**62, 2**62]]
    for dtype, shape in itertools.product(HOSTILE_DTYPES, shapes):
        example = Example(tmp_path / "example", template)
        config = Settings(broker=quiet_broker.address, cache=example.cache, state=example.state)

        def forged(entries: Any, segment: bytes) -> Any:
            forge(example, entries[0], segment, dtype, shape)  # noqa: B023 (called at once)
            return entries

        rewrite_index(example, 0, forged)
        verified = attempt(lambda: api.verify(example.project_dir))  # noqa: B023 (called at once)
        served, refused = read_everything(example, config, ["images"])
        if isinstance(verified, dict) and not verified["problems"]:
            assert (served, refused) == (5, 0), f"{dtype} {shape}: verify said ok, yet {refused} refused"
    shutil.rmtree(tmp_path / "example")


@pytest.fixture
def other_lease(hosts: dict[str, Host], tmp_path: Path) -> Iterator[tuple[Host, Path]]:
    """Host a holding the lease of another project all along."""
    a = hosts["a"]
    (other,) = shared(tmp_path, "held-all-along")
    assert a.run("acquire", str(other)).returncode == 0
    yield a, other
    held_by(a, other, "host-a")


@settings(
    max_examples=int(os.environ.get("DBGUARD_DAMAGE_PROCESS_EXAMPLES", "8")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_damaged_project_files_never_crash_acquire_status_or_the_agent(
    other_lease: tuple[Host, Path], tmp_path: Path, template: Path, data: st.DataObject
) -> None:
    a, other = other_lease
    agent = a.agent_pid()
    example = Example(tmp_path / "example", template, fresh_id=True)
    kinds = damage(example, data)
    try:
        acquired = a.run("acquire", str(example.project_dir))
        said = acquired.stdout + acquired.stderr
        assert acquired.returncode in (0, INTEGRITY, 7) and "Traceback" not in said, f"{kinds}: {said}"
        status = a.run("status", str(example.project_dir), "--json")
        # Where the project's identity cannot be read (project.json damaged, and the manifest that
        # would say it unreadable), `status` cannot ask about it: exit 6 naming the file is an answer.
        assert status.returncode in (0, INTEGRITY) and "Traceback" not in status.stderr, (
            f"{kinds}: {status.stderr}"
        )
        if status.returncode != 0:
            assert str(example.project_dir) in status.stderr, f"{kinds}: {status.stderr}"
        if acquired.returncode == 0:
            assert status.returncode == 0, f"{kinds}: acquired, then not known: {status.stderr}"
            assert json.loads(status.stdout)["projects"][0]["state"] == "held", kinds
            released = a.run("release", str(example.project_dir))
            assert released.returncode == 0, f"{kinds}: {released.stderr}"
        elif status.returncode == 0:
            state = json.loads(status.stdout)["projects"][0]
            assert state["state"] == "free", f"{kinds}: a refused acquire must give the grant back"
        # Whatever `status` could say of this project: nothing is left held but the other
        # project's lease, still this host's (asked outside any project: the whole table).
        everything = a.run("status", "--json", cwd=tmp_path)
        assert everything.returncode == 0, f"{kinds}: {everything.stderr}"
        table = json.loads(everything.stdout)
        held = [
            (p["project"], p["state"], (p["writer"] or {}).get("host"))
            for p in table["projects"]
            if p["state"] != "free"
        ]
        assert held == [(identity(other), "held", "host-a")], f"{kinds}: {table['projects']}"
        assert [lease["project"] for lease in table["agent"]["leases"]] == [identity(other)], kinds
        assert a.agent_pid() == agent, f"{kinds}: the agent died:\n{a.agent_log()[-3000:]}"
        assert Example.stamp(example.root / "sentinel") == example.sentinel, kinds
    finally:
        shutil.rmtree(example.root, ignore_errors=True)


# ------------------------------------------------------------------ what the audit found


def test_a_damaged_lease_table_neither_stops_the_agent_nor_any_command(
    hosts: dict[str, Host], tmp_path: Path
) -> None:
    """The agent's leases.json is its own file, but a full disk, a crash or a hand may leave
    anything there: entries not of the form the agent writes are left out, wherever it is read."""
    a = hosts["a"]
    (project,) = shared(tmp_path, "project")
    assert a.run("acquire", str(project)).returncode == 0
    write_numbered_images(a, project, range(2))
    a.kill_agent()
    table = a.cache / "leases.json"
    saved = json.loads(table.read_text())
    junk: list[Any] = [
        5,
        "x",
        None,
        {"project": "../../../outside", "path": "/", "token": 1, "ttl": 1, "since": 0},
        {**saved[0], "token": "1"},
        {**saved[0], "project": "a/b"},
        {**saved[0], "state": "whatever"},
        {**saved[0], "extra": 1},
    ]
    table.write_text(json.dumps(junk + saved))
    assert a.run("status", str(project)).returncode == 0  # starts the agent: it reclaims
    assert wait_for(lambda: a.agent_pid() is not None, 10)
    agent = a.agent_pid()
    write_numbered_images(a, project, range(2, 4))  # the writer's check reads the table too
    flushed = a.run("flush", str(project), "--json")
    assert flushed.returncode == 0, flushed.stderr
    cleared = a.run("clear", "--all")
    assert cleared.returncode == 0, cleared.stderr
    assert a.agent_pid() == agent
    assert not (tmp_path / "outside").exists()
    for text in ("[", "{}", '"leases"', "[1, 2]"):  # not even a list of objects
        table.write_text(text)
        assert a.run("status", str(project)).returncode == 0


def test_damaged_local_copies_and_indexes_in_the_cache_are_made_again_from_the_share(
    tmp_path: Path, quiet_broker: BrokerProcess, template: Path
) -> None:
    example = Example(tmp_path / "example", template)
    config = Settings(broker=quiet_broker.address, cache=example.cache, state=example.state)
    assert read_everything(example, config, ["images"]) == (5, 0)
    local = example.cache / "segments" / example.project.id
    copies, indexes = sorted(local.glob("*.seg")), sorted(local.glob("*.idx"))
    assert len(copies) == 2 and len(indexes) == 2
    for path in copies + indexes:  # a damaged disk, or a stray edit: the middle byte flipped
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    with dbguard.open(example.project_dir, "images", "r", settings=config) as db:
        assert [db[n].tolist() for n in range(5)] == [image(n).tolist() for n in range(5)]
    store = ProjectStore(example.project_dir, example.project.id)
    for path in copies:  # every record read was fetched again into the (sparse) local copy
        kept, share = path.read_bytes(), store.segment_path(path.stem).read_bytes()
        for entry in store.read_index(path.stem):
            assert (
                kept[entry.offset : entry.offset + entry.length]
                == share[entry.offset : entry.offset + entry.length]
            )
    cut = copies[0]
    cut.write_bytes(b"")
    with dbguard.open(example.project_dir, "images", "r", settings=config) as db:
        assert [db[n].tolist() for n in range(5)] == [image(n).tolist() for n in range(5)]


def test_a_damaged_note_does_not_hide_data_kept_aside_and_export_stays_in_its_folder(tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    project_id = str(uuid.uuid4())
    with CacheStore(cache_root, project_id) as cache:
        for name in ("images", "..", "../../escaped", "a/b"):
            cache.put(name, 0, np.arange(4, dtype=np.float32))
    where = flushing_module.set_aside(cache_root, project_id, 7, "lost")
    assert where is not None
    (where / "aside.json").write_text('{"project": "../../x", "dirty_bytes": "many"}')
    (cache_root / "aside" / "stray-file").write_text("not an aside directory\n")
    (found,) = flushing_module.list_aside(cache_root)
    assert found.project == project_id and found.token == 7 and found.dirty_bytes > 0
    assert "cannot be read" in found.reason
    target = tmp_path / "export" / "here"
    assert flushing_module.export_aside(found, target) == 4
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "export" / "0.npy").exists()
    folders = sorted(p.name for p in target.iterdir())
    assert "images" in folders and len(folders) == 4
    assert all(p.parent == target for p in target.iterdir())
