"""Deploying a project folder to a node's local disk and taking it back (`dbguard deploy`,
`undeploy`), under the writer lease. The caller (dbguard.api) holds the lease; this module
copies, checks and writes the records down.

Deploy copies the project's files (never `.dbguard/`) into DIR, which must be on a local disk
(the cache's check: invariant 6), re-creates symbolic links (those on the share, and those the
share could not hold, from `.dbguard/symlinks.json`), and writes the deployment record on the
share, which `status` shows on every host. Run again, it carries on where an interrupted deploy
stopped. Undeploy makes the last sync, reads every synced file back from the share past the page
cache and matches it with the CRC-32 taken from DIR, and only then removes DIR.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

from dbguard.cache import UnsafeCacheLocation, check_not_network
from dbguard.data.project import Project
from dbguard.errors import (
    IntegrityError,
    ProjectBusy,
    UnflushedData,
    UnsafeCachePath,
    UsageError,
    share_failure,
)
from dbguard.stage import copying, records
from dbguard.stage.records import LocalState
from dbguard.stage.sync import Progress, SyncResult, mark_folder, pending, sync
from dbguard.stage.tree import Item, inside, scan

_PARALLEL = 8
_SMALL = 8 << 20


def check_local(directory: Path) -> None:
    """A deployment holds the only copy of new work: never on a network filesystem."""
    try:
        check_not_network(directory)
    except UnsafeCacheLocation as exc:
        raise UnsafeCachePath(
            f"cannot deploy to {directory}: it is on {exc.fstype} ({exc.mount_source} mounted at "
            f"{exc.mountpoint}), and a deployment holds the only copy of new work. Deploy to a "
            "local disk of this node (such as /tmp or /scratch)",
            path=str(directory),
            fstype=exc.fstype,
        ) from None


def deploy(
    cache_root: Path,
    project: Project,
    directory: Path,
    token: int,
    *,
    host: str,
    user: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Copy ``project`` into ``directory`` (see the module docstring); what was copied."""
    directory = directory.absolute()
    share = project.path
    if directory == share or share in directory.parents or directory in share.parents:
        raise UsageError(f"deploy to a folder outside the project, not {directory}")
    state = records.read_local(cache_root, project.id)
    if state is not None and Path(state.dir) != directory:
        raise UsageError(
            f"{project.path} is deployed on this host to {state.dir} already: undeploy it first "
            f"(`dbguard undeploy {project.path}`)"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    check_local(directory.parent)
    if state is None:
        if directory.exists() and any(directory.iterdir()):
            raise UsageError(f"{directory} is not empty: deploy into a new or empty folder")
        state = LocalState(project.id, str(share), str(directory), token)
    elif state.state == "fenced":
        raise UsageError(
            f"this host's deployment of {project.path} in {state.dir} lost its lease with work not "
            "synced: see `dbguard recover`, then `dbguard undeploy --discard` to remove it"
        )
    elif state.state != "deploying":
        # Deployed already: the folder holds the work, newer than the share. Copying the share
        # in again would overwrite it.
        return {"project": project.id, "path": str(share), "dir": str(directory), "files": 0, "bytes": 0}
    state.token = token
    directory.mkdir(exist_ok=True)
    check_local(directory)
    mark_folder(directory, state)
    then = "nothing was changed on the share; run `dbguard deploy` again to carry on"

    def record(stage: str) -> None:
        records.write_deployment(share, host=host, user=user, directory=directory, token=token, state=stage)

    try:
        record("deploying")
        records.write_local(cache_root, state)
        copied, size = _copy_in(share, directory, state, cache_root, progress)
        state.state = "deployed"
        records.write_local(cache_root, state)
        record("deployed")
    except OSError as exc:
        raise share_failure(share, exc, then) from exc
    return {"project": project.id, "path": str(share), "dir": str(directory), "files": copied, "bytes": size}


def _copy_in(
    share: Path, directory: Path, state: LocalState, cache_root: Path, progress: Progress | None
) -> tuple[int, int]:
    tree = scan(share)
    # The last sync's record names what this host's listing of the share may not show yet (a
    # client's directory cache), and says what each file must hold.
    recorded = records.read_tree(share)
    for path, (item, _) in recorded.items():
        if path in tree or item.kind == "link":
            continue
        try:
            info = inside(share, path).lstat()  # a lookup by name: not from a stale listing
        except (ValueError, OSError):
            continue  # deleted since, or a record entry that points outside
        if item.kind == "dir" and stat.S_ISDIR(info.st_mode):
            tree[path] = item
        elif item.kind == "file" and stat.S_ISREG(info.st_mode):
            tree[path] = Item("file", max(info.st_size, item.size), item.mtime_ns, item.mode)
    for path, link in records.read_links(share).items():
        try:
            inside(share, path)
        except ValueError:
            continue  # a record entry that points outside: not ours to create
        tree.setdefault(path, Item("link", target=link))
    done_bytes = [0]
    total = sum(item.size for item in tree.values() if item.kind == "file")
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                done_bytes[0] += n
                progress(done_bytes[0], total)

    for path in sorted(p for p, item in tree.items() if item.kind == "dir"):
        copying.make_dir(inside(directory, path), tree[path])
        state.synced[path] = (tree[path], 0)
    before = state.tree()
    files = sorted(p for p, item in tree.items() if item.kind == "file")
    # What an interrupted deploy copied is written down with its CRC: the rest is to copy.
    wanted = [p for p in files if before.get(p) is None]
    for path in (p for p in files if p not in set(wanted)):
        advance(tree[path].size)  # copied by the deploy that was interrupted

    def copy(path: str) -> None:
        item = tree[path]
        source, target = inside(share, path), inside(directory, path)
        crc = copying.copy_file(source, target, item, progress=advance)
        expected = recorded.get(path)
        # By size, not modification time: a share may keep times to the second only.
        if expected is not None and expected[0].size == item.size and crc != expected[1]:
            # What this host's client served is not what was synced: read past its cache.
            crc = copying.copy_file(source, target, item, uncached=True)
            if crc != expected[1]:
                raise IntegrityError(
                    f"{source} does not hold what the last sync wrote there (CRC {crc}, not "
                    f"{expected[1]}): this host's mount of the share may be serving a stale copy. "
                    "Run `dbguard deploy` again in a minute; nothing was changed on the share",
                    path=str(source),
                )
        with lock:
            state.synced[path] = (target_item(target, item), crc)

    with concurrent.futures.ThreadPoolExecutor(_PARALLEL) as pool:
        for future in [pool.submit(copy, p) for p in wanted if tree[p].size < _SMALL]:
            future.result()
    for path in (p for p in wanted if tree[p].size >= _SMALL):
        copy(path)
        records.write_local(cache_root, state)
    for path in sorted(p for p, item in tree.items() if item.kind == "link"):
        try:
            target = inside(directory, path)
        except ValueError:
            continue  # a recorded link under another link: never followed out of the folder
        copying.make_link(target, tree[path])
        state.synced[path] = (tree[path], 0)
    return len(wanted), sum(tree[p].size for p in wanted)


def target_item(path: Path, item: Item) -> Item:
    """The item as the deployment has it: a sync compares the deployment with what it had."""
    info = path.lstat()
    return Item("file", info.st_size, info.st_mtime_ns, item.mode)


def processes_using(directory: Path) -> list[dict[str, Any]]:
    """Processes of this host with a file open, or their working directory, inside ``directory``;
    not this process nor those that started it (a job script that runs undeploy from there)."""
    found = []
    prefix = str(directory.resolve()) + os.sep
    mine = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    for process in psutil.process_iter(["pid", "name"]):
        if process.pid in mine:
            continue
        try:
            paths = [f.path for f in process.open_files()] + [process.cwd()]
        except (psutil.Error, OSError):
            continue
        if any(p == prefix[:-1] or p.startswith(prefix) for p in paths):
            found.append({"pid": process.info["pid"], "name": process.info["name"]})
    return found


def undeploy(
    cache_root: Path,
    project: Project,
    lease_check: Callable[[], object],
    *,
    force: bool = False,
    discard: bool = False,
    progress: Progress | None = None,
    on_sync: Callable[[SyncResult], None] | None = None,
) -> dict[str, Any]:
    """The last sync, the check of every synced file on the share, then DIR removed. The caller
    releases the lease afterwards. ``discard`` removes a deployment that can no longer sync (its
    lease lost, its folder gone) with whatever it holds."""
    state = records.read_local(cache_root, project.id)
    if state is None:
        raise UsageError(f"{project.path} is not deployed on this host")
    directory = Path(state.dir)
    if state.state == "fenced" and not discard:
        raise UsageError(
            f"this host lost the lease of {project.path} with work in {directory} not synced; it was "
            "kept (see `dbguard recover`). Copy out what you need, then `dbguard undeploy --discard` "
            "removes it"
        )
    users = processes_using(directory) if directory.exists() else []
    if users and not force:
        names = ", ".join(f"{u['name']} (pid {u['pid']})" for u in users)
        raise ProjectBusy(
            f"{directory} is in use by {names} on this host; stop them first, or undeploy with "
            "--force to sync what they wrote so far and undeploy anyway"
        )
    result: dict[str, Any] = {"project": project.id, "path": str(project.path), "dir": str(directory)}
    result["synced"], result["checked"] = None, 0
    if state.state in ("deployed", "removing") and not discard:
        state.state = "deployed"  # a removal that stopped half-way: sync what is left first
        synced = sync(cache_root, state, lease_check, progress=progress)
        if on_sync is not None:
            on_sync(synced)
        result["synced"] = synced.to_json()
        result["checked"] = _check_share(project.path, state)
        changed, deleted = pending(state)
        if changed or deleted:  # written while the check ran: sync and check again
            raise UnflushedData(
                f"{directory} changed during undeploy ({len(changed)} files, {len(deleted)} deleted): "
                "stop what writes there and run `dbguard undeploy` again; nothing was removed",
                project=str(project.path),
                unflushed=0,
            )
    elif state.state == "deploying" and not discard:
        pass  # an unfinished deploy: nothing in it is newer than the share
    # From here the folder goes: a sync must never again take its missing files for deletions.
    state.state = "removing"
    records.write_local(cache_root, state)
    try:
        if directory.exists():
            shutil.rmtree(directory)
    except OSError as exc:
        raise UsageError(
            f"could not remove {directory} ({exc.strerror}: {exc.filename}); everything in it is on "
            "the share. Remove it by hand and run `dbguard undeploy` again"
        ) from exc
    records.remove_local(cache_root, project.id)
    if state.state != "fenced":
        record = records.read_deployment(project.path)
        if record is not None and record["token"] == state.token:
            records.remove_deployment(project.path)
    result["removed"] = True
    return result


def _check_share(share: Path, state: LocalState) -> int:
    """Every synced file read back from the share past this host's page cache, matched with the
    CRC-32 taken from the deployment; IntegrityError naming the first that differs."""
    checked = 0
    links = records.read_links(share)
    for path, (item, crc) in sorted(state.synced.items()):
        target = inside(share, path)
        if item.kind == "file":
            try:
                found = copying.file_crc(target, uncached=True)
            except FileNotFoundError:
                found = None
            if found != crc:
                raise IntegrityError(
                    f"{target} on the share does not match what was synced from {state.dir} (CRC "
                    f"{found} instead of {crc}): the deployment is kept; run `dbguard sync` and "
                    "`dbguard undeploy` again",
                    path=str(target),
                )
            checked += 1
        elif (
            item.kind == "link"
            and not (target.is_symlink() and os.readlink(target) == item.target)
            and links.get(path) != item.target
        ):
            raise IntegrityError(
                f"the symbolic link {target} is missing on the share: the deployment is kept; "
                "run `dbguard sync` and `dbguard undeploy` again",
                path=str(target),
            )
    return checked
