"""The lease conformance suite: every lease rule end to end, on both lease services.

Each test runs twice, once with the embedded broker and once with a real three-member etcd
cluster (`backend`), with real agent processes on hosts that have their own hostnames. What
only one service has lives beside it: tests/test_broker.py and tests/test_etcd.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from dbguard.cache import CacheStore
from tests.support import LOCK_DELAY, TTL, acquire, project_state, status
from tools.testbed import EtcdBackend, Host, LeaseBackend, wait_for


@pytest.fixture(params=["embedded", "etcd"])
def backend(request: pytest.FixtureRequest) -> LeaseBackend:
    """Each test of this module once per lease service."""
    if request.param == "etcd":
        etcd: EtcdBackend = request.getfixturevalue("etcd_backend")
        return etcd
    broker: LeaseBackend = request.getfixturevalue("broker")
    return broker


def make_dirty(host: Host, project: Path) -> None:
    """Put an unflushed record in the host's real cache, as a writer process would."""
    project_id = json.loads((project / ".dbguard" / "project.json").read_text())["id"]
    with CacheStore(host.cache, project_id) as store:
        store.put("images", 0, np.ones((64, 64), dtype=np.float32))


def test_second_host_is_refused_with_exit_code_3_naming_the_holder(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    acquire(a, project)
    refused = b.run("acquire", str(project))
    assert refused.returncode == 3
    assert "held by" in refused.stderr and "host-a" in refused.stderr
    assert "--takeover" in refused.stderr  # says what the user can do
    writer = project_state(b, project)["writer"]
    assert writer["host"] == "host-a"
    # The human-readable record in the project directory names the writer too.
    record = json.loads((project / ".dbguard" / "writer.json").read_text())
    assert record["writer"]["host"] == "host-a"


def test_release_hands_the_project_to_the_next_host_with_a_greater_token(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    first = acquire(a, project)
    released = a.run("release", str(project))
    assert released.returncode == 0, released.stderr
    second = acquire(b, project)
    assert second["token"] > first["token"]
    assert project_state(a, project)["writer"]["host"] == "host-b"
    assert json.loads((project / ".dbguard" / "writer.json").read_text())["last_token"] == second["token"]


def test_tokens_strictly_increase_across_crashes_of_the_lease_service(
    hosts: dict[str, Host], project: Path, backend: LeaseBackend
) -> None:
    a, b = hosts["a"], hosts["b"]
    tokens = []
    for round_ in range(3):
        tokens.append(acquire(a, project)["token"])
        assert a.run("release", str(project)).returncode == 0
        backend.restart()  # kill -9 of the broker, or of etcd's leader
        # No live lease at the crash: no grace period is needed, b may acquire at once.
        tokens.append(acquire(b, project)["token"])
        assert b.run("release", str(project)).returncode == 0, round_
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens


def test_token_floor_in_the_project_survives_a_lost_lease_state(
    hosts: dict[str, Host], project: Path, backend: LeaseBackend
) -> None:
    a = hosts["a"]
    first = acquire(a, project)["token"]
    assert a.run("release", str(project)).returncode == 0
    backend.lose_state()  # the broker's disk, or etcd's keys, are gone
    assert acquire(a, project)["token"] > first


def test_paused_clean_agent_loses_lease_after_ttl_and_project_frees_after_lock_delay(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    acquire(a, project)
    a.signal_agent(signal.SIGSTOP)
    try:
        assert wait_for(lambda: project_state(b, project)["state"] != "held", TTL * 3)
        assert project_state(b, project)["state"] in ("lock-delay", "free")
        assert wait_for(lambda: b.run("acquire", str(project)).returncode == 0, LOCK_DELAY * 4 + 2)
    finally:
        a.signal_agent(signal.SIGCONT)
    # The resumed agent learns its lease is gone and says so in status.
    assert wait_for(
        lambda: any(lease["state"] == "lost" for lease in status(a, project)["agent"]["leases"]), TTL * 3
    )


def test_paused_dirty_agent_orphans_the_project_until_broken(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    acquire(a, project)
    make_dirty(a, project)
    # The next heartbeat reports the unflushed bytes.
    assert wait_for(lambda: project_state(b, project)["writer"]["unflushed"] > 0, TTL * 2)
    a.signal_agent(signal.SIGSTOP)
    try:
        assert wait_for(lambda: project_state(b, project)["state"] == "orphaned", TTL * 3)
        time.sleep(LOCK_DELAY * 2)
        assert project_state(b, project)["state"] == "orphaned"  # never frees by itself
        refused = b.run("acquire", str(project))
        assert refused.returncode == 3
        human = b.run("status", str(project)).stdout
        assert "orphaned" in human and "host-a" in human and "stranded" in human
        no_force = b.run("break", str(project))
        assert no_force.returncode == 2 and "--force" in no_force.stderr
        broken = b.run("break", str(project), "--force", "--json")
        assert broken.returncode == 0, broken.stderr
        assert json.loads(broken.stdout)["broken"]["host"] == "host-a"
        acquire(b, project)
    finally:
        a.signal_agent(signal.SIGCONT)
    leases = wait_for(lambda: _lost_reason(a, project), TTL * 3)
    assert leases
    assert "broke" in _lost_reason(a, project)


def _lost_reason(host: Host, project: Path) -> str:
    agent = status(host, project)["agent"]
    lost = [lease["reason"] for lease in agent["leases"] if lease["state"] == "lost"]
    return lost[0] if lost else ""


def test_dirty_holder_that_returns_resumes_its_orphaned_lease(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    token = acquire(a, project)["token"]
    make_dirty(a, project)
    assert wait_for(lambda: project_state(b, project)["writer"]["unflushed"] > 0, TTL * 2)
    a.signal_agent(signal.SIGSTOP)
    assert wait_for(lambda: project_state(b, project)["state"] == "orphaned", TTL * 3)
    a.signal_agent(signal.SIGCONT)
    assert wait_for(lambda: project_state(b, project)["state"] == "held", TTL * 2)
    assert project_state(b, project)["writer"]["token"] == token


def test_queue_is_served_first_come_first_served(hosts: dict[str, Host], project: Path) -> None:
    a, b, c = hosts["a"], hosts["b"], hosts["c"]
    acquire(a, project)
    waiting_b = b.popen("acquire", str(project), "--wait", "30", "--json")
    assert wait_for(lambda: len(project_state(a, project)["queue"]) == 1, 10)
    waiting_c = c.popen("acquire", str(project), "--wait", "30", "--json")
    assert wait_for(lambda: len(project_state(a, project)["queue"]) == 2, 10)
    assert [w["host"] for w in project_state(a, project)["queue"]] == ["host-b", "host-c"]
    assert a.run("release", str(project)).returncode == 0
    out_b, err_b = waiting_b.communicate(timeout=20)
    assert waiting_b.returncode == 0, err_b
    assert waiting_c.poll() is None  # c still waits behind b
    assert project_state(a, project)["writer"]["host"] == "host-b"
    assert b.run("release", str(project)).returncode == 0
    out_c, err_c = waiting_c.communicate(timeout=20)
    assert waiting_c.returncode == 0, err_c
    assert json.loads(out_c)["token"] > json.loads(out_b)["token"]


def test_wait_that_times_out_exits_3_and_leaves_the_queue(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    acquire(a, project)
    refused = b.run("acquire", str(project), "--wait", "1")
    assert refused.returncode == 3 and "waited" in refused.stderr
    assert project_state(a, project)["queue"] == []


def test_takeover_makes_the_holder_release(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    first = acquire(a, project)
    taken = acquire(b, project, "--takeover")
    assert taken["token"] > first["token"]
    assert project_state(a, project)["writer"]["host"] == "host-b"
    notices = " ".join(n["text"] for n in status(a, project)["agent"]["notices"])
    assert "takeover requested" in notices


def test_restarted_agent_reclaims_its_lease(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    token = acquire(a, project)["token"]
    a.kill_agent()
    again = acquire(a, project)  # starts a new agent, which reclaims before answering
    assert again["token"] == token
    time.sleep(TTL * 1.5)  # the new agent renews it
    state = project_state(b, project)
    assert state["state"] == "held" and state["writer"]["token"] == token
    assert b.run("acquire", str(project)).returncode == 3


def test_agent_started_after_a_crash_reclaims_without_being_asked(
    hosts: dict[str, Host], project: Path
) -> None:
    a = hosts["a"]
    token = acquire(a, project)["token"]
    a.kill_agent()
    a.popen("agent")  # as a service manager would restart it
    assert wait_for(lambda: a.agent_pid() is not None, 10)
    time.sleep(TTL * 1.5)
    assert project_state(a, project)["writer"]["token"] == token
    notices = " ".join(n["text"] for n in status(a, project)["agent"]["notices"])
    assert "reclaimed" in notices


def test_unsafe_cache_directory_is_refused_with_exit_code_5(hosts: dict[str, Host], project: Path) -> None:
    # A symlinked cache could be redirected by another user of a shared /tmp.
    a = hosts["a"]
    a.cache.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("/tmp", a.cache)
    refused = a.run("acquire", str(project))
    assert refused.returncode == 5
    assert "symlink" in refused.stderr and "DBGUARD_CACHE" in refused.stderr


def test_where_the_holder_serves_workers_is_kept_with_its_lease_and_ends_with_it(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    acquire(a, project)
    not_holder = b.run("serve", str(project), "--address", "tcp://127.0.0.1:0")
    assert not_holder.returncode == 3 and "dbguard acquire" in not_holder.stderr
    served = a.run("serve", str(project), "--address", "tcp://127.0.0.1:0", "--json")
    assert served.returncode == 0, served.stderr
    address = json.loads(served.stdout)["address"]
    assert project_state(b, project)["writer"]["serve"] == address
    # A worker on b goes through a: its appends are a's unflushed records.
    worker = b.python(
        f"import numpy as np, dbguard\n"
        f"with dbguard.open({str(project)!r}, 'images', 'a', remote=True) as db:\n"
        f"    print(db.extend([np.full((8, 8), i, np.float32) for i in range(3)]))"
    )
    assert worker.returncode == 0 and worker.stdout.strip() == "[0, 1, 2]", worker.stderr
    assert wait_for(lambda: project_state(b, project)["writer"]["unflushed"] > 0, TTL * 2)
    assert a.run("serve", str(project), "--stop").returncode == 0
    assert project_state(b, project)["writer"]["serve"] is None
    assert a.run("serve", str(project), "--address", "tcp://127.0.0.1:0").returncode == 0
    assert a.run("release", str(project)).returncode == 0
    assert project_state(b, project)["writer"] is None
