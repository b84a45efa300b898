"""Image databases of a project another host holds, read and written through that host.

`dbguard.open(project, name, mode, remote=True)` (or ``DBGUARD_REMOTE=1``) on a host that does
not hold the writer lease returns a `RemoteDB`: it finds the holder's serving address in the
lease service (`dbguard serve` records it there), and sends every read and write to the holder's
server (agent.serve). Reads see the holder's current records, unflushed ones included; appends
land in the holder's cache and reach the share with the holder's flushes, under its token.

A worker pins the holder's token when it opens: if that lease ends (released, broken, expired
with the holder dead) the next request raises `LeaseLost` at once, and what the holder had
acknowledged follows the rules of a crashed holder (orphaned, kept aside, recoverable there).
While the lease service still names the same holder under the same token, a holder that does
not answer (its agent restarting, its server started again on a new port) is looked up again
and the requests still unanswered are sent again with their ids, for up to ``serve_retry``
seconds; the holder applies an append once per id, so a resent append never lands twice.

Throughput: `extend` and iteration keep several requests in flight (a window), and records
travel as their own frames, sent from and received into the arrays' buffers without a copy.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import numpy as np
import zmq
from numpy.typing import NDArray

from dbguard.data import project as projects
from dbguard.data import wire
from dbguard.data.imagedb import checked_record, record_index
from dbguard.data.wire import DataOp
from dbguard.errors import (
    BrokerUnavailable,
    GuardError,
    HolderUnreachable,
    LeaseLost,
    NotServed,
    UsageError,
    from_reply,
)
from dbguard.lease import keys as key_files
from dbguard.lease import requests
from dbguard.lease.protocol import ProtocolError
from dbguard.lease.service import for_broker
from dbguard.results import describe_writer
from dbguard.settings import Settings

# Requests in flight per worker: enough to keep the holder's link busy while the worker waits
# for the first reply; more only queues in buffers.
WINDOW = 16
# A record of this many bytes at this speed sets the least time to wait for its reply.
_SLOWEST_LINK = 50e6

_Sent = tuple[bytes, Any]  # header frame, payload (an array or None)


class HolderLink:
    """The connection of one worker to the host that serves one project."""

    def __init__(self, project: projects.Project, settings: Settings) -> None:
        self.project = project
        self.settings = settings
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._server_key: str | None = None
        # Exchanges may nest (a read inside a loop over a pipelined iteration): a reply that
        # belongs to another exchange waits here for it, rather than being taken for a stray.
        self._outstanding: set[str] = set()
        self._arrived: dict[str, tuple[dict[str, Any], Any]] = {}
        self.token: int | None = None
        self.host = ""
        self.address = ""
        self._connect(self._locate())
        try:
            reply, _ = self.call(DataOp.HELLO)
        except BaseException:
            self.close()
            raise
        if reply.get("token") != self.token:
            # The lease changed between the lookup and the hello: look again from scratch.
            self.close()
            raise HolderUnreachable(
                f"the lease of {project.path} changed while this worker connected; try again",
                address=self.address,
            )

    # ------------------------------------------------------------ finding

    def _locate(self) -> dict[str, Any]:
        """The holder's writer record, if it holds the lease and serves the project; else the
        error that says why this worker cannot go on (or BrokerUnavailable, to retry)."""
        with for_broker(self.settings) as service:
            item = service.send_ok(requests.Status(self.project.id))["projects"][0]
        writer, state = item.get("writer"), item.get("state")
        path = self.project.path
        if self.token is not None and (writer is None or int(writer.get("token", -1)) != self.token):
            raise LeaseLost(
                f"the lease under which {self.host} served {path} (token {self.token}) has ended "
                f"(the project is {state} now): records it acknowledged to this worker are on "
                f"{self.host}, flushed when it releases or comes back, or kept aside there if its "
                "lease was broken (`dbguard recover` on that host). Open the database again",
                project=str(path),
            )
        if writer is None or state not in ("held", "orphaned"):
            raise NotServed(
                f"nobody holds the writer lease of {path} ({state}): run `dbguard serve {path}` (or "
                "`dbguard acquire --serve`) on the host that works on it, then start the workers",
                project=str(path),
            )
        if state == "orphaned":
            raise LeaseLost(
                f"the host that holds {path} ({_who(writer)}) stopped renewing its lease "
                "and the project is orphaned: nothing can be read or written through it until it "
                "comes back or an operator runs `dbguard break`",
                project=str(path),
            )
        if not writer.get("serve"):
            raise NotServed(
                f"{path} is held by {_who(writer)}, which does not serve it to workers: "
                f"run `dbguard serve {path}` on {writer.get('host')}",
                project=str(path),
            )
        return dict(writer)

    def _connect(self, writer: dict[str, Any]) -> None:
        self.close()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        server_key = writer.get("serve_key")
        if self.settings.keys is not None:
            mine = key_files.client_keys(self.settings.keys)
            if not server_key:
                socket.close()
                raise UsageError(
                    f"this host uses keys ({self.settings.keys}) but {writer.get('host')} serves "
                    f"{self.project.path} without them: set DBGUARD_KEYS on that host too"
                )
            socket.curve_publickey = mine.public
            socket.curve_secretkey = mine.secret
            socket.curve_serverkey = str(server_key).encode()
            # A refused handshake is silent on the socket: watch for it, so that a worker whose
            # key the holder does not know hears so at once rather than waiting out serve_retry.
            self._monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        elif server_key:
            socket.close()
            raise UsageError(
                f"{writer.get('host')} serves {self.project.path} with CURVE keys, and this host has "
                "none: set DBGUARD_KEYS to this machine's keys directory (`dbguard keys init-client`), "
                "and have its public key authorised on that host"
            )
        socket.connect(str(writer["serve"]))
        self._socket = socket
        self._server_key = writer.get("serve_key")
        self.token = int(writer["token"])
        self.host = str(writer.get("host"))
        self.address = str(writer["serve"])

    def close(self) -> None:
        if self._socket is not None:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._socket.close()
            self._socket = None

    def _check_refused(self) -> None:
        if self._monitor is None or not self._monitor.poll(0):
            return
        raise HolderUnreachable(
            f"{self.host} refused this machine's key ({self.settings.keys}/client.key) for "
            f"{self.project.path}: add its public key to the keys directory of {self.host} with "
            "`dbguard keys authorize` (the holder reads its authorized/ directory at each connection)",
            address=self.address,
        )

    # ----------------------------------------------------------- exchanges

    def header(self, op: DataOp, req_id: str | None = None, **fields: Any) -> bytes:
        message = wire.request(op, req_id, project=self.project.id, token=self.token, **fields)
        return wire.encode_header(message)

    def call(
        self, op: DataOp, payload: Any = None, **fields: Any
    ) -> tuple[dict[str, Any], memoryview | None]:
        """One request and its reply (raising the holder's error as its own class)."""
        return next(self.exchange([(self.header(op, **fields), payload)]))

    def exchange(self, sent: Iterable[_Sent], window: int = WINDOW) -> Iterator[tuple[dict[str, Any], Any]]:
        """Send ``sent`` with up to ``window`` requests in flight; yield each reply (header,
        payload) in the order sent. A reply that is an error is raised there."""
        outgoing = iter(sent)
        pending: collections.OrderedDict[str, _Sent] = collections.OrderedDict()
        order: collections.deque[str] = collections.deque()
        ready: dict[str, tuple[dict[str, Any], Any]] = {}
        exhausted = False
        deadline: float | None = None  # of retrying an unreachable holder
        try:
            while True:
                while not exhausted and len(pending) < window:
                    item = next(outgoing, None)
                    if item is None:
                        exhausted = True
                        break
                    req_id = wire.decode_header(item[0])["id"]
                    pending[req_id] = item
                    order.append(req_id)
                    self._outstanding.add(req_id)
                    self._send(item)
                while order and order[0] in ready:
                    reply, payload = ready.pop(order.popleft())
                    yield _raise_if_failed(reply, self.address), payload
                if not order:
                    return
                if not pending:
                    continue
                answer, answer_payload = self._receive(pending)
                if answer is not None:
                    deadline = None
                    del pending[answer["id"]]
                    self._outstanding.discard(answer["id"])
                    ready[answer["id"]] = answer, answer_payload
                    continue
                # Nothing within the timeout: is the holder still the one we opened under?
                self._check_refused()
                deadline = deadline or time.monotonic() + self.settings.serve_retry
                self._recover(deadline)
                for item in pending.values():  # the holder applies each id once
                    self._send(item)
        finally:
            # Given up on (an error, or a loop left early): its replies are nobody's now.
            for req_id in pending:
                self._outstanding.discard(req_id)
                self._arrived.pop(req_id, None)

    def _send(self, item: _Sent) -> None:
        header, payload = item
        assert self._socket is not None
        if payload is None:
            self._socket.send(header)
        else:
            self._socket.send_multipart([header, payload], copy=False)

    def _receive(self, pending: dict[str, _Sent]) -> tuple[dict[str, Any] | None, Any]:
        """The next reply to one of ``pending``, or (None, None) after the timeout."""
        for req_id in pending:
            if req_id in self._arrived:
                return self._arrived.pop(req_id)
        assert self._socket is not None
        largest = max((_nbytes(p) for _, p in pending.values()), default=0)
        timeout = self.settings.request_timeout + len(pending) * largest / _SLOWEST_LINK
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not self._socket.poll(int(left * 1000) + 1):
                break
            frames = self._socket.recv_multipart(copy=False)
            try:
                reply = wire.decode_header(frames[0].buffer)
            except ProtocolError:
                continue
            payload = frames[1].buffer if len(frames) > 1 else None
            if reply["id"] in pending:
                return reply, payload
            if reply["id"] in self._outstanding:
                self._arrived[reply["id"]] = reply, payload  # another exchange's
            # else: the answer to a request sent again, answered twice
        return None, None

    def _recover(self, deadline: float) -> None:
        """The holder did not answer: while the lease service still names it under our token
        (its agent or server restarting, or only busy), go on with wherever it serves now (a
        new socket if that moved); raise LeaseLost or NotServed as soon as the lease service
        says so, HolderUnreachable once ``deadline`` has passed without an answer."""
        last: GuardError | None = None
        while True:
            if time.monotonic() >= deadline:
                why = f": {last}" if last else ""
                raise HolderUnreachable(
                    f"{self.host} has not answered this worker for {self.settings.serve_retry:g}s "
                    f"(serve_retry) at {self.address}{why}. It still holds {self.project.path}; "
                    "check that its agent runs (`dbguard status` there) and that this host reaches "
                    "that address",
                    address=self.address,
                )
            try:
                writer = self._locate()
            except BrokerUnavailable as exc:  # the lease service itself coming back
                last = exc
                time.sleep(0.5)
                continue
            if str(writer["serve"]) != self.address or writer.get("serve_key") != self._server_key:
                self._connect(writer)
            return


def _who(writer: dict[str, Any]) -> str:
    return describe_writer(writer.get("user"), writer.get("host"), writer.get("command"), writer.get("job"))


def _nbytes(payload: Any) -> int:
    return int(getattr(payload, "nbytes", 0) or 0)


def _raise_if_failed(reply: dict[str, Any], address: str) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    if reply.get("index_error"):
        raise IndexError(str(reply.get("message")))
    raise from_reply(reply, address=address)


class RemoteDB:
    """An image database served by the host that holds its project (see the module docstring).
    Reads return read-only arrays; ``append`` returns the record's index, ``extend`` appends
    many with several in flight and returns their indices."""

    def __init__(self, project: projects.Project, name: str, mode: str, settings: Settings) -> None:
        self.project = project
        self.name = name
        self.mode = mode
        self._link = HolderLink(project, settings)

    @property
    def holder(self) -> str:
        """The host this database is read and written through."""
        return self._link.host

    # ------------------------------------------------------------- reading

    def __len__(self) -> int:
        reply, _ = self._link.call(DataOp.COUNT, db=self.name)
        return int(reply["count"])

    def __getitem__(self, index: int) -> NDArray[Any]:
        reply, payload = self._link.call(DataOp.GET, db=self.name, index=record_index(index))
        return _array(reply, payload)

    def attrs(self, index: int) -> dict[str, Any]:
        reply, _ = self._link.call(DataOp.GET, db=self.name, index=record_index(index), with_attrs=True)
        return dict(reply.get("attrs") or {})

    def __iter__(self) -> Iterator[NDArray[Any]]:
        count = len(self)
        sent = (self._link.header(DataOp.GET, db=self.name, index=i) for i in range(count))
        for reply, payload in self._link.exchange((header, None) for header in sent):
            yield _array(reply, payload)

    def records(self) -> list[dict[str, Any]]:
        """Every record's index, dtype, shape and attrs (what `dbguard ls --remote` prints)."""
        reply, _ = self._link.call(DataOp.RECORDS, db=self.name)
        return list(reply["records"])

    @contextlib.contextmanager
    def reading(self) -> Iterator[RemoteDB]:
        """For code written against `ImageDB.reading`: remote reads are copies already."""
        yield self

    def refresh(self) -> bool:
        """Remote reads always see the holder's current records: nothing to refresh."""
        return False

    @property
    def generation(self) -> None:
        """None: a served database is read live from the holder, not from a generation."""
        return None

    # ------------------------------------------------------------- writing

    def _writable(self) -> None:
        if self.mode == "r":
            raise UsageError(f"{self.name!r} of {self.project.path} is open read-only (mode 'r')")

    def append(self, array: NDArray[Any], attrs: dict[str, Any] | None = None) -> int:
        """Add a record after the last one, through the holder; returns its index."""
        return self.extend([array], None if attrs is None else [attrs])[0]

    def extend(
        self, arrays: Iterable[NDArray[Any]], attrs: Iterable[dict[str, Any] | None] | None = None
    ) -> list[int]:
        """Append every array (with the attrs at the same place, if given), several in flight;
        returns their indices in order. Each is applied once however often it is resent."""
        self._writable()
        attrs_of = iter(attrs) if attrs is not None else None

        def sent() -> Iterator[_Sent]:
            for array in arrays:
                array = np.ascontiguousarray(checked_record(array))
                extra = next(attrs_of, None) if attrs_of is not None else None
                header = self._link.header(
                    DataOp.APPEND, db=self.name, attrs=extra, **wire.array_header(array)
                )
                yield header, array

        return [int(reply["index"]) for reply, _ in self._link.exchange(sent())]

    def __setitem__(self, index: int, array: NDArray[Any]) -> None:
        self._writable()
        array = np.ascontiguousarray(checked_record(array))
        self._link.call(
            DataOp.PUT, array, db=self.name, index=record_index(index), **wire.array_header(array)
        )

    def set_attrs(self, index: int, attrs: dict[str, Any]) -> None:
        self._writable()
        self._link.call(DataOp.SET_ATTRS, db=self.name, index=record_index(index), attrs=dict(attrs))

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._link.close()

    def __enter__(self) -> RemoteDB:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<dbguard RemoteDB {self.name!r} of {self.project.path} through {self._link.address}>"


def databases(project: projects.Project, settings: Settings) -> list[dict[str, Any]]:
    """Names and counts of every database of ``project``, as its holder sees them now."""
    link = HolderLink(project, settings)
    try:
        reply, _ = link.call(DataOp.DATABASES)
        return list(reply["databases"])
    finally:
        link.close()


def _array(reply: dict[str, Any], payload: Any) -> NDArray[Any]:
    try:
        return wire.array_from(reply, payload if payload is not None else b"")
    except ProtocolError as exc:
        raise GuardError(f"the holder sent a record that does not parse: {exc}") from None
