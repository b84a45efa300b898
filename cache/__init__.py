"""The node-local cache: a vetted local directory holding one LMDB environment per project.

This package imports nothing from ``dbguard``: it knows nothing of leases.
"""

from .errors import CacheCorrupt, CacheError, CacheFull, DirtyNotAnnounced, UnsafeCacheLocation
from .location import (
    NETWORK_FILESYSTEMS,
    MountEntry,
    check_not_network,
    default_cache_dir,
    find_mount,
    is_network_fstype,
    mount_table,
    prepare_cache_dir,
)
from .store import (
    DEFAULT_MAP_SIZE,
    CacheStore,
    DirtyEntry,
    Reader,
    Record,
    decode_record,
    encode_record,
)

__all__ = [
    "DEFAULT_MAP_SIZE",
    "NETWORK_FILESYSTEMS",
    "CacheCorrupt",
    "CacheError",
    "CacheFull",
    "CacheStore",
    "DirtyEntry",
    "DirtyNotAnnounced",
    "MountEntry",
    "Reader",
    "Record",
    "UnsafeCacheLocation",
    "check_not_network",
    "decode_record",
    "default_cache_dir",
    "encode_record",
    "find_mount",
    "is_network_fstype",
    "mount_table",
    "prepare_cache_dir",
]
