"""Real sshfs mounts over loopback: the cache is refused there, the project store works there.

The mounts are made by tools/sshfs.py (a private sshd and one sshfs process per mount, so each
mount has its own client cache, as each NFS client has). Without root, FUSE or the programs
these tests skip and say why; on CI (CI=true) they fail instead, because tools/test installs
the packages and CI runs as root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from dbguard.cache import UnsafeCacheLocation, prepare_cache_dir
from dbguard.data.project import init as init_project
from dbguard.data.store import PendingRecord, ProjectStore, record_crc
from dbguard.errors import ExitCode, GuardError
from tools.sshfs import Mount, SshServer, sshfs_unavailable
from tools.testbed import BrokerProcess

REPO = Path(__file__).resolve().parents[1]
ON_CI = os.environ.get("CI") == "true"


@pytest.fixture
def ssh_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SshServer]:
    why = sshfs_unavailable()
    if why is not None:
        if ON_CI:
            pytest.fail(f"CI must run the sshfs tests, but: {why}")
        pytest.skip(f"loopback sshfs is not available: {why}")
    server = SshServer(tmp_path / "sshd")
    with server:
        yield server
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        print(f"\n----- sshd log ({server.log_path}) -----\n{server.log()}")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """The directory the loopback server exports (the 'file server's' disk)."""
    path = tmp_path / "export"
    path.mkdir()
    return path


def _image(seed: int, side: int) -> NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((side, side), dtype=np.float32)


def _pending(db: str, index: int, array: NDArray[Any]) -> PendingRecord:
    attrs = f'{{"seed": {index}}}'
    return PendingRecord(db, index, array.dtype.str, array.shape, array.tobytes(), attrs)


# ------------------------------------------------------------------ the cache is refused


def test_prepare_cache_dir_refuses_a_real_sshfs_mount_and_names_type_source_and_fix(
    ssh_server: SshServer, export: Path, tmp_path: Path
) -> None:
    with ssh_server.mount(export, tmp_path / "mnt") as mounted:
        for target in (mounted.mount_point / "cache", mounted.mount_point / "deeper" / "cache"):
            with pytest.raises(UnsafeCacheLocation) as info:
                prepare_cache_dir(target)
            err = info.value
            assert err.path == str(target)
            assert err.fstype == "fuse.sshfs"
            assert err.mountpoint == str(mounted.mount_point)
            # The source as the mount table has it, and independently what it must contain.
            assert err.mount_source == mounted.source
            assert f"127.0.0.1:{export.resolve()}" in err.mount_source
            message = str(err)
            for part in (str(target), "fuse.sshfs", err.mount_source, "DBGUARD_CACHE", "local disk"):
                assert part in message, f"{part!r} missing from: {message}"
        # Refused before anything was created, on the server's disk as seen through the mount.
        assert os.listdir(export) == []
        # The same call on a local directory beside the mount is accepted: the refusal above is
        # about the filesystem, not about the test's paths.
        local = prepare_cache_dir(tmp_path / "local-cache")
        assert local.is_dir()


def _dbguard(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbguard", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_the_command_line_refuses_a_cache_on_sshfs_with_exit_code_5(
    ssh_server: SshServer, export: Path, tmp_path: Path, broker: BrokerProcess
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    with ssh_server.mount(export, tmp_path / "mnt") as mounted:
        cache = mounted.mount_point / "cache"
        env = {
            **os.environ,
            "DBGUARD_BROKER": broker.address,
            "DBGUARD_CACHE": str(cache),
            "DBGUARD_REQUEST_TIMEOUT": "3",
            "XDG_STATE_HOME": str(tmp_path / "state"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
        }
        runs = {
            "check-cache PATH": (_dbguard("check-cache", str(mounted.mount_point / "x"), env=env), "x"),
            "check-cache (DBGUARD_CACHE)": (_dbguard("check-cache", env=env), "cache"),
            "acquire": (_dbguard("acquire", str(project), env=env), "cache"),
        }
        for what, (result, leaf) in runs.items():
            assert result.returncode == ExitCode.UNSAFE_CACHE, f"{what}: {result.stdout}{result.stderr}"
            for part in (str(mounted.mount_point / leaf), "fuse.sshfs", mounted.source, "DBGUARD_CACHE"):
                assert part in result.stderr, f"{what}: {part!r} missing from: {result.stderr}"
        assert os.listdir(export) == []
        # The broker was there to grant: the refusal came from the cache check, not from a
        # missing broker, and it came before any lease was taken.
        with broker.client() as client:
            assert client.call_ok("hello")
        # A local cache passes the same check, so exit code 5 above is about sshfs.
        local = _dbguard("check-cache", str(tmp_path / "local-cache"), env=env)
        assert local.returncode == 0, local.stderr


# ------------------------------------------------------------------ the project store works


def _check_whole(store: ProjectStore, expected: dict[int, dict[tuple[str, int], NDArray[Any]]]) -> int:
    """The newest generation ``store`` sees is one of ``expected`` (generation -> records), it
    verifies, and every record it names reads back through plain numpy as the array written for
    that generation; return the generation."""
    manifest = store.latest()
    assert manifest.generation in expected
    assert list(store.verify()) == []
    records = expected[manifest.generation]
    live = store.live_entries(manifest)
    assert set(live) == set(records)
    for key, entry in live.items():
        payload = store.read_payload(entry)
        assert record_crc(payload, entry.attrs) == entry.crc
        # Payloads are readable with numpy alone, given the manifest entry (docs/design.md, "Files on disk").
        mapped = np.memmap(store.segment_path(entry.segment), entry.dtype, "r", entry.offset, entry.shape)
        assert np.array_equal(mapped, records[key]), f"{key} differs in generation {manifest.generation}"
    return manifest.generation


def test_a_project_store_on_sshfs_is_read_whole_through_a_second_independent_mount(
    ssh_server: SshServer, export: Path, tmp_path: Path
) -> None:
    (export / "project").mkdir()
    with (
        ssh_server.mount(export, tmp_path / "host-a") as host_a,
        ssh_server.mount(export, tmp_path / "host-b") as host_b,
    ):
        assert host_a.process is not None and host_b.process is not None
        assert host_a.process.pid != host_b.process.pid  # two clients, two client caches
        project = init_project(host_a.mount_point / "project")
        writer = ProjectStore(project.path, project.id)
        reader = ProjectStore(host_b.mount_point / "project", project.id)

        first = {("images", i): _image(i, 64 + 16 * (i % 8)) for i in range(24)}
        result = writer.flush(
            [_pending(db, i, array) for (db, i), array in first.items()], token=1, writer={"host": "a"}
        )
        assert result.records == 24
        assert _check_whole(reader, {result.generation: first}) == result.generation

        # Host B's client cache is warm now. Host A rewrites some records and adds others; B reads
        # at once: whatever its cache still shows, it gets one whole generation.
        second = dict(first)
        for i in (*range(0, 24, 3), *range(24, 32)):
            second[("images", i)] = _image(1000 + i, 96)
        again = writer.flush(
            [_pending("images", i, second[("images", i)]) for i in (*range(0, 24, 3), *range(24, 32))],
            token=1,
        )
        _check_whole(reader, {result.generation: first, again.generation: second})
        # Through host A's own mount, and through a third mount with a cold cache, the newest
        # generation is there and complete.
        assert _check_whole(writer, {again.generation: second}) == again.generation
        with ssh_server.mount(export, tmp_path / "host-c") as host_c:
            fresh = ProjectStore(host_c.mount_point / "project", project.id)
            assert _check_whole(fresh, {again.generation: second}) == again.generation


def test_concurrent_flushes_through_two_sshfs_mounts_retry_a_lost_publish_race(
    ssh_server: SshServer, export: Path, tmp_path: Path
) -> None:
    """Two hosts flushing under the same token race for each generation number; the loser of a
    link(2) race must rebuild on the winner's manifest, never fail. Over sshfs, a link whose
    target appeared between the kernel's lookup and the server's link(2) fails with EPERM, not
    EEXIST (SFTP has no 'exists' status), which is the case this test provokes."""
    (export / "project").mkdir()
    rounds = 40
    with (
        ssh_server.mount(export, tmp_path / "host-a") as host_a,
        ssh_server.mount(export, tmp_path / "host-b") as host_b,
    ):
        project = init_project(host_a.mount_point / "project")
        start = threading.Barrier(2, timeout=60)
        errors: list[str] = []
        written: dict[tuple[str, int], int] = {}

        def flusher(mount: Mount, db: str) -> None:
            store = ProjectStore(mount.mount_point / "project", project.id)
            for index in range(rounds):
                array = _image(zlib.crc32(f"{db}{index}".encode()), 32)
                record = _pending(db, index, array)
                written[(db, index)] = record_crc(record.payload, record.attrs)
                start.wait()  # both publish for the same generation number as often as possible
                try:
                    store.flush([record], token=3, writer={"host": db})
                except GuardError as exc:
                    errors.append(f"{db} round {index}: {exc}")

        threads = [threading.Thread(target=flusher, args=(m, db)) for m, db in ((host_a, "a"), (host_b, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, f"{len(errors)} of {2 * rounds} flushes failed, first: {errors[0]}"
        store = ProjectStore(host_a.mount_point / "project", project.id)
        manifest = store.latest()
        assert manifest.generation == 2 * rounds
        assert list(store.verify()) == []
        live = store.live_entries(manifest)
        assert {key: entry.crc for key, entry in live.items()} == written
