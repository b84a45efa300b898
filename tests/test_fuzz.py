"""The wire protocol under abuse: the decoder, and a real broker flooded with bad messages.

The decoder accepts exactly the documented schema and refuses everything else with
`ProtocolError`, never with another exception. A running broker, sent thousands of malformed,
truncated, oversized, wrong-version and replayed messages over raw ZeroMQ sockets, and garbage
over raw TCP, answers every message it reads with a typed refusal (or drops a peer whose message
is too large), answers a repeated request id with the very reply it gave the first time, and
meanwhile keeps serving a well-behaved client whose tokens keep increasing.

Hypothesis draws the messages. `SCHEMA` below is the oracle: the request format written out
from the protocol's documentation, independently of the code in `dbguard.lease.protocol`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from dbguard.lease import protocol
from dbguard.lease.client import Client
from tests.support import TTL
from tools.testbed import BrokerProcess

# ----------------------------------------------------------------- the oracle

VERSION = 1
MAX_ID = 64
MAX_TEXT = 4096
MAX_INT = 2**63 - 1
MAX_PROJECT_BYTES = 255  # project names are LMDB keys in the broker (at most 511 bytes)
MAX_LEASES = 10_000
ENVELOPE = {"v", "id", "op"}
HOLDER = {"host": "text", "user": "text", "agent": "text", "cache": "text"}
RENEW_ITEM = {"project": "project", "token": "int", "unflushed": "int"}
# op -> field -> (kind, required)
SCHEMA: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {},
    "acquire": {
        "project": ("project", True),
        "holder": ("holder", True),
        "mode": ("mode", False),
        "wait": ("bool", False),
        "takeover": ("bool", False),
        "floor": ("int", False),
        "unflushed": ("int", False),
    },
    "renew": {"holder": ("holder", True), "leases": ("leases", True)},
    "release": {
        "project": ("project", True),
        "holder": ("holder", True),
        "token": ("int", False),
        "mode": ("mode", False),
    },
    "leave-queue": {"project": ("project", True), "holder": ("holder", True)},
    "status": {"project": ("project", False)},
    "break": {"project": ("project", True), "force": ("bool", True), "operator": ("text", False)},
}
# What a malformed message may be answered with.
REFUSALS = {"bad-request", "unsupported-version"}


def is_text(value: Any, limit: int = MAX_TEXT) -> bool:
    """A JSON string that is 1 to ``limit`` characters of real Unicode (no lone surrogate)."""
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def fits(kind: str, value: Any) -> bool:
    if kind == "text":
        return is_text(value)
    if kind == "project":
        return is_text(value) and len(value.encode()) <= MAX_PROJECT_BYTES
    if kind == "int":  # true and false are not integers on this wire
        return type(value) is int and 0 <= value <= MAX_INT
    if kind == "bool":
        return type(value) is bool
    if kind == "mode":
        return isinstance(value, str) and value in ("write", "read")
    if kind == "holder":
        return is_flat(value, HOLDER)
    if kind == "leases":
        return (
            isinstance(value, list)
            and len(value) <= MAX_LEASES
            and all(is_flat(i, RENEW_ITEM) for i in value)
        )
    raise AssertionError(kind)


def is_flat(value: Any, fields: dict[str, str]) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == set(fields)
        and all(fits(kind, value[name]) for name, kind in fields.items())
    )


def conforms(message: Any) -> bool:
    """Whether a decoded JSON value is a request the broker must accept."""
    if not isinstance(message, dict):
        return False
    if not is_text(message.get("id"), MAX_ID):
        return False
    if type(message.get("v")) is not int or message["v"] != VERSION:
        return False
    op = message.get("op")
    if not isinstance(op, str) or op not in SCHEMA:
        return False
    fields = SCHEMA[op]
    if set(message) - set(fields) - ENVELOPE:
        return False
    for name, (kind, required) in fields.items():
        if name not in message:
            if required:
                return False
        elif not fits(kind, message[name]):
            return False
    return True


_UNREADABLE = object()


def parse(frame: bytes) -> Any:
    """The JSON value in a frame, or _UNREADABLE when it is too large or not JSON at all."""
    if len(frame) > protocol.MAX_MESSAGE_BYTES:
        return _UNREADABLE
    try:
        return json.loads(frame)
    except (ValueError, RecursionError):
        return _UNREADABLE


def loose_id(message: Any) -> str:
    """The id a refusal should echo, so the sender can match it: the request's, if readable."""
    value = message.get("id") if isinstance(message, dict) else None
    return value if isinstance(value, str) and len(value) <= MAX_ID else ""


