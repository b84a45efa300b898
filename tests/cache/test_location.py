"""The cache refuses network filesystems and unsafe directories (docs/design.md, invariant 6)."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from dbguard.cache import (
    NETWORK_FILESYSTEMS,
    CacheCorrupt,
    CacheError,
    MountEntry,
    UnsafeCacheLocation,
    check_not_network,
    default_cache_dir,
    find_mount,
    is_network_fstype,
    mount_table,
    prepare_cache_dir,
)

ROOT = MountEntry(mountpoint="/", fstype="ext4", source="/dev/sda1")
LOCAL_TABLE = [ROOT]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("fstype", sorted(NETWORK_FILESYSTEMS))
def test_every_network_filesystem_is_refused_before_anything_is_created(tmp_path: Path, fstype: str) -> None:
    share = tmp_path.resolve()
    table = [ROOT, MountEntry(str(share), fstype, "server:/export")]
    target = share / "sub" / "cache"
    with pytest.raises(UnsafeCacheLocation) as info:
        prepare_cache_dir(target, table)
    err = info.value
    message = str(err)
    for expected in (str(target), fstype, "server:/export", str(share), "DBGUARD_CACHE", "/tmp"):
        assert expected in message
    assert (err.fstype, err.mount_source, err.mountpoint) == (fstype, "server:/export", str(share))
    assert not (share / "sub").exists()


@pytest.mark.parametrize("fstype", ["nfs3", "NFS4", "fuse.nfs", "fuse.lustre", "fuse.9p"])
def test_nfs_prefixes_and_fuse_subtypes_count_as_network(fstype: str) -> None:
    assert is_network_fstype(fstype)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "tmpfs", "btrfs", "overlay", "zfs"])
def test_local_filesystems_are_accepted(tmp_path: Path, fstype: str) -> None:
    local = tmp_path.resolve()
    table = [MountEntry("/", "nfs4", "server:/"), MountEntry(str(local), fstype, "dev")]
    target = local / "a" / "cache"
    assert prepare_cache_dir(target, table) == target
    assert target.is_dir()
    assert _mode(target) == 0o700
    assert check_not_network(target, table).fstype == fstype


def test_longest_prefix_wins_component_wise(tmp_path: Path) -> None:
    base = tmp_path.resolve()
    for name in ("home", "home2", "home/local"):
        (base / name).mkdir()
    table = [
        ROOT,
        MountEntry(str(base / "home/local"), "xfs", "/dev/sdb1"),
        MountEntry(str(base / "home"), "nfs4", "server:/home"),
    ]
    assert find_mount(base / "home/local/x", table).fstype == "xfs"
    assert find_mount(base / "home/user", table).fstype == "nfs4"
    assert find_mount(base / "home", table).fstype == "nfs4"
    # /home2 shares a string prefix with /home but is not inside it.
    assert find_mount(base / "home2/x", table).fstype == "ext4"


def test_last_entry_wins_on_a_shared_mountpoint(tmp_path: Path) -> None:
    mnt = tmp_path.resolve()
    over = [ROOT, MountEntry(str(mnt), "ext4", "/dev/sdc1"), MountEntry(str(mnt), "nfs", "srv:/")]
    under = [ROOT, MountEntry(str(mnt), "nfs", "srv:/"), MountEntry(str(mnt), "ext4", "/dev/sdc1")]
    assert find_mount(mnt / "x", over).fstype == "nfs"
    assert find_mount(mnt / "x", under).fstype == "ext4"


def test_trailing_slash_on_a_mountpoint_does_not_matter(tmp_path: Path) -> None:
    mnt = tmp_path.resolve()
    table = [ROOT, MountEntry(str(mnt) + "/", "nfs4", "srv:/")]
    assert find_mount(mnt / "x", table).fstype == "nfs4"


def test_a_missing_path_is_judged_by_its_real_existing_ancestor(tmp_path: Path) -> None:
    base = tmp_path.resolve()
    share = base / "share"
    share.mkdir()
    (base / "link").symlink_to(share)
    table = [ROOT, MountEntry(str(share), "nfs4", "server:/export")]
    with pytest.raises(UnsafeCacheLocation):
        check_not_network(base / "link" / "not" / "yet", table)
    assert not (share / "not").exists()


def test_a_path_outside_every_mount_is_refused() -> None:
    with pytest.raises(UnsafeCacheLocation) as info:
        find_mount("/somewhere", [MountEntry("/mnt/data", "ext4", "/dev/sdb1")])
    assert info.value.fstype == "unknown"


def test_a_symlinked_cache_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    link = tmp_path / "dbguard-alice"
    link.symlink_to(real)
    with pytest.raises(UnsafeCacheLocation) as info:
        prepare_cache_dir(link, LOCAL_TABLE)
    assert "symlink" in str(info.value)
    assert str(real) in str(info.value)
    assert info.value.fstype == "ext4"


def test_a_dangling_symlink_is_refused_and_its_target_not_created(tmp_path: Path) -> None:
    link = tmp_path / "cache"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(UnsafeCacheLocation, match="symlink"):
        prepare_cache_dir(link, LOCAL_TABLE)
    assert not (tmp_path / "target").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another uid")
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    target.mkdir(mode=0o700)
    os.chown(target, 12345, 12345)
    with pytest.raises(UnsafeCacheLocation) as info:
        prepare_cache_dir(target, LOCAL_TABLE)
    assert "12345" in str(info.value)
    assert _mode(target) == 0o700  # left alone, not "fixed"


def test_a_regular_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    target.write_bytes(b"")
    with pytest.raises(UnsafeCacheLocation, match="not a directory"):
        prepare_cache_dir(target, LOCAL_TABLE)


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o750, 0o701, 0o500])
def test_loose_permissions_are_tightened_to_0700(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "cache"
    target.mkdir()
    os.chmod(target, mode)
    prepare_cache_dir(target, LOCAL_TABLE)
    assert _mode(target) == 0o700


def test_default_cache_dir_honours_dbguard_cache() -> None:
    assert default_cache_dir({"DBGUARD_CACHE": "/scratch/me"}) == Path("/scratch/me")


@pytest.mark.parametrize("environ", [{}, {"DBGUARD_CACHE": ""}])
def test_default_cache_dir_is_per_user_in_tmp(environ: dict[str, str]) -> None:
    path = default_cache_dir(environ)
    assert path.parent == Path("/tmp")
    assert path.name.startswith("dbguard-")
    assert len(path.name) > len("dbguard-")


@pytest.mark.parametrize(
    "error",
    [
        UnsafeCacheLocation("/home/u/.c", "nfs4", "srv:/export", "/home", "is on nfs4: fix it"),
        CacheCorrupt("/tmp/dbguard-u/projects/p", "InvalidError: not an LMDB file"),
    ],
)
def test_errors_pickle_round_trip(error: CacheError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_corrupt_message_says_what_to_do() -> None:
    message = str(CacheCorrupt("/tmp/c/projects/p", "bad"))
    assert "/tmp/c/projects/p" in message
    assert "dbguard clear" in message
    assert "move the directory aside" in message


def test_the_real_mount_table_holds_tmp_path(tmp_path: Path) -> None:
    table = mount_table()
    assert table
    entry = find_mount(tmp_path)
    assert entry in table
    real = os.path.realpath(tmp_path)
    assert real == entry.mountpoint or real.startswith(entry.mountpoint.rstrip("/") + "/")
