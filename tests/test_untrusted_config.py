"""Input people type or edit by hand never crashes, escapes or locks out (issue 12): key files in
the broker's keys directory, `keys authorize` arguments, settings, a broker exposed without keys,
and requests for projects nobody was granted.

Real processes throughout: a real `dbguard broker`, the real `dbguard` command with DBGUARD_*
in its environment, a real etcd cluster for the etcd service.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dbguard.errors import BrokerUnavailable, UsageError
from dbguard.lease import broker as broker_module
from dbguard.lease import keys
from dbguard.lease.client import Client
from dbguard.lease.etcd import EtcdLeases, configure
from dbguard.lease.rules import Timing
from dbguard.lease.store import LmdbLeaseStore
from tests.support import LOCK_DELAY, TTL
from tools.testbed import BrokerProcess, EtcdBackend, free_port

HOLDER = {"host": "ws1", "user": "u", "agent": "a", "cache": "/c"}


def dbguard(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbguard", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for the command: its own cache, state and config directories."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("DBGUARD_")}
    return {
        **base,
        # Not tmp_path / "cache": `python -m dbguard` run there would import it as the package.
        "DBGUARD_CACHE": str(tmp_path / "dbguard-cache"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "DBGUARD_REQUEST_TIMEOUT": "2",
    }


# ------------------------------------------------- damaged files among the authorised keys


def _client_dir(root: Path, broker_dir: Path, name: str, *, authorized: bool, operator: bool = False) -> Path:
    directory = root / name
    public = keys.init_client(directory)
    shutil.copyfile(broker_dir / "broker.key", directory / "broker.key")
    if authorized:
        keys.authorize(broker_dir, public, name, operator=operator)
    return directory


def _damage(directory: Path) -> list[Path]:
    """Every kind of bad file a hand-edited keys directory has been seen to hold."""
    bad = {
        "garbage.key": b"hello\n",
        "no-equals.key": b"metadata\ncurve\n    public-key\n",  # zmq's own reader: IndexError
        "short.key": b'curve\n    public-key = "abc"\n',
        "not-z85.key": b'curve\n    public-key = "' + b"~" * 40 + b'"\n',
        "binary.key": b"\xff\xfe\x00public-key = \xff\xff\n",
        "empty.key": b"",
    }
    made = []
    for name, data in bad.items():
        (directory / name).write_bytes(data)
        made.append(directory / name)
    (directory / "a-directory.key").mkdir()
    os.mkfifo(directory / "a-fifo.key")  # opening it would block the authentication thread
    made += [directory / "a-directory.key", directory / "a-fifo.key"]
    return made


@pytest.fixture
def damaged_site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    broker_dir = tmp_path / "broker-keys"
    keys.init_broker(broker_dir)
    site: dict[str, Any] = {
        "broker": broker_dir,
        "ws1": _client_dir(tmp_path, broker_dir, "ws1", authorized=True),
        "admin": _client_dir(tmp_path, broker_dir, "admin", authorized=True, operator=True),
        "intruder": _client_dir(tmp_path, broker_dir, "intruder", authorized=False),
    }
    site["bad"] = _damage(broker_dir / "authorized") + _damage(broker_dir / "operators")
    process = BrokerProcess(
        tmp_path / "state", ttl=TTL, lock_delay=LOCK_DELAY, keys=broker_dir, client_keys=site["ws1"]
    )
    site["process"] = process
    process.start()
    yield site
    process.stop()


def test_damaged_key_files_are_skipped_and_named_while_every_good_key_works_and_sigterm_stops_the_broker(
    damaged_site: dict[str, Any], env: dict[str, str], tmp_path: Path
) -> None:
    process: BrokerProcess = damaged_site["process"]
    env["DBGUARD_BROKER"] = process.address
    project = tmp_path / "project"
    project.mkdir()

    def run(*args: str, who: str) -> subprocess.CompletedProcess[str]:
        return dbguard(*args, env={**env, "DBGUARD_KEYS": str(damaged_site[who])})

    try:
        # Before: the first handshake killed the authentication thread; every client got exit 4.
        status = run("status", who="ws1")
        assert status.returncode == 0, status.stderr
        assert run("init", str(project), who="ws1").returncode == 0
        acquired = run("acquire", str(project), "--json", who="ws1")
        assert acquired.returncode == 0, acquired.stderr
        assert json.loads(acquired.stdout)["token"] == 1
        # operators/ holds the same damage: the operator key still breaks leases.
        broken = run("break", str(project), "--force", who="admin")
        assert broken.returncode == 0, broken.stderr
        assert "broke the lease of" in broken.stdout
        refused = run("status", who="intruder")
        assert refused.returncode == 4 and "refused this machine's key" in refused.stderr
        assert run("status", who="ws1").returncode == 0  # and the broker still serves after that
    finally:
        run("down", who="ws1")

    log = process.log()
    assert "Traceback" not in log, log
    for path in damaged_site["bad"]:
        assert f"skipped the key file {path}" in log, (path, log)
    assert "or remove it" in log and "dbguard keys authorize" in log
    # Each damaged file is reported once, not at every handshake.
    assert log.count(f"skipped the key file {damaged_site['bad'][0]}") == 1

    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(10) == 0, "the broker must stop on SIGTERM"


def test_a_secret_key_among_the_authorised_keys_is_accepted_by_its_public_part_and_reported(
    tmp_path: Path,
) -> None:
    broker_dir = tmp_path / "broker-keys"
    keys.init_broker(broker_dir)
    ws1 = _client_dir(tmp_path, broker_dir, "ws1", authorized=False)
    shutil.copyfile(ws1 / "client.key_secret", broker_dir / "authorized" / "ws1.key")
    site = keys.broker_keys(broker_dir)
    assert site.authorized() == {keys.client_keys(ws1).public}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread we kill
def test_the_broker_restarts_a_dead_authentication_thread_and_still_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker_dir = tmp_path / "broker-keys"
    keys.init_broker(broker_dir)
    ws1 = _client_dir(tmp_path, broker_dir, "ws1", authorized=True)
    original = keys.AcceptKnownKeys.callback
    calls = []

    def dies_once(self: keys.AcceptKnownKeys, domain: str, key: bytes) -> bool:
        calls.append(key)
        if len(calls) == 1:
            raise SystemExit  # what no `except Exception` catches: the ZAP thread ends
        return original(self, domain, key)

    monkeypatch.setattr(keys.AcceptKnownKeys, "callback", dies_once)
    server = broker_module.Broker(
        "tcp://127.0.0.1:*",
        LmdbLeaseStore(tmp_path / "state"),
        Timing(TTL, LOCK_DELAY, TTL),
        keys.broker_keys(broker_dir),
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        served = None
        deadline = time.monotonic() + 20
        while served is None and time.monotonic() < deadline:
            with Client(server.bound_address, timeout=1.0, attempts=1, keys=keys.client_keys(ws1)) as client:
                try:
                    served = client.call_ok("hello")
                except BrokerUnavailable:
                    continue
        assert served is not None and served["authenticated"] is True
        assert len(calls) >= 2, "the first handshake must have met the dying callback"
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive(), "the broker must stop even after its authentication thread died"


# ----------------------------------------------------------------------- keys authorize


@pytest.fixture
def key_dirs(tmp_path: Path) -> dict[str, Path]:
    broker_dir = tmp_path / "site" / "keys"
    keys.init_broker(broker_dir)
    client_dir = tmp_path / "ws1"
    keys.init_client(client_dir)
    return {"broker": broker_dir, "client": client_dir}


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def test_authorize_refuses_a_secret_key_and_copies_nothing(
    key_dirs: dict[str, Path], env: dict[str, str], tmp_path: Path
) -> None:
    before = _files_under(tmp_path)
    for secret in (key_dirs["client"] / "client.key_secret", key_dirs["broker"] / "broker.key_secret"):
        result = dbguard(
            "keys", "authorize", str(secret), "--name", "ws1", "--dir", str(key_dirs["broker"]), env=env
        )
        assert result.returncode == 2, result.stderr
        assert "holds a secret key" in result.stderr and "pass the public key file" in result.stderr
        assert secret.name.removesuffix("_secret") in result.stderr
    assert _files_under(tmp_path) == before
    assert list((key_dirs["broker"] / "authorized").iterdir()) == []


@pytest.mark.parametrize(
    "name",
    ["../../../../x", "../x", "a/b", "/tmp/x", ".hidden", "..", ".", "", "x\x01", "é", "a" * 101, "-rf"],
)
def test_authorize_refuses_a_name_that_is_not_a_plain_name(
    key_dirs: dict[str, Path], env: dict[str, str], tmp_path: Path, name: str
) -> None:
    before = _files_under(tmp_path)
    # Where the name would have led: tmp_path's parent for the first, /tmp/x.key for another.
    escaped = Path(os.path.normpath(key_dirs["broker"] / "authorized" / f"{name}.key"))
    existed = escaped.exists()
    public = key_dirs["client"] / "client.key"
    result = dbguard(
        "keys", "authorize", str(public), f"--name={name}", "--dir", str(key_dirs["broker"]), env=env
    )
    assert result.returncode == 2, result.stderr
    assert "plain name" in result.stderr and "letters, digits" in result.stderr, result.stderr
    assert _files_under(tmp_path) == before, "nothing may be written, inside the keys directory or out"
    assert escaped.exists() == existed, f"{escaped} was written"


def test_authorize_writes_a_world_readable_public_key_under_a_plain_name(
    key_dirs: dict[str, Path], env: dict[str, str]
) -> None:
    public = key_dirs["client"] / "client.key"
    done = dbguard(
        "keys", "authorize", str(public), "--name", "ws1.lab-2_a", "--dir", str(key_dirs["broker"]), env=env
    )
    assert done.returncode == 0, done.stderr
    target = key_dirs["broker"] / "authorized" / "ws1.lab-2_a.key"
    assert target.read_bytes() == public.read_bytes()
    assert keys.read_certificate(target)[1] is None


def test_authorize_refuses_a_symlinked_target_that_leads_out(
    key_dirs: dict[str, Path], env: dict[str, str], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.key"
    (key_dirs["broker"] / "authorized" / "ws1.key").symlink_to(outside)
    result = dbguard(
        "keys",
        "authorize",
        str(key_dirs["client"] / "client.key"),
        "--name",
        "ws1",
        "--dir",
        str(key_dirs["broker"]),
        env=env,
    )
    assert result.returncode == 2 and "leads outside" in result.stderr, result.stderr
    assert not outside.exists()


# ------------------------------------------------------------------------------ settings


BAD_NUMBERS = [
    ("ttl", "nan", "nan", "0.1 to 86400"),
    ("ttl", "inf", "inf", "0.1 to 86400"),
    ("ttl", "true", "true", "0.1 to 86400"),
    ("ttl", "1e308", "1e308", "0.1 to 86400"),
    ("ttl", "0", "0", "0.1 to 86400"),
    ("ttl", "-1", "-1", "0.1 to 86400"),
    ("lock_delay", "nan", "nan", "0 to 86400"),
    ("lock_delay", "100000", "100000", "0 to 86400"),
    ("grace", "inf", "inf", "0 to 86400"),
    ("flush_interval", "0", "0", "0.1 to 2.592e+06"),
    ("flush_interval", "-inf", "-inf", "0.1 to 2.592e+06"),
    ("retire_delay", "nan", "nan", "0 to 2.592e+06"),
    ("request_timeout", "0", "0", "0.1 to 3600"),
    ("request_timeout", "nan", "nan", "0.1 to 3600"),
]


@pytest.mark.parametrize(("name", "toml", "text", "bounds"), BAD_NUMBERS)
def test_a_bad_number_in_the_config_file_is_a_usage_error_naming_the_bounds(
    env: dict[str, str], tmp_path: Path, name: str, toml: str, text: str, bounds: str
) -> None:
    config = Path(env["XDG_CONFIG_HOME"]) / "dbguard" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f"{name} = {toml}\n")  # TOML spells nan, inf and true bare
    result = dbguard("status", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr and f"'{name}'" in result.stderr
    assert bounds in result.stderr and "seconds" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("name", "toml", "text", "bounds"), BAD_NUMBERS)
def test_a_bad_number_in_the_environment_is_a_usage_error_naming_the_bounds(
    env: dict[str, str], tmp_path: Path, name: str, toml: str, text: str, bounds: str
) -> None:
    variable = f"DBGUARD_{name.upper()}"
    result = dbguard("status", env={**env, variable: text}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr and bounds in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("option", "value", "bounds"),
    [
        ("--ttl", "nan", "0.1 to 86400"),
        ("--ttl", "inf", "0.1 to 86400"),
        ("--ttl", "1e308", "0.1 to 86400"),
        ("--ttl", "0", "0.1 to 86400"),
        ("--ttl", "1e-9", "0.1 to 86400"),
        ("--lock-delay", "nan", "0 to 86400"),
        ("--lock-delay", "-inf", "0 to 86400"),
        ("--grace", "1e308", "0 to 86400"),
    ],
)
def test_a_bad_number_on_the_command_line_is_refused_before_a_broker_starts(
    env: dict[str, str], tmp_path: Path, option: str, value: str, bounds: str
) -> None:
    ready = tmp_path / "ready"
    result = dbguard(
        "broker",
        "--address",
        f"tcp://127.0.0.1:{free_port()}",
        "--state",
        str(tmp_path / "state"),
        f"{option}={value}",
        "--ready-file",
        str(ready),
        env=env,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert option in result.stderr and bounds in result.stderr, result.stderr
    assert not ready.exists(), "the broker must not start"
    if option == "--ttl":  # every command takes --ttl
        status = dbguard("status", f"--ttl={value}", env=env, cwd=tmp_path)
        assert status.returncode == 2 and "--ttl" in status.stderr and bounds in status.stderr


def test_a_string_path_setting_with_a_nul_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    config = Path(env["XDG_CONFIG_HOME"]) / "dbguard" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('state = "/tmp/a\\u0000b"\n')
    env.pop("DBGUARD_CACHE")
    result = dbguard("status", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "NUL" in result.stderr and str(config) in result.stderr, result.stderr


# ----------------------------------------------------------- a broker open to the network


def _start_broker(env: dict[str, str], tmp_path: Path, address: str) -> tuple[subprocess.Popen[bytes], Path]:
    ready = tmp_path / "ready"
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dbguard",
                "broker",
                "--address",
                address,
                "--state",
                str(tmp_path / "s"),
                "--ready-file",
                str(ready),
            ],
            env=env,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 15
    while not ready.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return process, log


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_a_broker_on_every_interface_without_keys_warns_and_status_says_it_is_unauthenticated(
    env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    process, log = _start_broker(env, tmp_path, f"tcp://0.0.0.0:{port}")
    try:
        warning = log.read_text()
        assert "warning" in warning and "without keys" in warning, warning
        assert "anyone who can reach that port can take, renew or break any lease" in warning
        assert "dbguard keys init-broker" in warning and "DBGUARD_KEYS" in warning
        # A client on this machine connects over loopback; the broker says where it listens.
        env["DBGUARD_BROKER"] = f"tcp://127.0.0.1:{port}"
        status = dbguard("status", env=env, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert "unauthenticated" in status.stdout and "take or break leases" in status.stdout
        assert "dbguard keys" in status.stdout
        shown = dbguard("status", "--json", env=env, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["authenticated"] is False and data["exposed"] is True
    finally:
        _stop(process)


def test_up_on_every_interface_without_keys_warns(env: dict[str, str], tmp_path: Path) -> None:
    env["DBGUARD_BROKER"] = f"tcp://0.0.0.0:{free_port()}"
    try:
        up = dbguard("up", env=env, cwd=tmp_path)
        assert up.returncode == 0, up.stderr
        assert "warning" in up.stderr and "without keys" in up.stderr and "dbguard keys" in up.stderr
    finally:
        dbguard("down", env=env, cwd=tmp_path)


def test_a_broker_on_loopback_or_with_keys_does_not_warn(
    broker: BrokerProcess, env: dict[str, str], tmp_path: Path
) -> None:
    env["DBGUARD_BROKER"] = broker.address
    assert "warning" not in broker.log()
    status = dbguard("status", env=env, cwd=tmp_path)
    assert status.returncode == 0 and "unauthenticated" not in status.stdout, status.stdout
    data = json.loads(dbguard("status", "--json", env=env, cwd=tmp_path).stdout)
    assert data["authenticated"] is False and data["exposed"] is False

    broker_dir = tmp_path / "broker-keys"
    keys.init_broker(broker_dir)
    ws1 = _client_dir(tmp_path, broker_dir, "ws1", authorized=True)
    secured = {**env, "DBGUARD_KEYS": str(broker_dir)}
    port = free_port()
    process, log = _start_broker(secured, tmp_path, f"tcp://0.0.0.0:{port}")
    try:
        assert "warning" not in log.read_text()
        client = {**env, "DBGUARD_KEYS": str(ws1), "DBGUARD_BROKER": f"tcp://127.0.0.1:{port}"}
        data = json.loads(dbguard("status", "--json", env=client, cwd=tmp_path).stdout)
        assert data["authenticated"] is True and data["exposed"] is True
        assert "unauthenticated" not in dbguard("status", env=client, cwd=tmp_path).stdout
    finally:
        _stop(process)


def test_keys_helpers_tell_loopback_from_the_network() -> None:
    for address in (
        "tcp://127.0.0.1:1",
        "tcp://127.3.4.5:1",
        "tcp://localhost:1",
        "tcp://[::1]:1",
        "ipc:///x",
    ):
        assert keys.is_loopback(address), address
        assert keys.exposure_warning(address) is None
    for address in ("tcp://0.0.0.0:1", "tcp://*:1", "tcp://[::]:1", "tcp://10.1.2.3:1", "tcp://eth0:1"):
        assert not keys.is_loopback(address), address
        assert "dbguard keys" in (keys.exposure_warning(address) or "")


# ------------------------------------------------ requests for projects never granted


def test_requests_for_projects_never_granted_leave_nothing_in_the_lease_table(
    broker: BrokerProcess, env: dict[str, str], tmp_path: Path
) -> None:
    with broker.client() as client:
        for n in range(20):
            project = f"never-{n}"
            client.call_ok("release", project=project, holder=HOLDER, token=n)
            client.call_ok("release", project=project, holder=HOLDER, mode="read")
            client.call_ok("leave-queue", project=project, holder=HOLDER)
            leases = [{"project": project, "token": n, "unflushed": 0}]
            assert client.call_ok("renew", holder=HOLDER, leases=leases)["results"][0]["ok"] is False
            assert client.call("mark", project=project, holder=HOLDER, token=n, dirty=True)["error"] == "lost"
            assert client.call_ok("break", project=project, force=True)["broken"] is None
            assert client.call_ok("status", project=project)["projects"][0]["known"] is False
        # A read lease and a queue place are remembered while they last, and not after.
        client.call_ok("acquire", project="read-only", holder=HOLDER, mode="read")
        client.call_ok("acquire", project="kept", holder=HOLDER)
        other = {**HOLDER, "host": "ws2"}
        assert client.call_ok("acquire", project="kept", holder=other, wait=True)["status"] == "queued"
        client.call_ok("release", project="kept", holder=HOLDER, token=1)
        assert sorted(p["project"] for p in client.call_ok("status")["projects"]) == ["kept", "read-only"]
        assert client.call_ok("hello")["projects"] == 2
    time.sleep(TTL + 0.3)  # the read lease and the queue place lapse

    env["DBGUARD_BROKER"] = broker.address
    listed = dbguard("status", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [p["project"] for p in json.loads(listed.stdout)["projects"]] == ["kept"]
    # On disk: only the project that was granted, which keeps its fencing floor.
    broker.stop()
    store = LmdbLeaseStore(broker.state_dir)
    try:
        records = store.load()
    finally:
        store.close()
    assert [(r["project"], r["last_token"]) for r in records] == [("kept", 1)]
    broker.start()
    shown = dbguard("status", env=env, cwd=tmp_path)
    assert shown.returncode == 0 and "project kept" in shown.stdout and "never-" not in shown.stdout


def test_a_junk_record_in_an_old_broker_state_is_neither_loaded_nor_kept(tmp_path: Path) -> None:
    store = LmdbLeaseStore(tmp_path / "state")
    junk = {"project": "junk", "last_token": 0, "state": "free", "writer": None, "loss": None}
    granted = {**junk, "project": "granted", "last_token": 3}
    store.save([junk, granted], sync=True)
    assert [r["project"] for r in store.load()] == ["granted"]
    store.close()


def _etcd_writes(leases: EtcdLeases) -> tuple[int, list[str]]:
    """The raft index of the member answering (every transaction is a log entry on every member)
    and the keys under this test's prefix."""
    status = leases.transport.post("/maintenance/status", {})
    kvs, _ = leases.transport.range_prefix(leases.root)
    return int(status["raftIndex"]), sorted(protocol_key(kv["key"]) for kv in kvs)


