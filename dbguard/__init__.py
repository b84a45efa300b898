"""dbguard: one writer host per project on a shared filesystem.

The public names are handed on from the modules that define them.
"""

from dbguard.api import acquire, break_lease, init, release, status
from dbguard.errors import (
    BrokerUnavailable,
    ExitCode,
    Fenced,
    GuardError,
    IntegrityError,
    LeaseHeld,
    LeaseLost,
    UnsafeCachePath,
    UsageError,
)

__all__ = [
    "BrokerUnavailable",
    "ExitCode",
    "Fenced",
    "GuardError",
    "IntegrityError",
    "LeaseHeld",
    "LeaseLost",
    "UnsafeCachePath",
    "UsageError",
    "acquire",
    "break_lease",
    "init",
    "release",
    "status",
]