def check_decoder(frame: bytes) -> None:
    """decode_request returns exactly the valid request, or raises ProtocolError; nothing else."""
    message = parse(frame)
    valid = message is not _UNREADABLE and conforms(message)
    try:
        decoded = protocol.decode_request(frame)
    except protocol.ProtocolError as exc:
        assert not valid, f"a valid request was refused ({exc}): {frame[:300]!r}"
        assert str(exc), "a refusal must say what is wrong"
        return
    assert valid, f"an invalid request was accepted: {frame[:300]!r}"
    assert decoded == message


# ------------------------------------------------------------- the strategies

# Characters that have broken JSON handling somewhere: quotes, escapes, controls, non-ASCII,
# astral-plane, byte-order marks, and lone surrogates, which JSON can carry ("\ud800") but UTF-8
# cannot. A fixed alphabet instead of st.characters(): drawing from all of Unicode costs ten times
# more, and the flood below needs ten thousand messages in seconds.
VALID_CHARS = 'aZ09 -_./:"\\\x00\x01\x1f\x7f\xe9\xff\u0100\u0301\u2028\ufeff\uffff\U0001f600\U0010ffff'
SURROGATES = "\ud800\udbff\udc00\udfff"
WEIRD_TEXT = st.text(st.sampled_from(VALID_CHARS + SURROGATES), max_size=12)
SHORT_TEXT = st.text(st.sampled_from(VALID_CHARS), min_size=1, max_size=12)
TEXT = SHORT_TEXT | st.just("x" * MAX_TEXT)
# No "-" in fuzz ids, so they never collide with the ids of dbguard's own client (prefix-counter).
REQUEST_IDS = st.text("abcdefghij0123456789", min_size=1, max_size=MAX_ID)
# A few shared project names and holders, so that fuzz requests meet each other in the lease table.
PROJECTS = (
    st.sampled_from([f"fz-{n}" for n in range(4)]) | SHORT_TEXT | st.sampled_from(["p" * 255, "é" * 127])
)
HOLDERS = st.sampled_from(
    [{"host": f"fz-host-{n}", "user": "fz", "agent": f"agent-{n}", "cache": "/fz"} for n in range(3)]
) | st.fixed_dictionaries(dict.fromkeys(HOLDER, TEXT))
COUNTS = st.integers(0, 1000) | st.integers(0, MAX_INT)
RENEW_ITEMS = st.fixed_dictionaries({"project": PROJECTS, "token": COUNTS, "unflushed": COUNTS})
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "text": TEXT,
    "project": PROJECTS,
    "int": COUNTS,
    "bool": st.booleans(),
    "mode": st.sampled_from(["write", "read"]),
    "holder": HOLDERS,
    "leases": st.lists(RENEW_ITEMS, max_size=4),
}

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | WEIRD_TEXT
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WEIRD_TEXT, inner, max_size=3),
    max_leaves=6,
)
# Values of the wrong type, sign, size or shape for any field.
GARBAGE = st.one_of(
    st.booleans(),
    st.none(),
    st.floats(),
    st.integers(max_value=-1),
    st.integers(MAX_INT + 1, 2**80),
    WEIRD_TEXT,
    st.just(""),
    st.just("x" * (MAX_TEXT + 1)),
    # Text that is fine anywhere but in a project name, which must fit in an LMDB key.
    st.sampled_from(["p" * (MAX_PROJECT_BYTES + 1), "\xe9" * 128, "x" * MAX_TEXT]),
    st.lists(JSON_VALUES, max_size=3),
    st.dictionaries(WEIRD_TEXT, JSON_VALUES, max_size=3),
)
# JSON tokens that json.dumps cannot make: spliced into a frame in place of a field's value.
RAW_TOKENS = st.sampled_from(
    [
        b"9" * 5000,  # more digits than CPython converts
        b"-" + b"9" * 4400,
        b"9" * 4300,  # as many as it converts: a valid JSON int, far beyond any token
        b"1e400",
        b"-1e400",
        b"NaN",
        b"-Infinity",
        b"-0",
        b"1.0",
        b"[" * 3000 + b"]" * 3000,  # deeper than the decoder recurses
        b'{"a":' * 600 + b"1" + b"}" * 600,
        b'"\\ud800"',  # a lone surrogate
        b'"\\udfff\\ud800"',
        b'"\xed\xa0\x80"',  # a surrogate in raw (invalid) UTF-8
        b'"\xff\xfe"',
        b'"\x00\x01"',
    ]
)
_RAW = "\x00raw\x00"


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request of any operation, optional fields included at random."""
    op = draw(st.sampled_from(sorted(SCHEMA)))
    message: dict[str, Any] = {"v": VERSION, "id": draw(REQUEST_IDS), "op": op}
    for name, (kind, required) in SCHEMA[op].items():
        if required or draw(st.booleans()):
            message[name] = draw(VALUES[kind])
    return message


def _mutate_fields(draw: st.DrawFn, fields: dict[str, Any]) -> None:
    how = draw(st.sampled_from(["drop", "extra", "retype"]))
    if how == "extra" or not fields:
        fields[draw(WEIRD_TEXT)] = draw(JSON_VALUES)
    elif how == "drop":
        del fields[draw(st.sampled_from(sorted(fields)))]
    else:
        fields[draw(st.sampled_from(sorted(fields)))] = draw(GARBAGE)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with one thing wrong (or, by chance, still right: the oracle decides)."""
    message = draw(requests())
    raw = None
    how = draw(st.sampled_from(["fields", "raw", "version", "op", "id", "project", "holder", "leases"]))
    if how == "fields":
        _mutate_fields(draw, message)
    elif how == "raw":
        message[draw(st.sampled_from(sorted(message)))] = _RAW
        raw = draw(RAW_TOKENS)
    elif how == "version":
        wrong = st.sampled_from([0, 2, -1, 99, "1", True, 1.0, None, [1], {"v": 1}])
        message["v"] = draw(wrong | GARBAGE)
    elif how == "op":
        names = st.sampled_from(["HELLO", "acquire ", "", "Acquire", "stat", "leave_queue", "shutdown"])
        message["op"] = draw(names | GARBAGE)
    elif how == "id":
        message["id"] = draw(st.sampled_from(["", "x" * (MAX_ID + 1), "\ud800"]) | GARBAGE)
    elif how == "project":  # too long to be a key of the broker's LMDB table
        message["project"] = draw(
            st.sampled_from(["p" * (MAX_PROJECT_BYTES + 1), "\xe9" * 128, "x" * MAX_TEXT])
        )
    elif how == "holder":
        if isinstance(message.get("holder"), dict):
            holder = dict(message["holder"])
            _mutate_fields(draw, holder)
            message["holder"] = holder
        else:
            message["holder"] = draw(GARBAGE | HOLDERS)  # a field this op does not have
    else:
        items = [dict(item) for item in message.get("leases") or [{}]]
        _mutate_fields(draw, items[draw(st.integers(0, len(items) - 1))])
        message["leases"] = items
    frame = json.dumps(message).encode()
    if raw is not None:
        frame = frame.replace(json.dumps(_RAW).encode(), raw)
    return frame


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