def protocol_key(value: str) -> str:
    return base64.b64decode(value).decode()


@pytest.mark.slow
def test_etcd_writes_nothing_for_releases_of_projects_never_granted(etcd_backend: EtcdBackend) -> None:
    with EtcdLeases(etcd_backend.address) as leases:
        leases.call_ok("status")  # reads the site's timing once
        before = _etcd_writes(leases)
        for n in range(5):
            project = f"never-{n}"
            assert leases.call_ok("release", project=project, holder=HOLDER, token=n)["held"] is False
            leases.call_ok("release", project=project, holder=HOLDER, mode="read")
            leases.call_ok("leave-queue", project=project, holder=HOLDER)
            assert leases.call_ok("status", project=project)["projects"][0]["known"] is False
        assert _etcd_writes(leases) == before
        assert leases.call_ok("status")["projects"] == []
        # What is there is still removed: a queue place, a read lease.
        leases.call_ok("acquire", project="p", holder=HOLDER)
        other = {**HOLDER, "host": "ws2"}
        assert leases.call_ok("acquire", project="p", holder=other, wait=True)["status"] == "queued"
        leases.call_ok("leave-queue", project="p", holder=other)
        leases.call_ok("acquire", project="p", holder=other, mode="read")
        leases.call_ok("release", project="p", holder=other, mode="read")
        status = leases.call_ok("status", project="p")["projects"][0]
        assert status["queue"] == [] and status["readers"] == []


