"""A real three-member etcd cluster on loopback: start, crash, pause, lose quorum, restart, detach.

No mocks: every test runs etcd processes and talks to them through etcd3gw, a client of etcd's
JSON gateway. The member logs are printed when a test fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import etcd3gw
import pytest
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from dbguard.errors import EtcdClusterError
from dbguard.lease import etcd_cluster as local_etcd
from dbguard.lease.etcd_cluster import EtcdCluster, etcd_unavailable
from tools.etcd_faults import kill_member, pause_member, resume_member

pytestmark = pytest.mark.slow

_WHY_NO_ETCD = etcd_unavailable()

# Long enough for a put through a healthy cluster, far shorter than the 7 s etcd itself takes to
# give up on a proposal without a leader (5 s + two election timeouts).
_CLIENT_TIMEOUT = 1.5


def _need_etcd() -> None:
    if _WHY_NO_ETCD:
        # CI installs etcd-server (tools/test): there a missing etcd is a failure, not a skip.
        if os.environ.get("CI") == "true":
            pytest.fail(f"the local etcd tests need etcd: {_WHY_NO_ETCD}")
        pytest.skip(f"the local etcd tests need etcd: {_WHY_NO_ETCD}")


def _print_logs_if_failed(cluster: EtcdCluster, request: pytest.FixtureRequest) -> None:
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        for index in range(cluster.size):
            print(f"\n----- etcd member {index} log ({cluster.log_path(index)}) -----")
            print(cluster.log(index))


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    _need_etcd()
    made = EtcdCluster(tmp_path / "etcd")
    made.start()
    yield made
    made.stop()
    _print_logs_if_failed(made, request)


def _client(cluster: EtcdCluster, index: int) -> Etcd3Client:
    return etcd3gw.client(host=cluster.host, port=cluster.client_ports[index], timeout=_CLIENT_TIMEOUT)


def _until(condition: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Etcd3Exception:
            pass  # a member still catching up may refuse; ask again
        if time.monotonic() >= deadline:
            pytest.fail(f"not within {timeout}s: {condition}")
        time.sleep(0.05)


def test_etcd_unavailable_says_which_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_etcd, "ETCD_BINARY", "etcd-that-is-not-installed")
    why = etcd_unavailable()
    assert why is not None and "etcd-server" in why


def test_a_fresh_cluster_has_a_leader_and_every_member_serves_puts(cluster: EtcdCluster) -> None:
    assert cluster.running() == [0, 1, 2]
    assert cluster.leader() in (0, 1, 2)
    assert cluster.endpoints == [f"127.0.0.1:{port}" for port in cluster.client_ports]
    assert cluster.url("sites/lab") == "etcd://" + ",".join(cluster.endpoints) + "/sites/lab"
    for index in range(3):
        assert _client(cluster, index).put(f"key-{index}", f"value-{index}")
    assert _client(cluster, 0).get("key-2") == [b"value-2"]
    assert (cluster.directory / "cluster.json").is_file()


def test_killing_the_leader_elects_another_and_writes_go_on(cluster: EtcdCluster) -> None:
    old = cluster.wait_for_leader()
    _client(cluster, old).put("before", "crash")
    kill_member(cluster, old)
    assert old not in cluster.running()
    new = cluster.wait_for_leader(timeout=10, exclude=old)
    assert _client(cluster, new).put("after", "crash")
    follower = next(index for index in cluster.running() if index != new)
    assert _client(cluster, follower).get("before") == [b"crash"]


def test_without_a_majority_writes_fail_and_none_leads_until_a_killed_member_returns(
    cluster: EtcdCluster,
) -> None:
    leader = cluster.wait_for_leader()
    first, second = leader, (leader + 1) % 3
    survivor = (leader + 2) % 3
    _client(cluster, survivor).put("written", "with quorum")
    kill_member(cluster, first)
    kill_member(cluster, second)

    with pytest.raises(Etcd3Exception):
        _client(cluster, survivor).put("lost", "no quorum")
    # A leader left alone steps down within about two election timeouts (CheckQuorum).
    _until("the lone member stops leading", lambda: cluster.leader() is None, timeout=5)

    cluster.start_member(first)
    cluster.wait_for_leader(timeout=10)
    assert _client(cluster, survivor).put("written", "again")
    assert _client(cluster, first).get("written") == [b"again"]
    assert _client(cluster, first).get("lost") == []

    # The member killed last rejoins on its data directory and catches up with what it missed:
    # a serializable read answers from its own copy.
    cluster.start_member(second)
    assert cluster.running() == [0, 1, 2]
    rejoined = _client(cluster, second)
    _until(
        "the restarted member has the write it missed",
        lambda: rejoined.get("written", serializable=True) == [b"again"],
        timeout=5,
    )


def test_a_paused_leader_is_replaced_and_rejoins_when_resumed(cluster: EtcdCluster) -> None:
    paused = cluster.wait_for_leader()
    pause_member(cluster, paused)
    started = time.monotonic()
    assert cluster.leader() != paused
    assert time.monotonic() - started < 2, "leader() waited on the paused member"
    new = cluster.wait_for_leader(timeout=10, exclude=paused)
    assert _client(cluster, new).put("while", "paused")
    assert paused in cluster.running()

    resume_member(cluster, paused)
    back = _client(cluster, paused)
    _until(
        "the resumed member follows the new leader",
        lambda: back.get("while", serializable=True) == [b"paused"] and cluster.leader() is not None,
        timeout=10,
    )


def test_a_detached_cluster_is_found_from_its_directory_stopped_and_restarted(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _need_etcd()
    directory = tmp_path / "etcd"
    assert EtcdCluster.existing(directory) is None
    up = EtcdCluster(directory)
    made = [up]  # every object that started members stops them at the end, reaping its children
    up.start(detached=True)
    try:
        pids = [int(up.pid_path(index).read_text()) for index in range(3)]
        # Members in a session of their own outlive the command that started them.
        assert all(os.getsid(pid) != os.getsid(0) for pid in pids)
        etcd3gw.client(host=up.host, port=up.client_ports[0]).put("kept", "across restarts")

        # `dbguard down` runs in another process and knows only the directory.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from dbguard.lease.etcd_cluster import EtcdCluster;"
                "found = EtcdCluster.existing(Path(sys.argv[1])); assert found is not None;"
                "print(found.running(), found.leader() is not None, found.endpoints)",
                str(directory),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert probe.stdout.strip() == f"[0, 1, 2] True {up.endpoints}"

        # A second `dbguard up` on the same directory finds the members running and starts none.
        again = EtcdCluster.existing(directory)
        assert again is not None
        made.append(again)
        again.start(detached=True)
        assert [int(again.pid_path(index).read_text()) for index in range(3)] == pids

        with pytest.raises(EtcdClusterError, match="already holds a 3-member"):
            EtcdCluster(directory, size=5)

        again.stop()
        assert again.running() == [] and up.running() == []

        # Started again on its data directories, the whole cluster still has what it stored.
        restarted = EtcdCluster.existing(directory)
        assert restarted is not None
        made.append(restarted)
        restarted.start(detached=True)
        assert etcd3gw.client(host=up.host, port=up.client_ports[2]).get("kept") == [b"across restarts"]
    finally:
        for cluster in reversed(made):
            cluster.stop()
        _print_logs_if_failed(up, request)
    assert up.running() == []


def test_a_member_that_cannot_start_fails_start_with_the_end_of_its_log(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _need_etcd()
    cluster = EtcdCluster(tmp_path / "etcd")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cluster.peer_ports[1]))
        squatter.listen()
        with pytest.raises(EtcdClusterError) as failure:
            cluster.start(timeout=15)
    try:
        assert failure.value.member == 1
        assert "etcd member 1" in str(failure.value)
        assert "address already in use" in str(failure.value)
        # The members that did start are not left behind.
        assert cluster.running() == []
    finally:
        cluster.stop()
        _print_logs_if_failed(cluster, request)