TRUNCATED = requests().map(_encode).flatmap(lambda f: st.integers(0, len(f) - 1).map(lambda n: f[:n]))
# json.loads reads UTF-16 and UTF-32 too, and raw surrogates in UTF-8 ("surrogatepass").
REENCODED = st.builds(
    lambda message, codec: json.dumps(message, ensure_ascii=False).encode(codec, "surrogatepass"),
    requests() | JSON_VALUES,
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"]),
)
FRAMES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    requests().map(_encode),
    mutated(),
    TRUNCATED,
    REENCODED,
)

HOLDER_A = {"host": "h", "user": "u", "agent": "a", "cache": "/c"}
HUGE_TOKEN = {"project": "p", "token": 2**64, "unflushed": 0}
# Single messages that once stopped the broker (each raised out of its loop), and edge cases.
KNOWN_BAD = [
    b'{"v":1,"id":"x","op":"hello","z":' + b"9" * 5000 + b"}",
    _encode({"v": 1, "id": "x", "op": "acquire", "project": "\ud800", "holder": HOLDER_A}),
    _encode({"v": 1, "id": "x", "op": "acquire", "project": "p", "holder": HOLDER_A})[:-1]
    + b',"floor":'
    + b"9" * 4300
    + b"}",
    _encode({"v": 1, "id": "x", "op": "acquire", "project": "p", "holder": HOLDER_A, "floor": 2**63}),
    _encode({"v": True, "id": "x", "op": "hello"}),
    _encode({"v": 1.0, "id": "x", "op": "hello"}),
    _encode({"v": 1, "id": "x", "op": "renew", "holder": HOLDER_A, "leases": [HUGE_TOKEN]}),
    _encode({"v": 1, "id": "x", "op": "acquire", "project": "p" * 600, "holder": HOLDER_A}),
    b"[" * 30000 + b"]" * 30000,
    b"",
    b"\xef\xbb\xbf",
]