# ------------------------------------------------------- found while auditing the same reads


def test_up_works_from_a_directory_that_holds_a_python_module_named_like_a_dependency(
    env: dict[str, str], tmp_path: Path
) -> None:
    # A project directory with its own cache.py: `python -m dbguard` started from there (the
    # broker `up` starts, the agent every command starts) imported it instead of dbguard's own.
    project = tmp_path / "project"
    project.mkdir()
    (project / "cache.py").write_text("raise SystemExit('the wrong cache module')\n")
    command = str(Path(sys.executable).parent / "dbguard")
    env["DBGUARD_BROKER"] = f"tcp://127.0.0.1:{free_port()}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command, *args], env=env, cwd=project, capture_output=True, text=True, timeout=60, check=False
        )

    try:
        up = run("up")
        assert up.returncode == 0, up.stderr
        assert run("init", ".").returncode == 0
        acquired = run("acquire")
        assert acquired.returncode == 0 and "acquired" in acquired.stdout, acquired.stderr
    finally:
        down = run("down")
    assert down.returncode == 0 and "agent, page, broker" in down.stdout, down.stdout + down.stderr


def test_down_never_signals_a_process_a_stale_or_damaged_pid_file_names(
    env: dict[str, str], tmp_path: Path
) -> None:
    state = Path(env["XDG_STATE_HOME"]) / "dbguard" / "broker"
    state.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        for text in (f"{bystander.pid}\n", "garbage\n", "\n", "-1\n", "99999999999999999999\n"):
            (state / "broker.pid").write_text(text)
            down = dbguard("down", env=env, cwd=tmp_path)
            assert down.returncode == 0, down.stderr
            assert "nothing" in down.stdout and not (state / "broker.pid").exists()
            assert bystander.poll() is None, "down killed a process that is not its broker"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_damaged_client_key_is_a_usage_error_naming_the_file(
    env: dict[str, str], tmp_path: Path, broker: BrokerProcess
) -> None:
    broker_dir = tmp_path / "broker-keys"
    keys.init_broker(broker_dir)
    ws1 = _client_dir(tmp_path, broker_dir, "ws1", authorized=True)
    secret = ws1 / "client.key_secret"
    secret.write_text(secret.read_text().replace('secret-key = "', 'secret-key = "~~~~~'))
    env.update(DBGUARD_KEYS=str(ws1), DBGUARD_BROKER=broker.address)
    result = dbguard("status", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert (
        str(secret) in result.stderr and "Z85 CURVE key" in result.stderr and "Traceback" not in result.stderr
    )


def test_a_damaged_leases_file_in_the_cache_does_not_stop_status(
    env: dict[str, str], tmp_path: Path, broker: BrokerProcess
) -> None:
    cache = Path(env["DBGUARD_CACHE"])
    env["DBGUARD_BROKER"] = broker.address
    assert dbguard("status", env=env, cwd=tmp_path).returncode == 0  # makes the cache directory
    for text in ('{"project": "x"}', "[1, 2]", "5", '["lost"]'):
        (cache / "leases.json").write_text(text)
        result = dbguard("status", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_damaged_site_timing_in_etcd_is_a_usage_error_naming_the_key(etcd_backend: EtcdBackend) -> None:
    configure(etcd_backend.address, ttl=math.nan, lock_delay=0.5)
    try:
        with EtcdLeases(etcd_backend.address) as leases, pytest.raises(UsageError) as refused:
            leases.call_ok("acquire", project="p", holder=HOLDER)
        message = str(refused.value)
        assert "'ttl'" in message and "0.1 to 86400" in message and "config" in message
        assert "dbguard up --etcd" in message
    finally:
        configure(etcd_backend.address, ttl=TTL, lock_delay=LOCK_DELAY)


@pytest.mark.parametrize(
    "record",
    [
        {"project": "p", "last_token": 1},  # no state
        {"project": "p", "last_token": 1, "state": "gone", "writer": None, "loss": None},
        {"project": "p", "last_token": "x", "state": "free", "writer": None, "loss": None},
        {"project": "p", "last_token": 1, "state": "held", "writer": {"token": 1}, "loss": None},
    ],
)
def test_a_damaged_record_in_the_broker_state_is_an_integrity_error_naming_the_directory(
    env: dict[str, str], tmp_path: Path, record: dict[str, Any]
) -> None:
    state = tmp_path / "broker-state"
    store = LmdbLeaseStore(state)
    store.save([record], sync=True)
    store.close()
    result = dbguard(
        "broker", "--address", f"tcp://127.0.0.1:{free_port()}", "--state", str(state), env=env, timeout=30
    )
    assert result.returncode == 6, result.stderr
    assert f"the broker state in {state} holds a damaged lease record" in result.stderr
    assert "move that directory aside" in result.stderr and "Traceback" not in result.stderr
