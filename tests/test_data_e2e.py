"""The data path end to end: image databases written on one host and read on others, flushes by
the agent, clear, browse, verify and recovery of a lost lease's data. Real broker, agents, LMDB."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from tests.support import TTL, dbguard_json, read_all, script, write_images
from tools.testbed import Host, wait_for


def test_round_trip_of_dtypes_shapes_and_attributes(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    out = script(
        a,
        f"""
        import numpy as np, dbguard, json
        rng = np.random.default_rng(7)
        arrays = [
            rng.integers(0, 255, (256, 256), dtype=np.uint8),
            rng.integers(-500, 500, (7,), dtype=np.int16),
            rng.random((3, 4, 5), dtype=np.float32),
            rng.random((), dtype=np.float64),
            (rng.random((16, 16)) + 1j * rng.random((16, 16))).astype(np.complex64),
            np.arange(12, dtype=">u4").reshape(3, 4),
        ]
        with dbguard.open({str(project)!r}, "stack", "a") as db:
            for n, array in enumerate(arrays):
                db.append(array, attrs={{"n": n, "label": "x" * n, "nested": {{"ok": [1, 2.5]}}}})
            # the writer host sees its own writes at once, before any flush
            mine = all(np.array_equal(db[n], a) and db[n].dtype == a.dtype for n, a in enumerate(arrays))
        dbguard.flush({str(project)!r})
        written = np.array(arrays, dtype=object)
        np.save({str(tmp_path / "written.npy")!r}, written, allow_pickle=True)
        print(json.dumps(mine))
        """,
    )
    assert json.loads(out) is True
    expected = np.load(tmp_path / "written.npy", allow_pickle=True)
    result = b.python(
        textwrap.dedent(
            f"""
            import numpy as np, dbguard
            with dbguard.open({str(project)!r}, "stack", "r") as db:
                np.save({str(tmp_path / "read.npy")!r},
                        np.array([db[i].copy() for i in range(len(db))], dtype=object), allow_pickle=True)
                import json; print(json.dumps([db.attrs(i) for i in range(len(db))]))
            """
        )
    )
    assert result.returncode == 0, result.stderr
    read = np.load(tmp_path / "read.npy", allow_pickle=True)
    attrs = json.loads(result.stdout)
    assert len(read) == len(expected) == 6
    for n, (want, have) in enumerate(zip(expected, read, strict=True)):
        assert have.dtype == want.dtype and have.shape == want.shape and np.array_equal(have, want), n
        assert attrs[n] == {"n": n, "label": "x" * n, "nested": {"ok": [1, 2.5]}}


def test_another_host_sees_exactly_the_flushed_generation(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 10)
    assert read_all(b, project) == []  # nothing flushed yet
    flushed = dbguard_json(a, "flush", str(project))
    assert flushed["records"] == 10
    write_images(a, project, 5, start=10)  # unflushed: invisible elsewhere
    seen = read_all(b, project)
    assert [value for value, _ in seen] == list(range(10))
    assert all(attrs["host"] == "host-a" for _, attrs in seen)
    assert len(read_all(a, project)) == 15  # the writer sees its own writes
    status = dbguard_json(b, "status", str(project))["projects"][0]
    assert wait_for(
        lambda: dbguard_json(b, "status", str(project))["projects"][0]["writer"]["unflushed"] > 0, TTL * 2
    )
    assert status["writer"]["host"] == "host-a"


def test_release_flushes_and_the_next_host_continues_the_database(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 20)
    assert a.run("release", str(project)).returncode == 0  # flushes first
    assert b.run("acquire", str(project)).returncode == 0
    write_images(b, project, 5, start=20)  # appends continue after a's records
    values = [value for value, _ in read_all(b, project)]
    assert values == list(range(25))
    assert b.run("release", str(project)).returncode == 0
    assert [value for value, _ in read_all(a, project)] == list(range(25))


def test_the_agent_flushes_periodically(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    a.env["DBGUARD_FLUSH_INTERVAL"] = "0.5"
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 8)
    assert wait_for(lambda: len(read_all(b, project)) == 8, 15)
    assert wait_for(
        lambda: dbguard_json(b, "status", str(project))["projects"][0]["writer"]["unflushed"] == 0, 10
    )


def test_takeover_flushes_the_holders_data_before_handing_over(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 12)
    taken = b.run("acquire", str(project), "--takeover")
    assert taken.returncode == 0, taken.stderr
    assert [value for value, _ in read_all(b, project)] == list(range(12))
    write_images(b, project, 1, start=12)
    assert [value for value, _ in read_all(b, project)] == list(range(13))


def test_writing_without_the_lease_is_refused_naming_the_writer(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    refused = b.python(
        f"import dbguard, numpy\ntry:\n    dbguard.open({str(project)!r}, 'images', 'a')\n"
        "except dbguard.LeaseHeld as e:\n    print(e)\n"
    )
    assert refused.returncode == 0, refused.stderr
    assert "does not hold the writer lease" in refused.stdout and "host-a" in refused.stdout


def test_lost_lease_data_is_kept_aside_never_flushed_over_the_new_writer(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 4)
    assert wait_for(
        lambda: dbguard_json(b, "status", str(project))["projects"][0]["writer"]["unflushed"] > 0, TTL * 2
    )
    a.signal_agent(signal.SIGSTOP)
    try:
        assert wait_for(
            lambda: dbguard_json(b, "status", str(project))["projects"][0]["state"] == "orphaned", TTL * 3
        )
        assert b.run("break", str(project), "--force").returncode == 0
        assert b.run("acquire", str(project)).returncode == 0
        write_images(b, project, 3, start=100)
        assert dbguard_json(b, "flush", str(project))["records"] == 3
    finally:
        a.signal_agent(signal.SIGCONT)
    recovered: dict[str, Any] = {}

    def kept_aside() -> bool:
        recovered.update(dbguard_json(a, "recover"))
        return bool(recovered["aside"])

    assert wait_for(kept_aside, TTL * 4)
    assert recovered["aside"][0]["dirty_bytes"] > 0
    # b's work is intact: a's unflushed records never reached the store.
    assert [value for value, _ in read_all(b, project)] == [100.0, 101.0, 102.0]
    assert dbguard_json(b, "verify", str(project))["problems"] == []
    exported = dbguard_json(a, "recover", "--export", str(tmp_path / "rescued"))["aside"][0]["exported"]
    assert exported == 4
    files = sorted((tmp_path / "rescued").rglob("*.npy"))
    assert [float(np.load(f)[0, 0]) for f in files] == [0.0, 1.0, 2.0, 3.0]


def test_clear_refuses_while_a_local_writer_is_alive_then_clears(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 6)
    writer = a.popen_python(
        f"import dbguard, time\ndb = dbguard.open({str(project)!r}, 'images', 'a')\n"
        "print('open', flush=True)\ntime.sleep(120)\n"
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        refused = a.run("clear", str(project))
        assert refused.returncode == 2, refused.stderr
        assert f"pid {writer.pid}" in refused.stderr or "python" in refused.stderr
        assert "--force" in refused.stderr
    finally:
        writer.kill()
        writer.wait()
    cleared = dbguard_json(a, "clear", str(project))
    assert cleared["flushed"]["records"] == 6 and cleared["verified"] == 6
    assert cleared["released"]["released"] is True
    assert not (
        a.cache / "projects" / json.loads((project / ".dbguard/project.json").read_text())["id"]
    ).exists()
    again = dbguard_json(a, "clear", str(project))  # safe to run twice
    assert again["flushed"]["records"] == 0 and again["released"] is None
    assert b.run("acquire", str(project)).returncode == 0
    assert len(read_all(b, project)) == 6


def test_browse_ls_and_verify_report_the_store(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    write_images(a, project, 3)
    write_images(a, project, 2, db="masks")
    assert a.run("flush", str(project)).returncode == 0
    info = dbguard_json(b, "browse", str(project))
    assert {d["name"]: d["count"] for d in info["databases"]} == {"images": 3, "masks": 2}
    assert info["databases"][0]["shapes"] == {"32x48": 3}
    assert info["writer"]["host"] == "host-a" and info["last_flush_by"]["host"] == "host-a"
    human = b.run("browse", str(project)).stdout
    assert "images" in human and "host-a" in human
    listing = dbguard_json(b, "ls", str(project), "images")
    assert [r["attrs"]["n"] for r in listing["records"]] == [0, 1, 2]
    assert dbguard_json(b, "verify", str(project))["problems"] == []
    # Flip one bit of one payload: verify names it and exits 6.
    segment = next((project / ".dbguard" / "store" / "segments").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[10] ^= 0x01
    segment.write_bytes(bytes(data))
    damaged = b.run("verify", str(project))
    assert damaged.returncode == 6 and "checksum" in damaged.stdout
    assert segment.read_bytes() == bytes(data)
