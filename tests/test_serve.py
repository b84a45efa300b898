"""Cluster jobs: worker nodes read and write a project through the host that holds it
(`dbguard serve`, `dbguard.open(..., remote=True)`), on whole simulated hosts with their own
hostnames, caches and sshfs mounts of the share; and what happens when a worker, the holder's
agent or the holder's lease dies under them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil
import pytest
import zmq

from dbguard.cache import CacheStore
from dbguard.lease import keys
from tests.support import LOCK_DELAY, MakeSimHost, failed, sim_hosts
from tools.sshfs import sshfs_unavailable
from tools.testbed import BrokerProcess, Host, SimHost, namespaces_unavailable, wait_for

_WHY_NOT = namespaces_unavailable() or sshfs_unavailable()
if _WHY_NOT and os.environ.get("CI") != "true":
    pytestmark = pytest.mark.skip(
        reason=f"simulated hosts need namespaces and sshfs (run as root): {_WHY_NOT}"
    )

ANY_PORT = "tcp://127.0.0.1:0"  # the simulated hosts share the network: loopback reaches the holder
# Long enough that a killed agent is back before its lease expires (the lease stays held).
SERVE_TTL = 4.0


@pytest.fixture
def serve_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path / "broker-state", ttl=SERVE_TTL, lock_delay=LOCK_DELAY)
    process.start()
    yield process
    process.stop()
    if failed(request):
        print(f"\n----- broker log -----\n{process.log()}")


@pytest.fixture
def make_host(
    tmp_path: Path, serve_broker: BrokerProcess, shared: Path, request: pytest.FixtureRequest
) -> Iterator[MakeSimHost]:
    with sim_hosts(tmp_path, serve_broker, shared, request) as make:
        yield make


def run_json(host: SimHost, *args: str) -> Any:
    result = host.run(*args, "--json")
    assert result.returncode == 0, f"dbguard {' '.join(args)} on {host.name}: {result.stderr}"
    return json.loads(result.stdout)


def holder_serving(a: SimHost) -> str:
    """A initialises the project, acquires it and serves it; returns where."""
    run_json(a, "init")
    lease = run_json(a, "acquire", "--serve", "--address", ANY_PORT)
    assert lease["serve"].startswith("tcp://127.0.0.1:")
    return str(lease["serve"])


def worker_script(
    project: Path, worker: str, count: int, *, shape: tuple[int, ...] = (64, 64), opt_in: str = "remote=True"
) -> str:
    """Appends ``count`` records through the holder, half one by one and half pipelined, each
    filled with a value that names it and with attrs that say who wrote it; prints the indices.
    ``opt_in`` is how it asks to go through the holder ("" when the host's settings say so)."""
    return textwrap.dedent(
        f"""
        import json, numpy as np, dbguard
        worker, count, shape = {worker!r}, {count}, {shape!r}
        def value(i):
            return (hash(worker) % 1000) * 100000 + i
        with dbguard.open({str(project)!r}, "images", "a", {opt_in}) as db:
            assert type(db).__name__ == "RemoteDB", type(db)
            indices = [db.append(np.full(shape, value(i), np.float64), {{"worker": worker, "i": i}})
                       for i in range(count // 2)]
            rest = range(count // 2, count)
            indices += db.extend((np.full(shape, value(i), np.float64) for i in rest),
                                 ({{"worker": worker, "i": i}} for i in rest))
        print(json.dumps(indices))
        """
    )


def read_everything(host: SimHost, *, remote: bool) -> list[dict[str, Any]]:
    """Every record of "images" as ``host`` reads it: its attrs, and whether it is filled whole
    with one value (and which)."""
    code = textwrap.dedent(
        f"""
        import json, numpy as np, dbguard
        out = []
        with dbguard.open({str(host.project)!r}, "images", "r", remote={remote}) as db:
            for i, array in enumerate(db):
                first = float(array.flat[0])
                out.append({{"index": i, "attrs": db.attrs(i), "value": first,
                             "whole": bool((array == first).all()), "shape": list(array.shape)}})
        print(json.dumps(out))
        """
    )
    result = host.python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    records: list[dict[str, Any]] = json.loads(result.stdout)
    return records


def check_records(records: list[dict[str, Any]], workers: dict[str, int]) -> None:
    """Exactly ``count`` whole records of each worker, none twice, each with its own value."""
    seen: dict[tuple[str, int], float] = {}
    for record in records:
        assert record["whole"], f"record {record['index']} is not whole: {record}"
        key = (record["attrs"]["worker"], record["attrs"]["i"])
        assert key not in seen, f"record {key} landed twice"
        seen[key] = record["value"]
    assert sorted(seen) == sorted((w, i) for w, n in workers.items() for i in range(n))
    for worker in workers:
        values = [seen[(worker, i)] for i in range(workers[worker])]
        base = values[0]
        assert values == [base + i for i in range(workers[worker])], f"{worker}'s values are not its own"


def test_workers_on_two_hosts_write_through_the_holder_and_the_share_gets_exactly_their_records(
    make_host: MakeSimHost,
) -> None:
    a = make_host("node-a", "/mnt/a/proj")
    b = make_host("node-b", "/mnt/b/proj")
    c = make_host("node-c", "/mnt/c/proj", remote="1")  # DBGUARD_REMOTE=1, as in a job script
    head = make_host("head", "/mnt/h/proj")
    address = holder_serving(a)

    # Every host reads where A serves from the lease service.
    writer = run_json(head, "status")["projects"][0]["writer"]
    assert writer["host"] == "node-a" and writer["serve"] == address
    assert "serves   workers at " + address in head.run("status").stdout

    started = time.monotonic()
    workers = {
        "b": b.popen_python(worker_script(b.project, "b", 200)),
        "c": c.popen_python(worker_script(c.project, "c", 200, opt_in="")),
    }
    indices = {}
    for name, process in workers.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"worker {name}: {err[-3000:]}"
        indices[name] = json.loads(out)
    assert sorted(indices["b"] + indices["c"]) == list(range(400)), "each append got its own index"
    assert time.monotonic() - started < 120

    # Before any flush: a reader on B sees all 400 through A; the share has none of them.
    through_a = read_everything(b, remote=True)
    assert len(through_a) == 400
    check_records(through_a, {"b": 200, "c": 200})
    assert run_json(head, "ls", ".")["databases"] == []
    assert run_json(b, "ls", ".", "--remote")["databases"] == [{"name": "images", "count": 400}]
    records = run_json(c, "ls", ".", "images", "--remote")["records"]
    assert len(records) == 400 and records[0]["shape"] == [64, 64] and records[0]["dtype"] == "float64"

    # The head node without the opt-in cannot write, as before.
    refused = head.python(
        f"import numpy as np, dbguard\ndbguard.open({str(head.project)!r}, 'images', 'a').append(np.zeros(3))"
    )
    assert refused.returncode != 0 and "LeaseHeld" in refused.stderr and "node-a" in refused.stderr

    # A leaves: clear stops serving, flushes, checks and releases; the share has exactly the 400.
    cleared = run_json(a, "clear")
    assert cleared["flushed"]["records"] == 400
    browsed = read_everything(head, remote=False)
    assert len(browsed) == 400
    check_records(browsed, {"b": 200, "c": 200})
    assert [(r["attrs"], r["value"]) for r in browsed] == [(r["attrs"], r["value"]) for r in through_a]
    assert head.run("verify").returncode == 0

    # Nobody serves it now: a worker is told so, and how to fix it.
    late = b.python(worker_script(b.project, "b", 2))
    assert late.returncode != 0 and "NotServed" in late.stderr and "dbguard serve" in late.stderr


def test_a_worker_killed_mid_stream_leaves_whole_records_only(make_host: MakeSimHost) -> None:
    a, b = make_host("node-a", "/mnt/a/proj"), make_host("node-b", "/mnt/b/proj")
    holder_serving(a)
    # 4 MiB records, many in flight: the kill lands while frames are on the wire.
    streamer = b.popen_python(
        textwrap.dedent(
            f"""
            import numpy as np, dbguard, sys
            with dbguard.open({str(b.project)!r}, "images", "a", remote=True) as db:
                def records():
                    for i in range(100000):
                        yield np.full((1024, 1024), i, np.float32)
                        if i == 20:
                            print("streaming", flush=True)
                db.extend(records())
            """
        )
    )
    assert streamer.stdout is not None
    assert streamer.stdout.readline().strip() == "streaming", (
        streamer.stderr.read() if streamer.stderr else ""
    )
    time.sleep(0.3)
    streamer.send_signal(signal.SIGKILL)
    streamer.wait(10)

    records = read_everything(b, remote=True)
    assert len(records) >= 1
    assert all(r["whole"] and r["value"] == r["index"] for r in records), "a torn record arrived"
    cleared = run_json(a, "clear")
    assert cleared["flushed"]["records"] == len(records)
    assert a.run("verify").returncode == 0


def test_the_holders_agent_killed_mid_stream_workers_resume_and_nothing_lands_twice(
    make_host: MakeSimHost,
) -> None:
    a = make_host("node-a", "/mnt/a/proj")
    b = make_host("node-b", "/mnt/b/proj", serve_retry="30")
    holder_serving(a)
    worker = b.popen_python(worker_script(b.project, "b", 600, shape=(256, 256)))
    time.sleep(1.0)  # well into the stream
    a.kill_agent()  # its server dies with it (the kernel's parent-death signal)
    time.sleep(0.5)
    # The agent comes back (any command starts it): it reclaims the lease and serves again.
    assert a.run("status").returncode == 0
    started = time.monotonic()
    out, err = worker.communicate(timeout=90)
    assert worker.returncode == 0, f"the worker did not resume: {err[-3000:]}"
    assert time.monotonic() - started < 60
    indices = json.loads(out)
    assert sorted(indices) == list(range(600)), "an acknowledged append lost, or one landed twice"
    check_records(read_everything(b, remote=True), {"b": 600})
    assert "reclaimed the lease" in a.agent_log() or "reclaimed" in a.run("status").stdout


def streaming_worker(b: SimHost, *, side: int, streaming_after: int) -> subprocess.Popen[str]:
    """A worker on ``b`` appending through the holder until refused: it prints "streaming" after
    ``streaming_after`` acknowledged appends, then, when refused, how many were acknowledged,
    the error's class and message, and when."""
    return b.popen_python(
        textwrap.dedent(
            f"""
            import json, time, numpy as np, dbguard
            acked = 0
            try:
                with dbguard.open({str(b.project)!r}, "images", "a", remote=True) as db:
                    while True:
                        db.append(np.full(({side}, {side}), acked, np.float32))
                        acked += 1
                        if acked == {streaming_after}:
                            print("streaming", flush=True)
            except dbguard.GuardError as exc:
                print(json.dumps({{"acked": acked, "error": type(exc).__name__, "message": str(exc),
                                   "at": time.monotonic()}}), flush=True)
            """
        )
    )


def test_a_break_of_the_holders_lease_refuses_workers_and_keeps_its_data_aside(
    make_host: MakeSimHost,
) -> None:
    a, b = make_host("node-a", "/mnt/a/proj"), make_host("node-b", "/mnt/b/proj")
    head = make_host("head", "/mnt/h/proj")
    holder_serving(a)
    worker = streaming_worker(b, side=128, streaming_after=50)
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "streaming"
    broke = run_json(head, "break", ".", "--force")
    broken_at = time.monotonic()
    assert broke["broken"]["host"] == "node-a"
    out, err = worker.communicate(timeout=60)
    assert out, err[-3000:]
    ended = json.loads(out)
    assert ended["error"] == "LeaseLost", ended
    # Refused as soon as A hears of the break (its next renewal), not after serve_retry.
    assert ended["at"] - broken_at < SERVE_TTL + 5.0, ended
    # Everything A acknowledged is kept aside on A, never flushed over a new writer.
    assert wait_for(lambda: run_json(a, "recover")["aside"], timeout=15)
    aside = run_json(a, "recover")["aside"]
    assert len(aside) == 1 and aside[0]["dirty_bytes"] >= ended["acked"] * 128 * 128 * 4
    assert run_json(head, "ls", ".")["databases"] == []


def test_a_holder_that_dies_makes_workers_fail_fast_and_what_it_acknowledged_is_kept(
    make_host: MakeSimHost,
) -> None:
    a = make_host("node-a", "/mnt/a/proj")
    b = make_host("node-b", "/mnt/b/proj", serve_retry="600")  # the failure must not wait for it
    holder_serving(a)
    worker = streaming_worker(b, side=64, streaming_after=30)
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "streaming"
    a.crash()
    crashed_at = time.monotonic()
    out, err = worker.communicate(timeout=120)
    assert out, err[-3000:]
    ended = json.loads(out)
    # Orphaned once its lease expires: the worker hears so then, not after serve_retry.
    assert ended["error"] == "LeaseLost" and "orphaned" in ended["message"], ended
    assert ended["at"] - crashed_at < SERVE_TTL + 15, ended
    assert run_json(b, "status")["projects"][0]["state"] == "orphaned"
    # The holder comes back: its agent resumes the lease, and clear puts every acknowledged
    # record on the share.
    a.restart()
    cleared = run_json(a, "clear")
    assert cleared["flushed"]["records"] >= ended["acked"]
    records = read_everything(b, remote=False)
    assert len(records) >= ended["acked"]
    assert all(r["whole"] and r["value"] == r["index"] for r in records)


def test_with_keys_only_authorised_workers_get_through(
    tmp_path: Path, shared: Path, request: pytest.FixtureRequest
) -> None:
    """CURVE: the holder serves with its own key pair and lets through only the worker keys in
    its authorized/ directory; the broker authenticates everyone as before."""
    site = tmp_path / "keys"
    keys.init_broker(site / "broker")
    machines = {name: site / name for name in ("node-a", "node-b", "node-c")}
    for name, directory in machines.items():
        public = keys.init_client(directory)
        (directory / "broker.key").write_bytes((site / "broker" / "broker.key").read_bytes())
        keys.authorize(site / "broker", public, name)  # every machine may use the broker
    keys.authorize(machines["node-a"], machines["node-b"] / "client.key", "node-b")  # A lets B in
    broker = BrokerProcess(
        tmp_path / "state",
        ttl=SERVE_TTL,
        lock_delay=LOCK_DELAY,
        keys=site / "broker",
        client_keys=machines["node-a"],
    )
    broker.start()
    try:
        with sim_hosts(tmp_path, broker, shared, request) as make:
            hosts = {}
            for name in machines:
                host = hosts[name] = make(name, f"/mnt/{name}/proj", keys="/tmp/keys", serve_retry="5")
                # Each machine's keys directory in its own /tmp, which only it sees.
                target = host.tmp / "keys"
                for item in sorted(machines[name].rglob("*")):
                    destination = target / item.relative_to(machines[name])
                    if item.is_dir():
                        destination.mkdir(parents=True, exist_ok=True)
                    else:
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        destination.write_bytes(item.read_bytes())
                target.chmod(0o700)
            a, b, c = hosts["node-a"], hosts["node-b"], hosts["node-c"]
            holder_serving(a)
            assert run_json(b, "status")["projects"][0]["writer"]["serve_key"]
            allowed = b.python(worker_script(b.project, "b", 4))
            assert allowed.returncode == 0, allowed.stderr[-3000:]
            refused = c.python(worker_script(c.project, "c", 4))
            assert refused.returncode != 0
            assert "HolderUnreachable" in refused.stderr and "refused this machine's key" in refused.stderr
            assert len(read_everything(b, remote=True)) == 4
    finally:
        broker.stop()


def test_an_append_retried_with_its_id_lands_once(tmp_path: Path) -> None:
    """The cache half of idempotent appends: the key is kept in the record's own transaction."""
    store = CacheStore(tmp_path / "cache", "p")
    try:
        first = store.append("images", np.zeros(4, np.float32), b"", once=b"req-1")
        again = store.append("images", np.ones(4, np.float32), b"", once=b"req-1")
        other = store.append("images", np.ones(4, np.float32), b"", once=b"req-2")
        assert (first, again, other) == (0, 0, 1)
        assert store.count("images") == 2 and float(store.get("images", 0)[0]) == 0.0
        assert store.forget_once(time.time() + 1) == 2
        assert store.append("images", np.ones(4, np.float32), b"", once=b"req-1") == 2
    finally:
        store.close()


# ------------------------------------------------- one machine, two holders (no sshfs needed)


def serving_on(a: Host, project: Path) -> str:
    assert a.run("init", str(project)).returncode == 0
    served = a.run("acquire", str(project), "--serve", "--address", ANY_PORT, "--json")
    assert served.returncode == 0, served.stderr
    return str(json.loads(served.stdout)["serve"])


def test_the_server_answers_malformed_requests_and_keeps_serving(
    hosts: dict[str, Host], project: Path
) -> None:
    """Whatever a worker sends, the holder's server says what is wrong and carries on."""
    a = hosts["a"]
    address = serving_on(a, project)
    project_id = json.loads((project / ".dbguard" / "project.json").read_text())["id"]
    token = int(json.loads(a.run("status", str(project), "--json").stdout)["projects"][0]["writer"]["token"])
    context = zmq.Context.instance()
    worker = context.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(address)

    def ask(*frames: bytes) -> dict[str, Any]:
        worker.send_multipart(list(frames))
        assert worker.poll(10_000), "the server did not answer"
        reply: dict[str, Any] = json.loads(worker.recv_multipart()[0])
        return reply

    def header(**fields: Any) -> bytes:
        return json.dumps({"v": 1, "id": os.urandom(8).hex(), "project": project_id, **fields}).encode()

    record = {"db": "images", "token": token}
    bad = [
        (b"not json",),
        (json.dumps({"id": "x" * 500, "op": "hello"}).encode(),),
        (header(op="nonsense"),),
        (header(op="hello", project="someone-else"),),
        (header(op="append", **record, dtype="(2,)i4", shape=[3]), b"\0" * 24),
        (header(op="append", **record, dtype="<f4", shape=[0, 10**30]), b""),
        (header(op="append", **record, dtype="<f4", shape=[4]), b"\0" * 3),
        (header(op="append", **record, dtype="object", shape=[1]), b"\0" * 8),
        (header(op="append", db=["images"], token=token, dtype="<f4", shape=[1]), b"\0" * 4),
        (header(op="append", db="x" * 300, token=token, dtype="<f4", shape=[1]), b"\0" * 4),
        (header(op="put", **record, index=2**62, dtype="<f4", shape=[1]), b"\0" * 4),
        (header(op="get", **record, index="seven"),),
        (header(op="append", db="images", token=token + 1, dtype="<f4", shape=[1]), b"\0" * 4),
    ]
    for n, frames in enumerate(bad):
        reply = ask(*frames)
        assert reply["ok"] is False and reply["message"], (n, frames[0][-120:], reply)
    assert ask(header(op="put", **record, index=2**62, dtype="<f4", shape=[1]), b"\0" * 4)["error"] == "usage"
    good = ask(header(op="append", **record, dtype="<f4", shape=[2]), b"\0" * 8)
    assert good["ok"] and good["index"] == 0
    assert ask(header(op="count", **record))["count"] == 1
    worker.close()


def a_worker(a: Host, tmp_path: Path, **settings: str) -> Host:
    """Another host, whose settings make it a worker (its own hostname and cache)."""
    return Host("host-w", tmp_path / "hosts", a.broker, flush_interval="3600", **settings)


def test_a_silent_holder_still_named_makes_workers_fail_within_serve_retry(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], a_worker(hosts["a"], tmp_path, serve_retry="5")
    serving_on(a, project)
    agent_pid = a.agent_pid()
    assert agent_pid is not None
    (server,) = psutil.Process(agent_pid).children()  # the agent's server of this project
    server.suspend()  # alive, named in the lease service, answering nothing
    try:
        started = time.monotonic()
        stuck = b.python(
            f"import numpy as np, dbguard\nprint(dbguard.open({str(project)!r}, 'images', 'a', remote=True))",
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        server.resume()
    assert stuck.returncode != 0 and "HolderUnreachable" in stuck.stderr, (stuck.stdout, stuck.stderr[-2000:])
    assert took < 30, took  # serve_retry (5 s here) plus the request timeouts, never forever


def test_serve_stop_tells_workers_at_once_and_the_cli_follows_dbguard_remote(
    hosts: dict[str, Host], project: Path, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    job = a_worker(a, tmp_path, remote="1")  # DBGUARD_REMOTE=1, as a job script sets it
    serving_on(a, project)
    appended = b.python(
        f"import numpy as np, dbguard\n"
        f"with dbguard.open({str(project)!r}, 'images', 'a', remote=True) as db:\n"
        f"    db.extend([np.zeros(4, np.float32)] * 3)\n"
        f"    try:\n"
        f"        db[10] = np.zeros(4, np.float32)\n"
        f"    except dbguard.UsageError as exc:\n"
        f"        print('refused:', exc)"
    )
    assert appended.returncode == 0 and "past the end" in appended.stdout, appended.stderr
    live = job.run("ls", str(project), "--json")
    assert live.returncode == 0, live.stderr
    assert json.loads(live.stdout)["databases"] == [{"name": "images", "count": 3}]
    assert json.loads(b.run("ls", str(project), "--json").stdout)["databases"] == []  # the share: none yet
    assert a.run("serve", str(project), "--stop").returncode == 0
    started = time.monotonic()
    told = b.python(f"import dbguard\ndbguard.open({str(project)!r}, 'images', 'r', remote=True)")
    assert told.returncode != 0 and "NotServed" in told.stderr and "dbguard serve" in told.stderr
    assert time.monotonic() - started < 15
