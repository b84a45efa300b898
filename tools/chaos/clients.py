"""The workload of a chaos run: writer and reader processes on the simulated hosts, and the
records they write, each of which says who wrote it.

Each client is a Python process started on a host by the harness (`Harness.start_client`, as
``python -c``, entering `client_main`). It appends what it does to a history file in its host's
/tmp (`tools.chaos.history.History`):

- a writer loops: acquire (queued), append records whose payload encodes (writer, incarnation,
  sequence), flush, sometimes release; it records each grant (with the broker's view from
  `dbguard.status`), each append, each flush that returned and the records it acknowledged, and
  every error;
- a reader loops: browse the newest generation read-only, check every record it reads against
  the ids embedded in it, and record the generation, the count and what it saw. A reader has a
  cache directory of its own, so what it reads comes from the project store, never from the
  unflushed cache of a writer on the same host.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tools.chaos.history import History

DB_NAME = "chaos"
SHAPE = (16, 16)
# First value of every payload; float32 holds integers exactly up to 2**24.
_MAGIC = 7919.0


# --------------------------------------------------------------------------------------------
# Payloads: every record says who wrote it, and its content follows from that.


def payload(writer: int, incarnation: int, seq: int) -> NDArray[np.float32]:
    values = np.random.default_rng([writer, incarnation, seq]).random(SHAPE[0] * SHAPE[1], dtype=np.float32)
    values[:4] = (_MAGIC, writer, incarnation, seq)
    return values.reshape(SHAPE)


def identify(array: NDArray[Any]) -> tuple[int, int, int] | None:
    """The (writer, incarnation, seq) a record embeds, if its whole content matches them."""
    if array.shape != SHAPE or array.dtype != np.float32:
        return None
    flat = array.reshape(-1)
    if flat[0] != _MAGIC or not all(0 <= v < 2**24 and v == int(v) for v in flat[1:4]):
        return None
    ids = (int(flat[1]), int(flat[2]), int(flat[3]))
    return ids if np.array_equal(payload(*ids), array) else None


def digest(data: NDArray[Any] | bytes | memoryview) -> str:
    raw = np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
    return hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------------------------
# Clients: run on a simulated host as `python -c` (see Harness.start_client).


def client_main(config: dict[str, Any]) -> None:
    """Entry point of a client process on a host; ``config`` comes from the harness."""
    # The harness does not read the pipes it gave us: everything goes to a log file instead.
    log = os.open(config["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # A client never outlives the run, whatever it is blocked in.
    watchdog = threading.Timer(max(0.0, config["hard_stop"] - time.monotonic()), os._exit, args=(0,))
    watchdog.daemon = True
    watchdog.start()
    if config["role"] == "reader":
        # A browsing user with a cache of their own: what it reads comes from the store only, never
        # from a writer's unflushed cache on the same host.
        os.environ["DBGUARD_CACHE"] = config["cache"]
        _reader(config)
    else:
        _writer(config)


def _short(exc: BaseException) -> dict[str, str]:
    return {"kind": type(exc).__name__, "message": str(exc)[:400]}


def _broker_view(project: str) -> dict[str, Any]:
    """The broker's view of the project via `dbguard.status`, with when it was asked."""
    import dbguard

    s0 = time.monotonic()
    try:
        status = dbguard.status(project)
    except Exception as exc:
        return {"s0": s0, "s1": time.monotonic(), "error": _short(exc)}
    item = status.to_json()["projects"][0]  # the history keeps the wire's form
    agent = status.agent or {}
    return {
        "s0": s0,
        "s1": time.monotonic(),
        "state": item["state"],
        "token": item["token"],
        "writer": item["writer"],
        "agent_leases": [(lease["token"], lease["state"]) for lease in agent.get("leases", [])],
    }


class _LeaseGone(Exception):
    """This grant is over for the writer (lost, fenced, broker or agent unreachable)."""


