"""What only the etcd lease service has: members that fail one at a time, a cluster that can
lose its quorum, endpoints in the address. The lease rules both services share are in
tests/test_leases_e2e.py, which runs on etcd too."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dbguard.errors import UsageError
from dbguard.lease.etcd import EtcdAddress, EtcdLeases
from dbguard.lease.etcd_cluster import EtcdCluster
from tests.support import TTL, project_state
from tools.etcd_faults import kill_member
from tools.testbed import EtcdBackend, Host, wait_for


@pytest.fixture
def backend(etcd_backend: EtcdBackend) -> EtcdBackend:
    return etcd_backend


def acquire(host: Host, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run("acquire", str(project), "--json", *args)


def test_killing_the_leader_keeps_the_lease_and_never_grants_a_second_writer(
    hosts: dict[str, Host], project: Path, etcd_backend: EtcdBackend
) -> None:
    a, b = hosts["a"], hosts["b"]
    first = acquire(a, project)
    assert first.returncode == 0, first.stderr
    token = json.loads(first.stdout)["token"]
    cluster = etcd_backend.cluster
    leader = cluster.wait_for_leader()
    # b keeps trying while the leader dies and the others elect a new one: it may be told the
    # project is held (3) or that etcd cannot answer yet (4), never granted (0).
    outcomes: list[int] = []
    stop = threading.Event()

    def contend() -> None:
        while not stop.is_set():
            outcomes.append(b.run("acquire", str(project)).returncode)

    contender = threading.Thread(target=contend)
    contender.start()
    try:
        kill_member(cluster, leader)
        new_leader = cluster.wait_for_leader(exclude=leader)
        assert new_leader != leader
        time.sleep(TTL * 2)  # several heartbeats of a's agent go to the new leader
    finally:
        stop.set()
        contender.join()
        cluster.start_member(leader)
    assert outcomes and set(outcomes) <= {3, 4}, outcomes
    assert 3 in outcomes  # the new leader answered while a held the project
    held = project_state(b, project)
    assert held["state"] == "held" and held["writer"]["host"] == "host-a"
    assert held["writer"]["token"] == token
    agent = json.loads(a.run("status", str(project), "--json").stdout)["agent"]
    assert [lease["state"] for lease in agent["leases"]] == ["held"]


def test_without_quorum_acquire_exits_4_saying_so_and_work_goes_on_when_it_returns(
    hosts: dict[str, Host], project: Path, etcd_backend: EtcdBackend
) -> None:
    a, b = hosts["a"], hosts["b"]
    other = project.parent / "other"
    other.mkdir()
    assert b.run("init", str(other)).returncode == 0
    held = acquire(a, project)
    assert held.returncode == 0, held.stderr
    token = json.loads(held.stdout)["token"]
    cluster = etcd_backend.cluster
    down = [i for i in range(3) if i != cluster.wait_for_leader()][:1]
    down.append(cluster.wait_for_leader())  # the leader and one follower: one member of three left
    try:
        for index in down:
            kill_member(cluster, index)
        refused = acquire(b, other)
        assert refused.returncode == 4, refused.stderr
        assert "no quorum" in refused.stderr and "start the stopped members" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        for index in down:
            cluster.start_member(index)
    cluster.wait_for_leader()
    # Quorum is back: the holder still holds with its token, the other project can be granted.
    assert wait_for(lambda: project_state(b, project)["state"] == "held", TTL * 3)
    assert project_state(b, project)["writer"]["token"] == token
    granted = acquire(b, other)
    assert granted.returncode == 0, granted.stderr
    assert acquire(b, project).returncode == 3


def test_an_unreachable_etcd_is_exit_4_and_a_malformed_address_exit_2(tmp_path: Path, project: Path) -> None:
    with pytest.raises(UsageError, match="host:port"):
        EtcdAddress.parse("etcd://nohost")
    assert EtcdAddress.parse("etcd://h1:2379,h2:2380/site").prefix == "site"
    env_base = {"XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    subprocess.run([sys.executable, "-m", "dbguard", "init", str(project)], env=_environ(), check=True)
    for address, code, words in (
        ("etcd://nohost", 2, "host:port"),
        ("etcd://127.0.0.1:1,127.0.0.1:2", 4, "no etcd member answers"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "dbguard", "status", str(project)],
            env={**_environ(), **env_base, "DBGUARD_BROKER": address, "DBGUARD_REQUEST_TIMEOUT": "1"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == code, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr


def test_up_etcd_starts_a_local_three_member_cluster_that_down_stops(tmp_path: Path, project: Path) -> None:
    env = {
        **_environ(),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "DBGUARD_CACHE": str(tmp_path / "cache"),
        "DBGUARD_TTL": "2",
    }
    env.pop("DBGUARD_BROKER", None)

    def dbguard(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dbguard", *args],
            env={**env, **(extra or {})},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    up = dbguard("up", "--etcd", "--json")
    try:
        assert up.returncode == 0, up.stderr
        address = json.loads(up.stdout)["broker"]
        assert address.startswith("etcd://") and address.count(",") == 2
        cluster = EtcdCluster.existing(tmp_path / "state" / "dbguard" / "broker" / "etcd")
        assert cluster is not None and cluster.running() == [0, 1, 2]
        again = dbguard("up", "--etcd", "--json")  # idempotent: finds the running cluster
        assert again.returncode == 0 and json.loads(again.stdout)["broker"] == address
        granted = dbguard("acquire", str(project), "--json", extra={"DBGUARD_BROKER": address})
        assert granted.returncode == 0, granted.stderr
        shown = dbguard("status", str(project), "--json", extra={"DBGUARD_BROKER": address})
        assert (
            json.loads(shown.stdout)["projects"][0]["writer"]["token"] == json.loads(granted.stdout)["token"]
        )
    finally:
        down = dbguard("down", "--json")
    assert down.returncode == 0, down.stderr
    assert "etcd" in json.loads(down.stdout)["stopped"]
    assert cluster.running() == []


def _environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("DBGUARD_")}


def test_racing_clients_never_hold_one_project_at_once(etcd_backend: EtcdBackend) -> None:
    """Eight clients, each with its own connection, race for one project for a few seconds:
    the grants they observe never overlap and their tokens strictly increase in grant order."""
    events: list[tuple[float, float, int, str]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 4.0

    def client(index: int) -> None:
        who = {"host": f"racer-{index}", "user": "u", "agent": f"a{index}", "cache": "/c"}
        with EtcdLeases(etcd_backend.address) as leases:
            while time.monotonic() < deadline:
                reply = leases.call("acquire", project="contended", holder=who)
                if not reply["ok"]:
                    assert reply["error"] == "held", reply
                    continue
                # What the client saw of its hold, from the grant's reply to sending the release,
                # lies inside the hold etcd recorded; these must not overlap.
                granted = time.monotonic()
                time.sleep(0.001)
                releasing = time.monotonic()
                leases.call_ok("release", project="contended", holder=who, token=reply["token"])
                with lock:
                    events.append((granted, releasing, reply["token"], who["host"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events.sort()
    assert len(events) > 20, events
    assert len({host for *_, host in events}) > 1  # several clients got their turn
    for (_, end, token, host), (start, _, later, other) in itertools.pairwise(events):
        assert end <= start, f"{host} (token {token}) still held when {other} (token {later}) was granted"
        assert later > token
