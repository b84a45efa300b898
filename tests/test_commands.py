"""The command line's contract: exit codes, messages, settings, `up` and `down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import zmq

from dbguard import settings
from dbguard.errors import LeaseHeld, UsageError
from dbguard.lease import protocol
from tools.testbed import BrokerProcess, Host, free_port


def dbguard(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbguard", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DBGUARD_CACHE": str(tmp_path / "cache"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "DBGUARD_REQUEST_TIMEOUT": "1",
    }


def test_a_resent_request_id_is_answered_from_the_reply_cache_and_grants_once(broker: BrokerProcess) -> None:
    holder = {"host": "h1", "user": "u", "agent": "a1", "cache": "/c"}
    other = {"host": "h2", "user": "u", "agent": "a2", "cache": "/c"}
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(broker.address)
    request = protocol.request("acquire", project="p", holder=holder)
    replies = []
    for _ in range(2):  # the second send is a retry after a "lost" reply
        dealer.send(protocol.encode(request))
        assert dealer.poll(3000)
        replies.append(dealer.recv())
    assert replies[0] == replies[1]
    first = json.loads(replies[0])
    assert first["ok"] and first["token"] == 1
    with broker.client() as client:
        client.call_ok("release", project="p", holder=holder, token=1)
        assert client.call_ok("acquire", project="p", holder=other)["token"] == 2
    dealer.close()


def test_unreachable_broker_gives_exit_code_4_and_names_the_fix(env: dict[str, str], tmp_path: Path) -> None:
    env["DBGUARD_BROKER"] = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    project = tmp_path / "p"
    project.mkdir()
    result = dbguard("acquire", str(project), env=env)
    assert result.returncode == 4, result.stderr
    assert env["DBGUARD_BROKER"] in result.stderr and "dbguard up" in result.stderr
    assert "Traceback" not in result.stderr
    assert dbguard("status", str(project), env=env).returncode == 4
    dbguard("down", env=env)


def test_a_directory_that_is_not_a_project_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    result = dbguard("release", str(tmp_path), env=env)
    assert result.returncode == 2
    assert "not a dbguard project" in result.stderr and "dbguard init" in result.stderr


def test_a_garbled_project_identity_is_an_integrity_error(env: dict[str, str], tmp_path: Path) -> None:
    project = tmp_path / "p"
    assert dbguard("init", str(project.parent / "p"), env=env).returncode == 2  # no such directory yet
    project.mkdir()
    assert dbguard("init", str(project), env=env).returncode == 0
    identity = project / ".dbguard" / "project.json"
    original = identity.read_text()
    identity.write_text("{not json")
    result = dbguard("acquire", str(project), env=env)
    assert result.returncode == 6
    assert str(identity) in result.stderr and "restore" in result.stderr
    assert identity.read_text() == "{not json"  # left for the user to repair, not rewritten
    assert original != identity.read_text()


def test_init_is_idempotent_and_project_is_found_from_a_subdirectory(
    env: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "p"
    (project / "micrographs").mkdir(parents=True)
    first = json.loads(dbguard("init", str(project), "--json", env=env).stdout)
    again = json.loads(dbguard("init", str(project), "--json", env=env).stdout)
    assert first["id"] == again["id"]
    inside = json.loads(dbguard("init", "--json", env=env, cwd=project / "micrographs").stdout)
    assert inside["id"] == first["id"] and inside["path"] == str(project)


def test_up_starts_a_cluster_of_one_and_down_stops_it(env: dict[str, str], tmp_path: Path) -> None:
    env["DBGUARD_BROKER"] = f"tcp://127.0.0.1:{free_port()}"
    project = tmp_path / "p"
    project.mkdir()
    try:
        up = dbguard("up", "--json", env=env)
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["started"] is True and info["broker"] == env["DBGUARD_BROKER"]
        # The status page, on loopback: it answers, and needs no token there.
        assert info["page"].startswith("http://127.0.0.1:") and "token" not in info["page"]
        with urllib.request.urlopen(info["page"] + "api/site", timeout=10) as page:
            assert page.status == 200
        assert json.loads(dbguard("up", "--json", env=env).stdout)["started"] is False  # idempotent
        assert dbguard("acquire", str(project), env=env).returncode == 0
        assert dbguard("release", str(project), env=env).returncode == 0
    finally:
        down = dbguard("down", "--json", env=env)
    assert down.returncode == 0, down.stderr
    assert set(json.loads(down.stdout)["stopped"]) == {"agent", "page", "broker"}
    assert dbguard("status", str(project), env=env).returncode == 4


def test_every_command_has_help(env: dict[str, str]) -> None:
    commands = ["broker", "agent", "up", "down", "init", "acquire", "release", "status", "break"]
    for name in commands:
        result = dbguard(name, "--help", env=env)
        assert result.returncode == 0 and "Usage" in result.stdout, name


def test_settings_come_from_options_then_environment_then_user_then_system_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc" / "config.toml"
    system.parent.mkdir()
    system.write_text('ttl = 11\nlock_delay = 2\nbroker = "tcp://system:1"\n')
    user = tmp_path / "home" / "dbguard" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('ttl = 12\nbroker = "tcp://user:1"\n')
    monkeypatch.setattr(settings, "SYSTEM_CONFIG", system)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    loaded = settings.load(environ={"DBGUARD_BROKER": "tcp://env:1"})
    assert (loaded.ttl, loaded.lock_delay, loaded.broker) == (12.0, 2.0, "tcp://env:1")
    assert loaded.effective_grace == 12.0  # at least one TTL
    loaded = settings.load(
        {"broker": "tcp://option:1", "ttl": None}, environ={"DBGUARD_BROKER": "tcp://env:1"}
    )
    assert loaded.broker == "tcp://option:1" and loaded.ttl == 12.0


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("tll = 3\n", "unknown setting"), ("ttl = 'soon'\n", "number of seconds"), ("ttl = [\n", "cannot read")],
)
def test_a_bad_config_file_is_named_with_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, complaint: str
) -> None:
    user = tmp_path / "dbguard" / "config.toml"
    user.parent.mkdir()
    user.write_text(text)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    with pytest.raises(UsageError, match=complaint) as caught:
        settings.load(environ={})
    assert str(user) in str(caught.value)


def test_bad_environment_values_are_usage_errors(env: dict[str, str]) -> None:
    env["DBGUARD_TTL"] = "-1"
    result = dbguard("status", env=env)
    assert result.returncode == 2 and "DBGUARD_TTL" in result.stderr
    env["DBGUARD_TTL"] = "30"
    env["DBGUARD_BROKER"] = "broker.example:7390"
    result = dbguard("status", env=env)
    assert result.returncode == 2 and "tcp://host:port" in result.stderr


def test_a_cache_path_too_long_for_the_agents_socket_is_refused_at_once(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    result = subprocess.run(
        [sys.executable, "-m", "dbguard", "recover"],
        env={**os.environ, "DBGUARD_CACHE": str(deep), "DBGUARD_BROKER": "tcp://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 5 and "too long a path for the agent's socket" in result.stderr


def test_errors_pickle_with_their_data() -> None:
    import pickle

    error = LeaseHeld("held by x", holder={"host": "x"})
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, LeaseHeld) and copy.holder == {"host": "x"} and str(copy) == "held by x"
    assert copy.exit_code == 3


def test_two_agents_of_one_host_with_different_caches_do_not_share_a_lease(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a = hosts["a"]
    assert a.run("acquire", str(project)).returncode == 0
    second = Host("host-a", tmp_path / "c2", a.broker)  # same hostname, other cache
    try:
        refused = second.run("acquire", str(project))
        assert refused.returncode == 3, refused.stderr
    finally:
        second.stop()