# ------------------------------------------------------------ the decoder alone


@settings(max_examples=1500, deadline=None)
@given(frame=FRAMES)
def test_the_decoder_accepts_exactly_the_schema_and_refuses_the_rest_with_protocol_error(
    frame: bytes,
) -> None:
    check_decoder(frame)


@pytest.mark.parametrize("frame", KNOWN_BAD)
def test_messages_that_once_stopped_the_broker_are_refused(frame: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_request(frame)
    check_decoder(frame)


@settings(max_examples=300, deadline=None)
@given(message=requests())
def test_every_valid_request_decodes_to_itself(message: dict[str, Any]) -> None:
    assert conforms(message)  # the generator makes what the oracle calls valid
    assert protocol.decode_request(protocol.encode(message)) == message


def test_the_size_limit_is_exact() -> None:
    # A renew naming many projects is the largest valid request; JSON allows trailing spaces.
    items = [{"project": f"project-{n:06d}", "token": n, "unflushed": 0} for n in range(1100)]
    body = protocol.encode(protocol.request("renew", "big", holder=HOLDER_A, leases=items))
    assert len(body) < protocol.MAX_MESSAGE_BYTES
    at_limit = body + b" " * (protocol.MAX_MESSAGE_BYTES - len(body))
    assert protocol.decode_request(at_limit)["leases"] == items
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.decode_request(at_limit + b" ")


# --------------------------------------------------------- the running broker


def dealer(address: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


class GoodClient(threading.Thread):
    """A well-behaved holder doing acquire, renew, release on its own project until halted."""

    def __init__(self, address: str) -> None:
        super().__init__(name="good-client", daemon=True)
        self.address = address
        self.project = f"good-{uuid.uuid4().hex}"
        self.holder = {"host": "good-host", "user": "good", "agent": uuid.uuid4().hex, "cache": "/good"}
        self.tokens: list[int] = []
        self.failure: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with Client(self.address, timeout=6.0) as client:
                while not self.halt.is_set():
                    self.cycle(client)
                    self.halt.wait(0.002)
        except BaseException as exc:  # handed to the test, which fails with it
            self.failure = exc

    def cycle(self, client: Client) -> None:
        granted = client.call_ok("acquire", project=self.project, holder=self.holder)
        token = granted["token"]
        # Nobody else touches this project: each grant is exactly one more than the last.
        assert granted["status"] == "granted" and token == len(self.tokens) + 1, granted
        leases = [{"project": self.project, "token": token, "unflushed": 0}]
        renewed = client.call_ok("renew", holder=self.holder, leases=leases)
        assert renewed["results"][0]["ok"], renewed
        released = client.call_ok("release", project=self.project, holder=self.holder, token=token)
        assert released["held"] is True and released["token"] == token, released
        self.tokens.append(token)

    def finish(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "the good client hangs"
        if self.failure is not None:
            raise AssertionError(f"the well-behaved client failed: {self.failure!r}") from self.failure


@dataclass(frozen=True)
class Shot:
    """Frames sent on one of the flood's sockets; ``frames=None`` replays an earlier valid request."""

    socket: int
    frames: tuple[bytes, ...] | None
    replay: int = 0


SOCKETS = 4
SHOTS = st.one_of(
    st.builds(Shot, st.integers(0, SOCKETS - 1), FRAMES.map(lambda frame: (frame,))),
    # Multi-frame: the broker routes the reply back with every frame before the last one.
    st.builds(
        Shot,
        st.integers(0, SOCKETS - 1),
        st.tuples(st.lists(st.binary(max_size=16), min_size=1, max_size=3), FRAMES).map(
            lambda parts: (*parts[0], parts[1])
        ),
    ),
    st.builds(Shot, st.integers(0, SOCKETS - 1), st.sampled_from([(b"",), (b"", b""), (b"", b"", b"")])),
    st.builds(Shot, st.integers(0, SOCKETS - 1), st.none(), st.integers(0, 2**16)),
)
BATCH = 120
BATCHES = 105
OVERSIZED = st.lists(st.integers(protocol.MAX_MESSAGE_BYTES + 1, 3 * protocol.MAX_MESSAGE_BYTES), max_size=1)


class Flood:
    """Sends batches of shots over several DEALER sockets and checks every reply."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sockets = [dealer(address) for _ in range(SOCKETS)]
        self.answered: list[tuple[tuple[bytes, ...], bytes]] = []  # valid requests and their replies
        self.first_reply: dict[str, bytes] = {}
        self.grants: dict[tuple[str, int], str] = {}  # (project, token) -> holder it was granted to
        self.counts = {"sent": 0, "malformed": 0, "valid": 0, "replayed": 0, "oversized": 0}

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def fire(self, shots: list[Shot], oversized: list[int]) -> None:
        pending: list[list[tuple[tuple[bytes, ...], bytes | None]]] = [[] for _ in self.sockets]
        for shot in shots:
            frames, want = shot.frames, None
            if frames is None:
                if not self.answered:
                    frames = (protocol.encode(protocol.request("hello")),)
                else:
                    frames, want = self.answered[shot.replay % len(self.answered)]
                    self.counts["replayed"] += 1
            if max(map(len, frames)) > protocol.MAX_MESSAGE_BYTES:  # a long text in UTF-32, say
                self.oversized(frames)
                continue
            self.sockets[shot.socket].send_multipart(frames)
            pending[shot.socket].append((frames, want))
        for size in oversized:
            body = protocol.encode(protocol.request("status", "oversized"))
            self.oversized((body[:-1] + b" " * (size - len(body)) + b"}",))
        deadline = time.monotonic() + 15
        for sock, expected in zip(self.sockets, pending, strict=True):
            for frames, want in expected:
                left = deadline - time.monotonic()
                assert sock.poll(max(0, int(left * 1000))), f"no reply to {frames!r:.300}"
                self.check(frames, sock.recv_multipart(), want)

    def check(self, frames: tuple[bytes, ...], reply_frames: list[bytes], want: bytes | None) -> None:
        self.counts["sent"] += 1
        assert tuple(reply_frames[:-1]) == frames[:-1], "the reply must come back with the same envelope"
        raw = reply_frames[-1]
        reply = json.loads(raw)
        assert reply["v"] == VERSION, reply
        message = parse(frames[-1])
        if message is _UNREADABLE or not conforms(message):
            self.counts["malformed"] += 1
            assert reply["ok"] is False and reply["error"] in REFUSALS, f"{frames[-1]!r:.300} -> {reply}"
            assert reply["id"] == loose_id(message), reply
            assert reply["message"], "a refusal says what is wrong"
            return
        self.counts["valid"] += 1
        assert reply["id"] == message["id"], reply
        assert reply.get("error") != "internal", f"the broker failed on {frames[-1]!r:.300}: {reply}"
        # A request id seen before is answered from the reply cache: never acted on twice.
        acted = message["id"] not in self.first_reply
        first = self.first_reply.setdefault(message["id"], raw)
        assert raw == first, f"id {message['id']!r} answered twice differently:\n{first!r}\n{raw!r}"
        if want is not None:
            assert raw == want
        else:
            self.answered.append((frames, raw))
        granted = reply["ok"] and reply.get("status") == "granted" and reply.get("mode") == "write"
        if acted and message["op"] == "acquire" and granted:
            holder = message["holder"]
            key = f"{holder['user']}@{holder['host']}:{holder['cache']}"
            owner = self.grants.setdefault((message["project"], reply["token"]), key)
            assert owner == key, f"token {reply['token']} of {message['project']!r} went to two holders"

    def oversized(self, frames: tuple[bytes, ...]) -> None:
        """A frame over the limit: ZeroMQ closes the peer instead of handing it to the broker, so
        it goes on a socket of its own (the others would lose what they have in flight)."""
        self.counts["oversized"] += 1
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            sock.connect(self.address)
            sock.send_multipart(frames)
            assert monitor.poll(5000), f"{frames!r:.200} did not make the broker drop the peer"
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
            assert not sock.poll(0), "an oversized message was answered"
        finally:
            sock.disable_monitor()
            monitor.close()
            sock.close()


def _alive(broker: BrokerProcess) -> bool:
    return broker.process is not None and broker.process.poll() is None


def test_the_broker_answers_a_flood_of_bad_messages_while_a_good_client_keeps_its_leases(
    broker: BrokerProcess,
) -> None:
    flood = Flood(broker.address)
    good = GoodClient(broker.address)
    good.start()
    try:

        @settings(
            max_examples=BATCHES,
            deadline=None,
            database=None,  # the broker's state carries over between batches: replaying one is moot
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(shots=st.lists(SHOTS, min_size=BATCH, max_size=BATCH), oversized=OVERSIZED)
        @example(
            shots=[Shot(n % SOCKETS, (frame,)) for n, frame in enumerate(KNOWN_BAD)],
            oversized=[protocol.MAX_MESSAGE_BYTES + 1],
        )
        def batch(shots: list[Shot], oversized: list[int]) -> None:
            flood.fire(shots, oversized)
            assert _alive(broker), "the broker died"

        batch()
    finally:
        flood.close()
        good.finish()

    counts = flood.counts
    assert counts["malformed"] + counts["replayed"] + counts["oversized"] >= 10_000, counts
    assert min(counts["malformed"], counts["valid"], counts["replayed"]) > 500 and counts["oversized"] > 10, (
        counts
    )
    assert len(good.tokens) > 50, "the well-behaved client was starved"
    assert _alive(broker)
    _check_grants(broker, flood, good)
    # No junk: once the flood's read leases and queue places have lapsed, the table holds only
    # projects that were granted a writer lease. Requests that named any other project (a
    # release, a renew, a status, a stray queue place) left nothing behind.
    granted = {project for project, _ in flood.grants} | {good.project}
    time.sleep(TTL + 0.2)
    listed = _all_status(broker.address)
    junk = sorted(set(listed) - granted)
    assert not junk, f"{len(junk)} projects never granted are in the lease table: {junk[:10]}"
    # The grants are durable: a broker killed now comes back with every token it gave out, and
    # with nothing else (what it reloads is what its LMDB state holds).
    before = {project: item["token"] for project, item in listed.items()}
    assert all(before.values()), before
    broker.restart()
    after = {project: item["token"] for project, item in _all_status(broker.address).items()}
    assert after == before
    with Client(broker.address, timeout=6.0) as client:
        time.sleep(client.call_ok("hello")["grace_left"] + 0.1)
        granted = client.call_ok("acquire", project=good.project, holder=good.holder)
    assert granted["token"] == good.tokens[-1] + 1


def _all_status(address: str) -> dict[str, dict[str, Any]]:
    with Client(address, timeout=6.0) as client:
        hello = client.call_ok("hello")
        assert hello["version"] == VERSION
        return {item["project"]: item for item in client.call_ok("status")["projects"]}


def _check_grants(broker: BrokerProcess, flood: Flood, good: GoodClient) -> None:
    projects = _all_status(broker.address)
    mine = projects[good.project]
    assert mine["state"] == "free" and mine["writer"] is None and mine["token"] == good.tokens[-1], mine
    for (project, token), _ in flood.grants.items():
        assert projects[project]["token"] >= token, (project, token, projects[project])
    for item in projects.values():
        if item["state"] == "held":
            assert item["writer"] is not None and item["writer"]["token"] <= item["token"], item
        assert item["state"] in ("free", "held", "lock-delay", "orphaned"), item


def test_a_replayed_request_gets_its_first_reply_and_is_not_acted_on_again(broker: BrokerProcess) -> None:
    first, second = dict(HOLDER_A), {**HOLDER_A, "host": "h2"}
    sock = dealer(broker.address)

    def send(message: dict[str, Any]) -> bytes:
        sock.send(protocol.encode(message))
        assert sock.poll(5000)
        return sock.recv()

    try:
        acquire = protocol.request("acquire", "acq-1", project="p", holder=first)
        granted = send(acquire)
        assert json.loads(granted)["token"] == 1
        release = protocol.request("release", "rel-1", project="p", holder=first, token=1)
        assert json.loads(send(release))["held"] is True
        assert send(acquire) == granted  # replayed after the release: the old reply, no new lease
        other = json.loads(send(protocol.request("acquire", "acq-2", project="p", holder=second)))
        assert other["token"] == 2  # not 3: the replay granted nothing
        assert json.loads(send(release))["held"] is True  # the old reply again ...
        status = json.loads(send(protocol.request("status", "st-1", project="p")))["projects"][0]
        assert status["state"] == "held" and status["writer"]["host"] == "h2"  # ... and h2 still holds
        # The cache goes by id alone: a different request under a used id is not acted on either.
        renamed = protocol.request("break", "acq-1", project="p", force=True)
        assert send(renamed) == granted
        status = json.loads(send(protocol.request("status", "st-2", project="p")))["projects"][0]
        assert status["state"] == "held" and status["token"] == 2
    finally:
        sock.close()


def test_a_reply_larger_than_any_request_still_reaches_the_client(broker: BrokerProcess) -> None:
    # The request limit once applied to replies too: `dbguard status` of a site with a few
    # hundred projects then said the broker did not answer (exit 4).
    names = [f"{n:04d}-" + "p" * 200 for n in range(300)]
    with Client(broker.address, timeout=6.0) as client:
        for name in names:
            client.call_ok("acquire", project=name, holder=HOLDER_A)
        sock = dealer(broker.address)
        try:
            sock.send(protocol.encode(protocol.request("status", "all")))
            assert sock.poll(5000)
            assert len(sock.recv()) > protocol.MAX_MESSAGE_BYTES
        finally:
            sock.close()
        projects = client.call_ok("status")["projects"]
    assert sorted(item["project"] for item in projects) == names


# ------------------------------------------------------------------- raw TCP


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    flags = _read_exactly(sock, 1)[0]
    size = struct.unpack(">Q", _read_exactly(sock, 8))[0] if flags & 0x02 else _read_exactly(sock, 1)[0]
    return flags, _read_exactly(sock, size)


def _zmtp_frame(body: bytes, *, command: bool = False, more: bool = False) -> bytes:
    flags = (0x04 if command else 0) | (0x01 if more else 0)
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body


def zmtp_connect(port: int, *, mechanism: bytes = b"NULL") -> socket.socket:
    """A TCP connection that has done the ZMTP 3.0 handshake of a DEALER, step by step as libzmq
    does it (libzmq stalls a peer that sends its whole greeting before reading the signature)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"\xff" + bytes(7) + b"\x01\x7f")  # signature
    _read_exactly(sock, 10)
    sock.sendall(b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" + bytes(31))
    _read_exactly(sock, 54)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    sock.sendall(_zmtp_frame(ready, command=True))
    flags, body = _read_frame(sock)
    assert flags & 0x04 and body[1:6] == b"READY", body
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, accepting that the broker may hang up first: refusing garbage is its right."""
    with contextlib.suppress(ConnectionError):
        sock.sendall(data)


def closed_by_peer(sock: socket.socket, within: float = 5.0) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


GARBAGE_STREAMS = [
    b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS client hello
    b"\xff" * 64,
    b"\x00" * 4096,
    b"\xff" + bytes(7) + b"\x01\x7f" + b"\x01\x00" + bytes(52),  # ZMTP 1.0-ish version
    b"\xff" + b"\xff" * 8 + b"\x7f",  # a ZMTP 1.0 frame claiming 2**64 bytes
]


def test_raw_tcp_garbage_and_half_open_connections_do_not_stop_the_broker(broker: BrokerProcess) -> None:
    good = GoodClient(broker.address)
    good.start()
    # Connections that stop halfway through the greeting and stay open all along.
    stalled = [socket.create_connection(("127.0.0.1", broker.port)) for _ in range(20)]
    try:
        for sock in stalled[:10]:
            sock.sendall(b"\xff\x00\x00")
        for stream in GARBAGE_STREAMS:
            with socket.create_connection(("127.0.0.1", broker.port)) as raw:
                send_quietly(raw, stream)

        @settings(max_examples=80, deadline=None, database=None)
        @given(stream=st.binary(min_size=1, max_size=2048), linger=st.booleans())
        def random_bytes(stream: bytes, linger: bool) -> None:
            with socket.create_connection(("127.0.0.1", broker.port)) as raw:
                send_quietly(raw, stream)
                if linger:  # let the broker read it before the connection closes
                    time.sleep(0.01)

        random_bytes()

        # The handshake below is right: the broker answers a request sent over it ...
        with zmtp_connect(broker.port) as raw:
            raw.sendall(_zmtp_frame(protocol.encode(protocol.request("hello", "raw-hello"))))
            _, body = _read_frame(raw)
            assert json.loads(body)["ok"] is True
            # ... and a frame claiming a terabyte makes it hang up at once, before reading any of it.
            raw.sendall(b"\x02" + struct.pack(">Q", 1 << 40))
            assert closed_by_peer(raw)
        with zmtp_connect(broker.port) as raw:  # one byte over the limit is refused, unread
            raw.sendall(b"\x02" + struct.pack(">Q", protocol.MAX_MESSAGE_BYTES + 1))
            assert closed_by_peer(raw)
        for mechanism in (b"PLAIN", b"CURVE", b"GSSAPI", b"BOGUS"):
            with pytest.raises((EOFError, ConnectionError)):
                zmtp_connect(broker.port, mechanism=mechanism).close()
    finally:
        for sock in stalled:
            sock.close()
        good.finish()
    assert len(good.tokens) > 10
    assert _alive(broker)
    assert _all_status(broker.address)[good.project]["token"] == good.tokens[-1]


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda sock: sock.send_multipart([b"", b""]), id="empty-frames"),
        pytest.param(lambda sock: sock.send(b"\x00" * 100), id="nul-bytes"),
    ],
)
def test_every_refusal_names_the_problem_and_echoes_the_id(
    broker: BrokerProcess, send: Callable[[zmq.Socket[bytes]], None]
) -> None:
    sock = dealer(broker.address)
    try:
        send(sock)
        assert sock.poll(5000)
        reply = json.loads(sock.recv_multipart()[-1])
        assert reply["ok"] is False and reply["error"] == "bad-request" and reply["id"] == ""
        sock.send(_encode({"v": 2, "id": "future", "op": "hello"}))
        assert sock.poll(5000)
        reply = json.loads(sock.recv())
        assert reply["id"] == "future" and reply["error"] in REFUSALS
        assert "version 2" in reply["message"] and "speaks 1" in reply["message"]
    finally:
        sock.close()
