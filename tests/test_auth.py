"""Authentication with CURVE keys: who may use the broker, renew a lease, break one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbguard.errors import BrokerUnavailable, UsageError
from dbguard.lease import keys
from dbguard.lease.client import Client
from tests.support import LOCK_DELAY, TTL
from tools.testbed import BrokerProcess


def client_dir(root: Path, broker_dir: Path, name: str, *, authorized: bool, operator: bool = False) -> Path:
    """A client machine's keys directory: its key pair and the broker's public key."""
    directory = root / name
    public = keys.init_client(directory)
    shutil.copyfile(broker_dir / "broker.key", directory / "broker.key")
    if authorized:
        keys.authorize(broker_dir, public, name, operator=operator)
    return directory


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Path]]:
    broker_dir = tmp_path / "broker-keys"
    keys.init_broker(broker_dir)
    dirs = {
        "broker": broker_dir,
        "ws1": client_dir(tmp_path, broker_dir, "ws1", authorized=True),
        "ws2": client_dir(tmp_path, broker_dir, "ws2", authorized=True),
        "admin": client_dir(tmp_path, broker_dir, "admin", authorized=True, operator=True),
        "intruder": client_dir(tmp_path, broker_dir, "intruder", authorized=False),
    }
    yield dirs


@pytest.fixture
def secure_broker(tmp_path: Path, site: dict[str, Path]) -> Iterator[BrokerProcess]:
    process = BrokerProcess(
        tmp_path / "state", ttl=TTL, lock_delay=LOCK_DELAY, keys=site["broker"], client_keys=site["ws1"]
    )
    process.start()
    yield process
    process.stop()


def client(broker: BrokerProcess, directory: Path | None, timeout: float = 3.0) -> Client:
    key_pair = keys.client_keys(directory) if directory else None
    return Client(broker.address, timeout=timeout, attempts=1, keys=key_pair)


HOLDER = {"host": "ws1", "user": "u", "agent": "a", "cache": "/c"}


def test_an_authorised_key_is_served(secure_broker: BrokerProcess, site: dict[str, Path]) -> None:
    with client(secure_broker, site["ws1"]) as ws1:
        assert ws1.call_ok("acquire", project="p", holder=HOLDER)["token"] == 1


def test_a_client_without_keys_is_refused_and_told_so(secure_broker: BrokerProcess) -> None:
    with client(secure_broker, None) as anonymous, pytest.raises(BrokerUnavailable) as refused:
        anonymous.call_ok("hello")
    assert "requires CURVE authentication" in str(refused.value) and "DBGUARD_KEYS" in str(refused.value)


def test_an_unknown_key_is_refused_and_told_so(secure_broker: BrokerProcess, site: dict[str, Path]) -> None:
    with client(secure_broker, site["intruder"]) as intruder, pytest.raises(BrokerUnavailable) as refused:
        intruder.call_ok("hello")
    assert "refused this machine's key" in str(refused.value) and "keys authorize" in str(refused.value)


def test_only_the_key_that_holds_a_lease_may_renew_or_release_it(
    secure_broker: BrokerProcess, site: dict[str, Path]
) -> None:
    with client(secure_broker, site["ws1"]) as ws1, client(secure_broker, site["ws2"]) as ws2:
        token = ws1.call_ok("acquire", project="p", holder=HOLDER)["token"]
        # ws2 claims to be ws1 in the message: the broker goes by the authenticated key.
        forged = ws2.call_ok(
            "renew", holder=HOLDER, leases=[{"project": "p", "token": token, "unflushed": 0}]
        )
        assert forged["results"][0]["ok"] is False
        assert ws2.call_ok("release", project="p", holder=HOLDER, token=token)["held"] is False
        assert ws2.call("acquire", project="p", holder=HOLDER)["error"] == "held"
        status = ws1.call_ok("status", project="p")["projects"][0]
        assert status["state"] == "held" and status["writer"]["token"] == token
        genuine = ws1.call_ok(
            "renew", holder=HOLDER, leases=[{"project": "p", "token": token, "unflushed": 0}]
        )
        assert genuine["results"][0]["ok"] is True
        assert ws1.call_ok("release", project="p", holder=HOLDER, token=token)["held"] is True


def test_breaking_a_lease_needs_an_operator_key(secure_broker: BrokerProcess, site: dict[str, Path]) -> None:
    with client(secure_broker, site["ws1"]) as ws1, client(secure_broker, site["admin"]) as admin:
        ws1.call_ok("acquire", project="p", holder=HOLDER)
        with pytest.raises(UsageError, match="operator key"):
            ws1.call_ok("break", project="p", force=True)
        broken = admin.call_ok("break", project="p", force=True)["broken"]
        assert broken["host"] == "ws1"


def test_a_key_authorised_later_is_served_without_a_restart(
    secure_broker: BrokerProcess, site: dict[str, Path], tmp_path: Path
) -> None:
    late = client_dir(tmp_path, site["broker"], "late", authorized=False)
    with client(secure_broker, late, timeout=1.0) as refused, pytest.raises(BrokerUnavailable):
        refused.call_ok("hello")
    keys.authorize(site["broker"], late / "client.key", "late")
    with client(secure_broker, late) as welcome:
        assert welcome.call_ok("hello")["version"] == 1


def test_the_command_line_uses_dbguard_keys(
    secure_broker: BrokerProcess, site: dict[str, Path], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    env = {
        **os.environ,
        "DBGUARD_BROKER": secure_broker.address,
        "DBGUARD_CACHE": str(tmp_path / "cache"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "DBGUARD_REQUEST_TIMEOUT": "2",
    }

    def dbguard(*args: str, keys_dir: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dbguard", *args],
            env={**env, "DBGUARD_KEYS": str(keys_dir)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    try:
        refused = dbguard("status", keys_dir=site["intruder"])
        assert refused.returncode == 4 and "refused this machine's key" in refused.stderr
        assert dbguard("init", str(project), keys_dir=site["ws1"]).returncode == 0
        acquired = dbguard("acquire", str(project), "--json", keys_dir=site["ws1"])
        assert acquired.returncode == 0, acquired.stderr
        assert json.loads(acquired.stdout)["token"] == 1
        no_operator = dbguard("break", str(project), "--force", keys_dir=site["ws1"])
        assert no_operator.returncode == 2 and "operator key" in no_operator.stderr
        assert dbguard("break", str(project), "--force", keys_dir=site["admin"]).returncode == 0
    finally:
        dbguard("down", keys_dir=site["ws1"])


def test_keys_commands_create_and_authorise(tmp_path: Path) -> None:
    def dbguard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dbguard", "keys", *args], capture_output=True, text=True, check=False
        )

    assert dbguard("init-broker", "--dir", str(tmp_path / "b")).returncode == 0
    assert dbguard("init-client", "--dir", str(tmp_path / "c")).returncode == 0
    again = dbguard("init-client", "--dir", str(tmp_path / "c"))
    assert again.returncode == 2 and "exists already" in again.stderr  # never overwrites a key
    done = dbguard(
        "authorize", str(tmp_path / "c" / "client.key"), "--name", "ws9", "--dir", str(tmp_path / "b")
    )
    assert done.returncode == 0
    assert (tmp_path / "b" / "authorized" / "ws9.key").exists()
    bad = tmp_path / "not-a-key"
    bad.write_text("hello")
    refused = dbguard("authorize", str(bad), "--name", "x", "--dir", str(tmp_path / "b"))
    assert refused.returncode == 2 and "cannot read" in refused.stderr
