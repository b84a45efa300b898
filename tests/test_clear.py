"""`clear` drops a host's cache only once the share holds every record in it, as read back past
the client cache, and reports success only once the lease service no longer names the host.

Real broker, agents, LMDB and simulated hosts (tests/conftest.py), as in test_data_e2e.py; the
reader of bytes past the page cache and the read-back check are also tested on their own.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dbguard.cache import CacheStore
from dbguard.data import flushing, uncached
from dbguard.data.project import Project
from dbguard.data.project import init as init_project
from dbguard.data.store import ProjectStore
from tests.support import INTEGRITY, dbguard_json, identity, read_all, script, write_images
from tools.sshfs import SshServer, sshfs_unavailable
from tools.testbed import BrokerProcess, Host, SimHost, namespaces_unavailable, wait_for

HELD = 3


def flip_payload_byte(project: Path, db: str, index: int) -> Path:
    """Flip one byte in the middle of record ``index``'s payload in the newest generation, on the
    share; returns the segment."""
    store = ProjectStore(project, identity(project))
    entry = store.live_entries(store.latest())[(db, index)]
    path = store.segment_path(entry.segment)
    with open(path, "r+b") as handle:
        handle.seek(entry.offset + entry.length // 2)
        byte = handle.read(1)
        handle.seek(entry.offset + entry.length // 2)
        handle.write(bytes([byte[0] ^ 0x5A]))
    return path


def lease_of(host: Host, project: Path) -> dict[str, Any]:
    state: dict[str, Any] = dbguard_json(host, "status", str(project))["projects"][0]
    return state


# ------------------------------------------------------- reading past the page cache


@pytest.mark.parametrize("method", [uncached.DIRECT, uncached.DROPPED])
def test_uncached_pieces_are_the_file_bytes_of_every_range(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3_000_000)
    path = tmp_path / "file"
    path.write_bytes(data)
    # Small chunks and gaps, so that ranges span chunks, share them and get read through.
    monkeypatch.setattr(uncached, "CHUNK", 5 * uncached.ALIGN)
    monkeypatch.setattr(uncached, "GAP", 3000)
    rng = random.Random(11)
    for _ in range(40):
        points = sorted(rng.sample(range(len(data) + 9000), 2 * rng.randint(1, 30)))
        ranges = [(points[i], points[i + 1] - points[i]) for i in range(0, len(points), 2)]
        with uncached.UncachedFile(path) as reader:
            if method == uncached.DROPPED:  # as where the filesystem refuses O_DIRECT
                os.close(reader._fd)
                reader._fd = reader._open_dropped()
            got = [bytearray() for _ in ranges]
            for k, piece in reader.pieces(ranges):
                got[k] += piece
            assert reader.method == method
        for (offset, length), have in zip(ranges, got, strict=True):
            assert bytes(have) == data[offset : offset + length]


# ------------------------------------------------------------ the read-back check


def _cached_project(root: Path, count: int) -> tuple[Project, Path]:
    """A project whose cache holds ``count`` records, flushed under token 1."""
    (root / "project").mkdir()
    project = init_project(root / "project")
    cache_root = root / "cache"
    with CacheStore(cache_root, project.id) as cache:
        for n in range(count):
            cache.put("images", n, np.full((40, 30), n, np.float32), json.dumps({"n": n}).encode())
    flushing.flush_project(cache_root, project, 1)
    return project, cache_root


def test_read_back_names_a_record_damaged_on_the_share_that_the_index_still_vouches_for(
    tmp_path: Path,
) -> None:
    project, cache_root = _cached_project(tmp_path, 12)
    whole = flushing.verify_cache_in_store(cache_root, project)
    assert (whole.checked, whole.segments, whole.damaged, whole.unmendable) == (12, 1, {}, [])
    assert whole.method in (uncached.DIRECT, uncached.DROPPED) and whole.bytes > 12 * 40 * 30 * 4

    segment = flip_payload_byte(project.path, "images", 5)
    store = ProjectStore(project.path, project.id)
    assert store.live_entries(store.latest())[("images", 5)].crc  # the index is unchanged
    found = flushing.verify_cache_in_store(cache_root, project)
    assert found.checked == 11 and list(found.damaged) == [("images", 5)]
    assert str(segment) in found.damaged[("images", 5)] and found.unmendable == []
    only = flushing.verify_cache_in_store(cache_root, project, only={("images", 5), ("images", 6)})
    assert only.checked == 1 and list(only.damaged) == [("images", 5)]


def test_read_back_calls_a_damaged_index_unmendable(tmp_path: Path) -> None:
    project, cache_root = _cached_project(tmp_path, 4)
    store = ProjectStore(project.path, project.id)
    (name,) = store.latest().segments
    path = store.segment_path(name)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # inside the index, before the trailer
    path.write_bytes(bytes(data))
    found = flushing.verify_cache_in_store(cache_root, project)
    assert found.checked == 0 and any(str(path) in text for text in found.unmendable)


# ------------------------------------------------------------ clear, end to end


def test_clear_reflushes_a_record_damaged_on_the_share_and_another_host_reads_it_whole(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 20)
    assert dbguard_json(a, "flush", str(project))["records"] == 20
    segment = flip_payload_byte(project, "images", 7)
    assert b.run("verify", str(project)).returncode == INTEGRITY

    cleared = a.run("clear", str(project))
    assert cleared.returncode == 0, cleared.stderr
    said = cleared.stdout
    assert "verified 20 against the share" in said, said
    assert "re-flushed 1 damaged record" in said and "record 7 of 'images'" in said, said
    assert str(segment) in said and "released token" in said, said
    assert not (a.cache / "projects" / identity(project)).exists()

    assert [value for value, _ in read_all(b, project)] == [float(n) for n in range(20)]
    verified = b.run("verify", str(project))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "1 damaged copies" in verified.stdout  # the replaced copy is reported, not a problem
    assert b.run("acquire", str(project)).returncode == 0


def test_clear_reports_the_reflush_and_the_read_back_in_json(hosts: dict[str, Host], project: Path) -> None:
    a = hosts["a"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 6)
    write_images(a, project, 3, db="masks")
    assert a.run("flush", str(project)).returncode == 0
    flip_payload_byte(project, "masks", 1)
    flip_payload_byte(project, "images", 4)
    cleared = dbguard_json(a, "clear", str(project))
    assert cleared["verified"] == 9 and cleared["read_back"]["records"] == 9
    assert cleared["read_back"]["bytes"] > 0 and cleared["read_back"]["method"] in (
        "O_DIRECT",
        "POSIX_FADV_DONTNEED",
    )
    assert cleared["reflushed"]["records"] == 2
    assert cleared["reflushed"]["generation"] > cleared["flushed"]["generation"]
    assert cleared["released"]["released"] is True and cleared["lease"]["state"] == "free"


@pytest.fixture
def sshfs_hosts(tmp_path: Path, broker: BrokerProcess) -> Iterator[tuple[SimHost, SimHost, Path]]:
    """Two whole simulated hosts, each with its own sshfs mount (its own client cache) of one
    exported directory, which is returned too: damage done there is done on the server."""
    why = namespaces_unavailable() or sshfs_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(f"simulated hosts need namespaces and sshfs (run as root): {why}")
    export = tmp_path / "export" / "proj"
    export.mkdir(parents=True)
    made: list[SimHost] = []
    with SshServer(tmp_path / "sshd") as server:
        for name, mount in (("a", "/mnt/home/lab/proj"), ("b", "/mnt/net/lab/proj")):
            made.append(SimHost(f"ws-{name}", tmp_path / "hosts", broker, server, export, mount).start())
        try:
            yield made[0], made[1], export
        finally:
            for host in made:
                host.stop()


def test_clear_over_sshfs_finds_damage_done_on_the_server_and_reflushes(
    sshfs_hosts: tuple[SimHost, SimHost, Path],
) -> None:
    a, b, export = sshfs_hosts
    assert a.run("acquire").returncode == 0, a.agent_log()
    script(
        a,  # type: ignore[arg-type]  # any host with python(); SimHost runs in its project
        f"""
        import numpy as np, dbguard
        with dbguard.open({str(a.project)!r}, "images", "a") as db:
            for i in range(12):
                db.append(np.full((64, 64), i, np.float32))
        dbguard.flush({str(a.project)!r})
        """,
    )
    # The server's disk goes bad under ws-a's client cache, which wrote (and still holds) the pages.
    flip_payload_byte(export, "images", 9)
    cleared = a.run("clear")
    assert cleared.returncode == 0, cleared.stderr
    assert "re-flushed 1 damaged record" in cleared.stdout and "record 9 of 'images'" in cleared.stdout
    assert "past the client cache" in cleared.stdout
    out = script(
        b,  # type: ignore[arg-type]
        f"""
        import json, dbguard
        with dbguard.open({str(b.project)!r}, "images", "r") as db:
            print(json.dumps([float(db[i][0, 0]) for i in range(len(db))]))
        """,
    )
    assert json.loads(out) == [float(n) for n in range(12)]
    verified = b.run("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_clear_keeps_the_cache_and_the_lease_when_the_share_damages_the_reflush_too(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 10)
    assert a.run("flush", str(project)).returncode == 0
    # A share that damages record 3 whatever is written: every read-back finds it damaged.
    out = script(
        a,
        f"""
        import json, dbguard
        from dbguard.data import flushing
        from dbguard.data.store import ProjectStore
        real = flushing.verify_cache_in_store

        def on_a_bad_share(cache_root, project, only=None):
            store = ProjectStore(project.path, project.id)
            entry = store.live_entries(store.latest())[("images", 3)]
            with open(store.segment_path(entry.segment), "r+b") as handle:
                handle.seek(entry.offset)
                first = handle.read(1)
                handle.seek(entry.offset)
                handle.write(bytes([first[0] ^ 0xFF]))
            return real(cache_root, project, only)

        flushing.verify_cache_in_store = on_a_bad_share
        try:
            dbguard.clear({str(project)!r})
            print(json.dumps(None))
        except dbguard.IntegrityError as exc:
            print(json.dumps({{"message": str(exc), "code": int(exc.exit_code)}}))
        """,
    )
    refused = json.loads(out)
    assert refused is not None, "clear must not succeed while the share damages the record"
    assert refused["code"] == INTEGRITY
    assert (
        "record 3 of 'images'" in refused["message"] and "flushed again as generation" in refused["message"]
    )
    assert "The cache was kept" in refused["message"]
    # Nothing dropped, the record unflushed again, the lease still this host's.
    assert CacheStore.dirty_bytes_of(a.cache, identity(project)) > 0
    state = lease_of(b, project)
    assert state["state"] == "held" and state["writer"]["host"] == "host-a"
    assert b.run("acquire", str(project)).returncode == HELD

    # The share behaves again: the next clear writes record 3 once more and finishes.
    cleared = a.run("clear", str(project))
    assert cleared.returncode == 0, cleared.stderr
    assert [value for value, _ in read_all(b, project)] == [float(n) for n in range(10)]
    assert b.run("verify", str(project)).returncode == 0


def test_clear_refuses_to_drop_when_a_segment_index_is_damaged_on_the_share(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 5)
    assert a.run("flush", str(project)).returncode == 0
    store = ProjectStore(project, identity(project))
    (name,) = store.latest().segments
    path = store.segment_path(name)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01
    path.write_bytes(bytes(data))
    refused = a.run("clear", str(project))
    assert refused.returncode == INTEGRITY, refused.stderr
    assert str(path) in refused.stderr and "cache was kept" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (a.cache / "projects" / identity(project) / "data.mdb").is_file()
    assert lease_of(b, project)["writer"]["host"] == "host-a"


def test_clear_without_the_lease_keeps_damaged_records_unflushed_and_says_what_to_do(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 5)
    assert a.run("release", str(project)).returncode == 0  # flushed; the cache stays warm
    flip_payload_byte(project, "images", 2)
    refused = a.run("clear", str(project))
    assert refused.returncode == INTEGRITY, refused.stderr
    assert "record 2 of 'images'" in refused.stderr
    assert f"dbguard acquire {project}" in refused.stderr and "marked unflushed" in refused.stderr
    assert CacheStore.dirty_bytes_of(a.cache, identity(project)) > 0
    # The advice works: acquire, clear; the record is whole for everyone.
    assert a.run("acquire", str(project)).returncode == 0
    cleared = a.run("clear", str(project))
    assert cleared.returncode == 0, cleared.stderr
    assert [value for value, _ in read_all(b, project)] == [float(n) for n in range(5)]
    assert b.run("verify", str(project)).returncode == 0


# ------------------------------------------------------------- a dead agent


def test_clear_after_the_agent_was_killed_with_dirty_data_restarts_it_flushes_and_releases(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 10)
    a.kill_agent()  # SIGKILL: the lease stays held at the lease service, the records unflushed
    assert lease_of(b, project)["writer"]["host"] == "host-a"

    cleared = a.run("clear", str(project))
    assert cleared.returncode == 0, cleared.stderr
    assert "restarted this host's agent" in cleared.stdout and "flushed 10 records" in cleared.stdout
    assert "released token" in cleared.stdout
    assert lease_of(b, project)["state"] == "free"
    assert b.run("acquire", str(project)).returncode == 0
    assert [value for value, _ in read_all(b, project)] == [float(n) for n in range(10)]


def test_clear_whose_agent_is_killed_mid_way_releases_the_lease_or_says_what_is_left(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    script(
        a,
        f"""
        import numpy as np, dbguard
        with dbguard.open({str(project)!r}, "images", "a") as db:
            for i in range(384):  # 96 MiB: the flush takes a while
                db.append(np.full((256, 256), i, np.float32))
        """,
    )
    segments = project / ".dbguard" / "store" / "segments"
    before = set(segments.glob("*.seg")) if segments.exists() else set()
    clear = a.popen("clear", str(project))
    try:
        # The flush has begun once its segment appears; stop clear there, kill its agent, go on.
        assert wait_for(lambda: set(segments.glob("*.seg")) - before or clear.poll() is not None, 60, 0.002)
        os.kill(clear.pid, signal.SIGSTOP)
        assert clear.poll() is None, "clear finished before its agent could be killed"
        killed = a.agent_pid()
        a.kill_agent()
        os.kill(clear.pid, signal.SIGCONT)
        stdout, stderr = clear.communicate(timeout=120)
    finally:
        if clear.poll() is None:
            os.kill(clear.pid, signal.SIGCONT)
            clear.kill()
            clear.wait()
    assert killed is not None and a.agent_pid() != killed
    if clear.returncode == 0:
        assert "released token" in stdout and "restarted this host's agent" in stdout, stdout
        state = lease_of(b, project)
        assert state["state"] == "free", state
        assert b.run("acquire", str(project)).returncode == 0
        assert len(read_all(b, project)) == 384
    else:  # it may fail, but then it says what is left to do, and the host still holds the lease
        assert "Traceback" not in stderr, stderr
        assert any(f"`dbguard {verb}" in stderr for verb in ("release", "clear", "status", "break")), stderr
        assert lease_of(b, project)["writer"]["host"] == "host-a"


def test_clear_resumes_a_lease_its_dead_agent_never_recorded_and_releases_it(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    a.kill_agent()
    (a.cache / "leases.json").write_text("[]")  # as if it died between the grant and saving it
    cleared = a.run("clear", str(project))
    assert cleared.returncode == 0, cleared.stderr
    assert "released token" in cleared.stdout
    assert lease_of(b, project)["state"] == "free"
    assert b.run("acquire", str(project)).returncode == 0


def test_clear_fails_while_the_lease_service_still_names_this_host_through_another_cache(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    other = Host("host-a", tmp_path / "other-cache", a.broker, flush_interval="3600")  # same host and user
    try:
        refused = other.run("clear", str(project))
    finally:
        other.stop()
    assert refused.returncode == HELD, refused.stdout + refused.stderr
    assert "still names" in refused.stderr and "host-a" in refused.stderr
    assert "another cache directory" in refused.stderr and "Traceback" not in refused.stderr
    assert lease_of(b, project)["writer"]["host"] == "host-a"


def test_clear_says_what_is_left_when_the_lease_service_cannot_confirm(
    hosts: dict[str, Host], project: Path, broker: BrokerProcess
) -> None:
    a = hosts["a"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 3)
    assert a.run("release", str(project)).returncode == 0
    broker.kill()
    a.env["DBGUARD_REQUEST_TIMEOUT"] = "0.5"
    refused = a.run("clear", str(project))
    assert refused.returncode == 4, refused.stdout + refused.stderr
    assert "dropped" in refused.stderr and f"dbguard status {project}" in refused.stderr
    assert "Traceback" not in refused.stderr
