"""dbguard: one writer host per project on a shared filesystem.

The public names are handed on from the modules that define them.
"""

from dbguard.api import acquire, break_lease, clear, flush, init, open, release, serve, status
from dbguard.data.imagedb import ImageDB
from dbguard.data.remote import RemoteDB
from dbguard.errors import (
    BrokerUnavailable,
    CacheDiskFull,
    EtcdClusterError,
    ExitCode,
    Fenced,
    GuardError,
    HolderUnreachable,
    IntegrityError,
    LeaseHeld,
    LeaseLost,
    NotServed,
    ProjectBusy,
    ShareRefused,
    UnflushedData,
    UnsafeCachePath,
    UsageError,
)
from dbguard.files.guard import guard
from dbguard.results import Lease, ProjectStatus, QueuePlace, Reader, Status, Waiter, Writer

__all__ = [
    "BrokerUnavailable",
    "CacheDiskFull",
    "EtcdClusterError",
    "ExitCode",
    "Fenced",
    "GuardError",
    "HolderUnreachable",
    "ImageDB",
    "IntegrityError",
    "Lease",
    "LeaseHeld",
    "LeaseLost",
    "NotServed",
    "ProjectBusy",
    "ProjectStatus",
    "QueuePlace",
    "Reader",
    "RemoteDB",
    "ShareRefused",
    "Status",
    "UnflushedData",
    "UnsafeCachePath",
    "UsageError",
    "Waiter",
    "Writer",
    "acquire",
    "break_lease",
    "clear",
    "flush",
    "guard",
    "init",
    "open",
    "release",
    "serve",
    "status",
]
