"""Shared fixtures: a real broker process and simulated hosts, with logs shown on failure."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbguard.lease.etcd_cluster import EtcdCluster, etcd_unavailable
from tools.testbed import BrokerProcess, EtcdBackend, Host, LeaseBackend, namespaces_unavailable

# The shared helpers assert too: have pytest rewrite their asserts as it does a test module's, so a
# failure shows the values compared. This must run before anything imports tests.support.
pytest.register_assert_rewrite("tests.support")
from tests.support import LOCK_DELAY, TTL, fail_or_skip, failed  # noqa: E402 (after the line above)

_WHY_NO_HOSTS = namespaces_unavailable()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    # Keep the outcome on the item so fixtures can print server logs for failed tests only.
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path / "broker-state", ttl=TTL, lock_delay=LOCK_DELAY)
    process.start()
    yield process
    process.stop()
    if failed(request):
        print(f"\n----- broker log ({process.log_path}) -----\n{process.log()}")


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A real three-member etcd cluster on loopback, shared by the session's etcd tests; each
    test works under a key prefix of its own. Tests that stop members restore them."""
    why = etcd_unavailable()
    if why:
        fail_or_skip(f"the etcd tests need etcd: {why}")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_backend(etcd_cluster: EtcdCluster, request: pytest.FixtureRequest) -> Iterator[EtcdBackend]:
    for index in range(len(etcd_cluster.endpoints)):
        if index not in etcd_cluster.running():  # a member an earlier test failed to restore
            etcd_cluster.start_member(index)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    backend = EtcdBackend(etcd_cluster, prefix, ttl=TTL, lock_delay=LOCK_DELAY)
    yield backend
    if failed(request):
        print(f"\n----- etcd logs (prefix {prefix}) -----\n{backend.log()}")


@pytest.fixture
def backend(broker: BrokerProcess) -> LeaseBackend:
    """The lease service the hosts use: the embedded broker, unless a module overrides this
    fixture (the conformance suite runs on both)."""
    return broker


@pytest.fixture
def hosts(tmp_path: Path, backend: LeaseBackend, request: pytest.FixtureRequest) -> Iterator[dict[str, Host]]:
    """Simulated hosts a, b and c, each with its own hostname, cache and agent."""
    if _WHY_NO_HOSTS:
        fail_or_skip(f"simulated hosts need Linux namespaces (run as root): {_WHY_NO_HOSTS}")
    # Agents flush only when told to unless a test shortens this; periodic flushes would make
    # "unflushed" figures depend on timing.
    made = {
        name: Host(f"host-{name}", tmp_path / "hosts", backend, flush_interval="3600")
        for name in ("a", "b", "c")
    }
    yield made
    for host in made.values():
        host.stop()
    if failed(request):
        for host in made.values():
            print(f"\n----- agent log of {host.name} -----\n{host.agent_log()}")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory that every simulated host sees (a plain shared directory)."""
    path = tmp_path / "shared" / "project"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """The directory the simulated hosts' sshfs mounts export."""
    path = tmp_path / "export" / "proj"
    path.mkdir(parents=True)
    return path
