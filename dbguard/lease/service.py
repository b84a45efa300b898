"""Which lease service this process talks to: the embedded broker, or an etcd cluster.

Both answer the typed requests of `dbguard.lease.requests` with the same replies; everything
above this module (agent, API, command line) is written against `LeaseService` and never asks
which. (Both classes also take untyped ``call(op, **fields)``, for tests that send the wire's
own forms, malformed ones included.)
"""

from __future__ import annotations

from typing import Any, Protocol, Self

from dbguard.lease.keys import client_keys
from dbguard.lease.requests import Request
from dbguard.settings import Settings


class LeaseService(Protocol):
    """A connection to the site's lease service; use from one thread."""

    address: str

    def send(self, request: Request, *, timeout: float | None = None) -> dict[str, Any]:
        """The reply to one typed request (ok or error); BrokerUnavailable if there is none."""
        ...

    def send_ok(self, request: Request, *, timeout: float | None = None) -> dict[str, Any]:
        """The fields of an ok reply to a typed request; the typed `GuardError` of a failed one."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def for_broker(settings: Settings, *, timeout: float | None = None, attempts: int = 3) -> LeaseService:
    """A connection to the configured lease service: ``etcd://`` for an etcd cluster, else the
    broker, with this machine's keys when the site uses them."""
    timeout = timeout or settings.request_timeout
    if settings.broker.startswith("etcd://"):
        from dbguard.lease.etcd import EtcdLeases  # etcd's client is imported only where used

        return EtcdLeases(
            settings.broker,
            timeout=timeout,
            attempts=attempts,
            ttl=settings.ttl,
            lock_delay=settings.lock_delay,
        )
    from dbguard.lease.client import Client

    keys = client_keys(settings.keys) if settings.keys is not None else None
    return Client(settings.broker, timeout=timeout, attempts=attempts, keys=keys)