def _writer(config: dict[str, Any]) -> None:
    import dbguard
    from dbguard.errors import BrokerUnavailable, Fenced, GuardError, LeaseHeld, LeaseLost

    history = History(Path(config["history"]))
    rng = random.Random(config["seed"])
    project, stop_at = config["project"], config["stop_at"]
    wid, inc = config["writer"], config["incarnation"]
    host = socket.gethostname()
    history.write("start", role="writer", writer=wid, incarnation=inc, host=host, pid=os.getpid())
    lease_errors = (LeaseLost, LeaseHeld, Fenced, BrokerUnavailable)
    seq = 0

    def flush(token: int, pending: list[list[Any]]) -> None:
        """Flush; on success acknowledge ``pending``. A failure that leaves the data in the cache
        (a full disk) is retried under the same grant, and a later success acknowledges it too."""
        for attempt in range(4):
            t0 = time.monotonic()
            try:
                result = dbguard.flush(project)
            except lease_errors as exc:
                history.write("flush_error", t0=t0, token=token, unacked=len(pending), **_short(exc))
                raise _LeaseGone from exc
            except GuardError as exc:
                history.write("flush_failed", t0=t0, token=token, pending=len(pending), **_short(exc))
                if attempt == 3 or time.monotonic() > stop_at:
                    raise _LeaseGone from exc
                time.sleep(rng.uniform(0.3, 1.0))
                continue
            history.write(
                "flush_ok",
                t0=t0,
                token=token,
                generation=result["generation"],
                records=result["records"],
                acked=list(pending),
            )
            pending.clear()
            return

    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        # Intents are logged before each call that can make the agent release a lease (see
        # `end_windows`): a call cut short by a crash leaves its intent without an outcome.
        history.write("acquiring", t0=t0)
        try:
            lease = dbguard.acquire(project, wait=rng.uniform(0.5, 3.0))
        except Exception as exc:
            history.write("acquire_error", t0=t0, **_short(exc))
            time.sleep(rng.uniform(0.1, 0.8))
            continue
        token = lease.token
        history.write(
            "grant",
            t0=t0,
            t1=time.monotonic(),
            token=token,
            ttl=lease.ttl,
            host=host,
            broker=_broker_view(project),
        )
        pending: list[list[Any]] = []  # [seq, index, sha] appended under this grant, not yet acked
        try:
            for _ in range(rng.randint(1, 8)):
                if time.monotonic() >= stop_at:
                    break
                with dbguard.open(project, DB_NAME, "a") as db:
                    for _ in range(rng.randint(1, 16)):
                        array = payload(wid, inc, seq)
                        index = db.append(array, attrs={"w": wid, "n": inc, "s": seq})
                        sha = digest(array)
                        history.write("append", seq=seq, index=index, sha=sha, token=token)
                        pending.append([seq, index, sha])
                        seq += 1
                if rng.random() < 0.4:
                    time.sleep(rng.uniform(0.05, 0.8))  # stay dirty for a while
                if rng.random() < 0.75:
                    flush(token, pending)
            if rng.random() < 0.5 or time.monotonic() >= stop_at:
                t0 = time.monotonic()
                history.write("releasing", t0=t0)
                try:
                    result = dbguard.release(project)
                except Exception as exc:
                    history.write("release_error", t0=t0, token=token, unacked=len(pending), **_short(exc))
                    raise _LeaseGone from exc
                # A release flushes what is dirty first; it acknowledges pending records only if
                # it released a lease that was still held under this token.
                done = bool(result.get("released")) and result.get("state") == "held"
                done = done and result.get("token") == token
                history.write("release", t0=t0, token=token, result=result, acked=pending if done else [])
                pending = []
        except _LeaseGone:
            time.sleep(rng.uniform(0.1, 0.6))
        except lease_errors as exc:
            history.write("lease_error", token=token, unacked=len(pending), **_short(exc))
            time.sleep(rng.uniform(0.1, 0.6))
        except GuardError as exc:  # e.g. a release that could not flush (a full disk)
            history.write("write_error", token=token, unacked=len(pending), **_short(exc))
            time.sleep(rng.uniform(0.1, 0.6))
        except Exception:
            history.write(
                "client_error", token=token, unacked=len(pending), trace=traceback.format_exc()[-1500:]
            )
            time.sleep(rng.uniform(0.1, 0.6))
    history.write("stop")


def _reader(config: dict[str, Any]) -> None:
    import dbguard

    history = History(Path(config["history"]))
    rng = random.Random(config["seed"])
    project, stop_at = config["project"], config["stop_at"]
    history.write("start", role="reader", reader=config["reader"], host=socket.gethostname(), pid=os.getpid())
    known: dict[int, str] = {}  # index -> sha256 seen by this process
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        bad: list[dict[str, Any]] = []
        seen: list[list[Any]] = []
        try:
            with dbguard.open(project, DB_NAME, "r") as db:
                generation, count = db.generation, len(db)
                fresh = [i for i in range(count) if i not in known]
                older = rng.sample(range(count), min(count, 24))
                for index in fresh + older:
                    array = db[index]
                    ids, sha = identify(array), digest(array)
                    attrs = db.attrs(index)
                    if ids is None:
                        bad.append({"index": index, "why": "content does not match its embedded ids"})
                    elif (attrs.get("w"), attrs.get("n"), attrs.get("s")) != ids:
                        bad.append({"index": index, "why": f"attrs {attrs} do not match the payload {ids}"})
                    if known.get(index, sha) != sha:
                        bad.append({"index": index, "why": "changed since this reader last read it"})
                    if index not in known:
                        known[index] = sha
                        seen.append([index, sha[:16]])
        except Exception as exc:
            history.write("read_error", t0=t0, **_short(exc))
            time.sleep(rng.uniform(0.1, 0.5))
            continue
        history.write(
            "read",
            t0=t0,
            generation=generation,
            count=count,
            checked=len(fresh) + len(older),
            bad=bad,
            seen=seen,
        )
        time.sleep(rng.uniform(0.05, 0.4))
    history.write("stop")
