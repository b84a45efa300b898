"""A request/reply client for the broker and the local agent (Lazy Pirate).

A request is sent on a DEALER socket and its reply awaited with a timeout. On a timeout the
socket is thrown away (its queue may hold the unanswered request) and the same request, with
the same id, is sent on a fresh one; the server answers a repeated id from its reply cache,
so a resend never acts twice.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from dbguard.errors import BrokerUnavailable, GuardError, UsageError, from_reply
from dbguard.lease import protocol, requests
from dbguard.lease.keys import ClientKeys

_ENVELOPE = frozenset({"v", "id", "ok"})
_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Client:
    """One connection to a dbguard server; use from one thread."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 5.0,
        attempts: int = 3,
        what: str = "broker",
        keys: ClientKeys | None = None,
    ) -> None:
        self.address = address
        self.keys = keys
        self._monitor: zmq.Socket[bytes] | None = None
        self.timeout = timeout
        self.attempts = attempts
        self.what = what
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = None
        # Request ids: unique per client (random prefix) and per request (counter); cheaper
        # than a uuid4 per call on the hot path.
        self._id_prefix = protocol.new_request_id()[:16]
        self._sent = itertools.count(1)

    def _connect(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.keys is not None:
                # A client's CURVE options come before connect, like a server's before bind.
                sock.curve_serverkey = self.keys.broker_public
                sock.curve_publickey = self.keys.public
                sock.curve_secretkey = self.keys.secret
            if self.what == "broker":
                # A refused CURVE handshake is silent on the socket itself: watch for it, so
                # the user hears "your key was refused", not "no answer".
                self._monitor = sock.get_monitor_socket(_HANDSHAKE_FAILURES)
            try:
                sock.connect(self.address)
            except zmq.ZMQError as exc:  # settings check the form; ZeroMQ refuses what it cannot reach
                sock.close(linger=0)
                raise UsageError(
                    f"cannot connect to the {self.what} at {self.address!r} ({exc.strerror}); set "
                    "DBGUARD_BROKER to tcp://host:port, with the host the broker runs on"
                    if self.what == "broker"
                    else f"cannot connect to the {self.what} at {self.address!r} ({exc.strerror})"
                ) from None
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._socket.close(linger=0)
            self._socket = None

    def _handshake_refusal(self) -> str | None:
        """Why the broker refused the handshake, if a monitor event says it did."""
        if self._monitor is None:
            return None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                key = "DBGUARD_KEYS/client.key" if self.keys else "no key"
                return (
                    f"the broker at {self.address} refused this machine's key ({key}); ask the operator "
                    "to add its public key with `dbguard keys authorize` on the broker's machine"
                )
            if self.keys is None:
                return (
                    f"the broker at {self.address} requires CURVE authentication; set DBGUARD_KEYS to a "
                    "directory with client.key, client.key_secret and the broker's broker.key"
                )
            return (
                f"the secure handshake with the broker at {self.address} failed; check that "
                "DBGUARD_KEYS/broker.key is that broker's public key and that the broker uses keys"
            )
        return None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply (ok or error); raise BrokerUnavailable if none."""
        message = protocol.request(op, f"{self._id_prefix}-{next(self._sent)}", **fields)
        payload = protocol.encode(message)
        per_try = (timeout or self.timeout) / self.attempts
        for _ in range(self.attempts):
            sock = self._connect()
            sock.send(payload)
            deadline = time.monotonic() + per_try
            while (left := deadline - time.monotonic()) > 0:
                # A receive timeout instead of poll() + recv(): one call less per request.
                sock.setsockopt(zmq.RCVTIMEO, int(left * 1000) + 1)
                try:
                    reply = protocol.decode(sock.recv(), limit=None)
                except zmq.Again:
                    break
                except protocol.ProtocolError:
                    continue
                if reply.get("id") == message["id"]:
                    return reply
                # A late reply to an earlier, abandoned request: not ours, keep waiting.
            refusal = self._handshake_refusal()
            self._reset()
            if refusal is not None:
                raise BrokerUnavailable(refusal, address=self.address)
            if self._refused():
                break
        raise BrokerUnavailable(self._unreachable_message(timeout or self.timeout), address=self.address)

    def _refused(self) -> bool:
        """Whether nothing listens at a tcp:// address. ZeroMQ reconnects silently forever, so
        without this check a user who forgot `dbguard up` would wait out every retry."""
        if not self.address.startswith("tcp://"):
            return False
        host, _, port = self.address[len("tcp://") :].rpartition(":")
        try:
            with socket.create_connection(
                (host.strip("[]"), int(port)), timeout=self.timeout / self.attempts
            ):
                return False
        except ConnectionRefusedError:
            return True
        except (OSError, ValueError):
            return False  # unreachable or slow is not a refusal: keep retrying

    def _unreachable_message(self, waited: float) -> str:
        if self.what == "broker":
            return (
                f"no answer from the dbguard broker at {self.address} within {waited:.0f}s; start one with "
                "`dbguard up` on this machine, or set DBGUARD_BROKER to your site's broker"
            )
        return f"no answer from the local dbguard agent at {self.address} within {waited:.0f}s; see its log"

    def call_ok(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Like `call`, but raise the typed error of a failed reply."""
        reply = self.call(op, timeout=timeout, **fields)
        if not reply.get("ok"):
            raise error_from_reply(reply, self.address)
        return {key: value for key, value in reply.items() if key not in _ENVELOPE}

    def send(self, request: requests.Request, *, timeout: float | None = None) -> dict[str, Any]:
        """`call` for a typed request of the lease service."""
        return self.call(request.op, timeout=timeout, **requests.to_fields(request))

    def send_ok(self, request: requests.Request, *, timeout: float | None = None) -> dict[str, Any]:
        """`call_ok` for a typed request of the lease service."""
        return self.call_ok(request.op, timeout=timeout, **requests.to_fields(request))


def error_from_reply(reply: dict[str, Any], address: str = "") -> GuardError:
    """The typed error for a failed reply (see dbguard.errors: each class says how it travels);
    messages from the server are shown as they are. ``address`` is the server's, for errors
    that carry one and a reply that did not say."""
    return from_reply(reply, address=address)
