"""What only the embedded broker has: a grace period after its restart, and a socket of its own
that strangers can write garbage to. The lease rules both services share are in
tests/test_leases_e2e.py."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import zmq

from tests.support import TTL, acquire, project_state
from tools.testbed import BrokerProcess, Host


def test_grace_period_after_broker_restart_admits_only_existing_holders(
    hosts: dict[str, Host], project: Path, broker: BrokerProcess, tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    other = tmp_path / "shared" / "other"
    other.mkdir()
    token = acquire(a, project)["token"]
    assert b.run("init", str(other)).returncode == 0
    # A grace period that a command started on a loaded machine still falls inside.
    broker.grace = 8.0
    broker.kill()
    broker.start()
    started = time.monotonic()
    refused = b.run("acquire", str(other))  # free, but no new writer during the grace period
    assert time.monotonic() - started < broker.grace, "the test cannot tell: the command took too long"
    assert refused.returncode == 4, refused.stderr
    assert "grace" in refused.stderr or "restarted" in refused.stderr
    # a's agent keeps renewing through the restart: its lease survives, same token.
    time.sleep(TTL * 1.5)
    state = project_state(b, project)
    assert (
        state["state"] == "held" and state["writer"]["host"] == "host-a" and state["writer"]["token"] == token
    )
    time.sleep(max(0.0, started + broker.grace - time.monotonic()))
    acquire(b, other)  # after the grace period


def test_garbage_on_the_socket_does_not_stop_the_broker(
    hosts: dict[str, Host], project: Path, broker: BrokerProcess
) -> None:
    # Raw bytes that are not even ZeroMQ.
    for payload in (b"\x00" * 10, b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096)):
        with socket.create_connection(("127.0.0.1", broker.port)) as raw:
            raw.sendall(payload)
    # Well-framed ZeroMQ messages with bad contents; each gets an error reply.
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(broker.address)
    bad = [b"", b"{", b"[]", b'{"v":1}', b'{"v":99,"id":"x","op":"hello"}', b'{"v":1,"id":"y","op":"nope"}',
           b'{"v":1,"id":"z","op":"acquire","project":"p","holder":{"host":1}}', os.urandom(300)]  # fmt: skip
    for payload in bad:
        dealer.send(payload)
        assert dealer.poll(3000), f"no reply to {payload!r}"
        reply = json.loads(dealer.recv())
        assert reply["ok"] is False and reply["error"] in ("bad-request", "unsupported-version")
    dealer.close()
    assert broker.process is not None and broker.process.poll() is None
    acquire(hosts["a"], project)
