"""A project's history (`dbguard log`), on both lease services: every event of a workflow that
goes through each way a lease can end, in order, with who did it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import TTL, acquire, project_state, script
from tools.testbed import EtcdBackend, Host, LeaseBackend, wait_for


@pytest.fixture(params=["embedded", "etcd"])
def backend(request: pytest.FixtureRequest) -> LeaseBackend:
    if request.param == "etcd":
        etcd: EtcdBackend = request.getfixturevalue("etcd_backend")
        return etcd
    broker: LeaseBackend = request.getfixturevalue("broker")
    return broker


def log(host: Host, *args: str) -> list[dict[str, Any]]:
    result = host.run("log", *args, "--json")
    assert result.returncode == 0, result.stderr
    events: list[dict[str, Any]] = json.loads(result.stdout)
    return events


def test_log_lists_the_demo_workflow_in_order_with_who_did_it(hosts: dict[str, Host], project: Path) -> None:
    a, b = hosts["a"], hosts["b"]
    started = time.time()
    first = acquire(a, project)["token"]
    script(
        a,
        f"""
        import dbguard, numpy
        with dbguard.open({str(project)!r}, "particles", "w") as db:
            db.append(numpy.ones((16, 16), "float32"))
        """,
    )
    assert a.run("flush", str(project)).returncode == 0
    second = acquire(b, project, "--takeover")["token"]  # a flushes and hands over
    script(
        b,
        f"""
        import dbguard, numpy
        with dbguard.open({str(project)!r}, "particles", "a") as db:
            db.append(numpy.ones((16, 16), "float32"))
        """,
    )
    assert wait_for(lambda: project_state(a, project)["writer"]["unflushed"] > 0, TTL * 3)
    b.signal_agent(signal.SIGSTOP)  # b's host hangs with unflushed data
    try:
        assert wait_for(lambda: project_state(a, project)["state"] == "orphaned", TTL * 4)
        assert a.run("break", str(project), "--force").returncode == 0
        third = acquire(a, project)["token"]
        assert a.run("release", str(project)).returncode == 0
    finally:
        b.signal_agent(signal.SIGCONT)

    events = log(a, str(project))
    mine = [e for e in events if e["at"] >= started - 1]
    assert all(e["project"] == events[0]["project"] for e in events)
    sequence = [(e["event"], e.get("host"), e.get("token")) for e in mine]
    expected = [
        ("granted", "host-a", first),
        ("flushed", "host-a", first),
        ("takeover-asked", "host-a", first),
        ("released", "host-a", first),
        ("granted", "host-b", second),
        ("orphaned", "host-b", second),
        ("broken", "host-b", second),
        ("granted", "host-a", third),
        ("released", "host-a", third),
    ]
    # The agent's own periodic flushes may add "flushed" events of their own: the rest is exact.
    assert [s for s in sequence if s[0] != "flushed"] == [s for s in expected if s[0] != "flushed"]
    assert sequence.index(("flushed", "host-a", first)) < sequence.index(("released", "host-a", first))
    by_kind = {e["event"]: e for e in mine}
    assert by_kind["takeover-asked"]["by"].endswith("@host-b")
    assert by_kind["broken"]["by"].endswith("@host-a")
    assert by_kind["orphaned"]["unflushed"] > 0
    assert by_kind["flushed"]["records"] >= 1 and by_kind["flushed"]["bytes"] > 0
    assert [e for e in mine if e["event"] == "granted"][1]["takeover"] is True
    assert all(e["path"] == str(project) for e in mine if e["event"] == "granted")
    assert [e["at"] for e in mine] == sorted(e["at"] for e in mine)

    # --since leaves out what came before; text output says the same in lines.
    later = log(a, str(project), "--since", str(by_kind["broken"]["at"]))
    assert [e["event"] for e in later] == ["broken", "granted", "released"]
    text = a.run("log", str(project)).stdout.splitlines()
    assert len(text) == len(events) and any("orphaned" in line and "host-b" in line for line in text)
    # Outside any project, every project's events, each naming its project.
    every = log(a)
    assert {e["event"] for e in every} >= {"granted", "broken"}


def test_a_clean_expiry_is_logged_with_the_end_of_its_lock_delay(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    acquire(a, project)
    a.signal_agent(signal.SIGSTOP)
    try:
        assert wait_for(lambda: b.run("acquire", str(project)).returncode == 0, TTL * 6)
    finally:
        a.signal_agent(signal.SIGCONT)
    kinds = [(e["event"], e["host"]) for e in log(b, str(project))]
    assert kinds[:4] == [
        ("granted", "host-a"),
        ("expired", "host-a"),
        ("lock-delay-ended", "host-a"),
        ("granted", "host-b"),
    ]


def test_log_refuses_a_time_it_cannot_read(hosts: dict[str, Host], project: Path) -> None:
    refused = hosts["a"].run("log", str(project), "--since", "yesterday-ish")
    assert refused.returncode == 2
    assert "--since" in refused.stderr and "30m" in refused.stderr
