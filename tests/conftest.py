"""Shared fixtures: a real broker process and simulated hosts, with logs shown on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.testbed import BrokerProcess, Host, namespaces_unavailable

# Short timings keep the suite fast; every test that waits for an expiry uses these.
TTL = 1.5
LOCK_DELAY = 0.5

_WHY_NO_HOSTS = namespaces_unavailable()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    # Keep the outcome on the item so fixtures can print server logs for failed tests only.
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path / "broker-state", ttl=TTL, lock_delay=LOCK_DELAY)
    process.start()
    yield process
    process.stop()
    if _failed(request):
        print(f"\n----- broker log ({process.log_path}) -----\n{process.log()}")


@pytest.fixture
def hosts(tmp_path: Path, broker: BrokerProcess, request: pytest.FixtureRequest) -> Iterator[dict[str, Host]]:
    """Simulated hosts a, b and c, each with its own hostname, cache and agent."""
    if _WHY_NO_HOSTS:
        # CI runs as root on a machine where namespaces work: there this is a failure, not a skip.
        if os.environ.get("CI") == "true":
            pytest.fail(f"simulated hosts need Linux namespaces: {_WHY_NO_HOSTS}")
        pytest.skip(f"simulated hosts need Linux namespaces (run as root): {_WHY_NO_HOSTS}")
    # Agents flush only when told to unless a test shortens this; periodic flushes would make
    # "unflushed" figures depend on timing.
    made = {
        name: Host(f"host-{name}", tmp_path / "hosts", broker, flush_interval="3600")
        for name in ("a", "b", "c")
    }
    yield made
    for host in made.values():
        host.stop()
    if _failed(request):
        for host in made.values():
            print(f"\n----- agent log of {host.name} -----\n{host.agent_log()}")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory that every simulated host sees (a plain shared directory)."""
    path = tmp_path / "shared" / "project"
    path.mkdir(parents=True)
    return path
