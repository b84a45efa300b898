"""Every request of the lease service, typed: encoded, decoded and dispatched on both services.

The same script of requests runs on the embedded broker (its request path in this process, on
a real LMDB store) and on a real etcd cluster (through `EtcdLeases.send`, which encodes and
decodes each request as the broker would), and both must answer each request alike.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest

from dbguard.lease import protocol, requests
from dbguard.lease.broker import Broker
from dbguard.lease.etcd import EtcdLeases
from dbguard.lease.protocol import Op, ProtocolError
from dbguard.lease.rules import Holder, RenewItem, Timing
from dbguard.lease.store import LmdbLeaseStore
from tools.testbed import EtcdBackend

ANN = Holder("ws1", "ann", "agent-1", "/tmp/dbguard-ann")
BOB = Holder("ws2", "bob", "agent-2", "/tmp/dbguard-bob")


Step = tuple[Callable[[int], requests.Request], str]


def script(project: str) -> list[Step]:
    """Every request type, in an order where each one acts: a request (made from the token the
    last write grant gave, as a holder would) and the outcome both services must report ("ok",
    "granted", "queued" or an error kind)."""
    return [
        (lambda _: requests.Hello(), "ok"),
        (lambda _: requests.Acquire(project, ANN, unflushed=0), "granted"),
        (lambda _: requests.Acquire(project, BOB, wait=True), "queued"),
        (lambda _: requests.LeaveQueue(project, BOB), "ok"),
        (lambda _: requests.Acquire(project, BOB, mode="read"), "granted"),
        (lambda token: requests.Renew(ANN, (RenewItem(project, token, 0),)), "ok"),
        (lambda token: requests.Mark(project, ANN, token, dirty=True, unflushed=4096), "ok"),
        (lambda token: requests.Mark(project, ANN, token, dirty=False), "ok"),
        (lambda token: requests.Serve(project, ANN, token, "tcp://ann:7391", "k" * 40), "ok"),
        (lambda token: requests.Serve(project, ANN, token), "ok"),
        (lambda _: requests.Status(project), "ok"),
        (lambda _: requests.Status(), "ok"),
        (lambda _: requests.Acquire(project, BOB, floor=7), "held"),
        (lambda _: requests.Release(project, BOB, mode="read"), "ok"),
        (lambda token: requests.Release(project, ANN, token=token), "ok"),
        (lambda token: requests.Mark(project, ANN, token, dirty=True), "lost"),
        (lambda token: requests.Serve(project, ANN, token, "tcp://ann:7391"), "lost"),
        (lambda _: requests.Acquire(project, BOB, takeover=True, dirty=True), "granted"),
        (lambda _: requests.Break(project, force=False), "usage"),
        (lambda _: requests.Break(project, force=True, operator="admin"), "ok"),
        (
            lambda token: requests.Report(project, BOB, token, "flushed", bytes=10, records=1, seconds=0.5),
            "ok",
        ),
        (lambda _: requests.History(project, since=0.0, limit=5), "ok"),
        (lambda _: requests.History(), "ok"),
    ]


def run_script(project: str, send: Callable[[requests.Request], dict[str, Any]]) -> list[int]:
    """Run the script on one service, checking each outcome; the tokens of its write grants."""
    granted = [0]
    for make, expected in script(project):
        request = make(granted[-1])
        reply = send(request)
        assert outcome(reply) == expected, (request, reply)
        if expected == "granted" and isinstance(request, requests.Acquire) and request.mode == "write":
            granted.append(reply["token"])
    return granted[1:]


def test_the_script_covers_every_operation() -> None:
    covered = {type(make(1)) for make, _ in script("p")}
    assert covered == set(requests.REQUEST_TYPES.values())
    assert set(requests.REQUEST_TYPES) == set(Op)


def test_each_dataclass_has_the_fields_of_its_wire_schema_required_exactly_when_without_default() -> None:
    for op, cls in requests.REQUEST_TYPES.items():
        schema = protocol._SCHEMAS[op]
        declared = {field.name: field.default is MISSING for field in fields(cls)}
        assert declared == {name: required for name, (_, required) in schema.items()}, op


@pytest.mark.parametrize("request_", [make(1) for make, _ in script("p")], ids=repr)
def test_every_request_round_trips_through_encode_and_decode(request_: requests.Request) -> None:
    req_id, decoded = requests.decode(requests.encode(request_, "id-1"))
    assert (req_id, decoded) == ("id-1", request_)


def test_decoding_fills_in_every_default_and_refuses_what_the_protocol_refuses() -> None:
    frame = protocol.encode(protocol.request(Op.ACQUIRE, "id-2", project="p", holder=ANN.to_wire()))
    _, decoded = requests.decode(frame)
    assert decoded == requests.Acquire("p", ANN)
    assert isinstance(decoded, requests.Acquire)
    assert (decoded.mode, decoded.wait, decoded.floor, decoded.dirty) == ("write", False, 0, False)
    with pytest.raises(ProtocolError, match="principal"):
        # The principal is authenticated by the broker, never taken from a message.
        requests.decode(
            protocol.encode(protocol.request(Op.LEAVE_QUEUE, "id-3", project="p", holder=vars_of(ANN)))
        )
    with pytest.raises(ProtocolError, match="mode"):
        requests.decode(
            protocol.encode(
                protocol.request(Op.ACQUIRE, "id-4", project="p", holder=ANN.to_wire(), mode="rw")
            )
        )


def vars_of(holder: Holder) -> dict[str, Any]:
    return {field.name: getattr(holder, field.name) for field in fields(holder)} | {"principal": "key"}


def outcome(reply: dict[str, Any]) -> str:
    if not reply["ok"]:
        return str(reply["error"])
    return str(reply.get("status", "ok"))


@pytest.fixture
def broker_dispatch(tmp_path: Path) -> Iterator[Callable[[requests.Request], dict[str, Any]]]:
    """The broker's whole request path (decode, reply cache, dispatch, encode) in this process."""
    broker = Broker("tcp://127.0.0.1:0", LmdbLeaseStore(tmp_path / "state"), Timing(30.0, 0.0, 30.0))
    sent = iter(range(1, 1_000_000))

    def dispatch(request: requests.Request) -> dict[str, Any]:
        frame = requests.encode(request, f"broker-{next(sent)}")
        return protocol.decode(broker._answer(frame)[0], limit=None)

    yield dispatch
    broker.stop()
    broker.serve_forever()  # returns at once: persists, closes the socket and the store


def test_the_broker_dispatches_every_request_type(
    broker_dispatch: Callable[[requests.Request], dict[str, Any]],
) -> None:
    first, second = run_script("project-1", broker_dispatch)
    assert first < second


def test_the_etcd_service_dispatches_every_request_type_as_the_broker_does(etcd_backend: EtcdBackend) -> None:
    with EtcdLeases(etcd_backend.address, timeout=5.0) as etcd:
        # The token values differ (etcd counts from its own records); their order may not.
        first, second = run_script(f"project-{uuid.uuid4().hex[:8]}", etcd.send)
    assert first < second
