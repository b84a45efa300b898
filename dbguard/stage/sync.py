"""Copying a deployment back to the share (`dbguard sync`, the agent's periodic sync, the last
sync of `undeploy`), fenced.

What changed since the last sync (by size and modification time), what was created and what was
deleted is carried over; files are published one by one (copying.copy_file: temporary name,
fsync, rename), so a reader on another host sees each file old or new, never torn. Before each
publication the sync checks that no newer token has fenced the project store (`Fence`): a host
whose lease was broken and that wakes up mid-sync publishes nothing more, and what it had not
synced stays in its deployment (`dbguard recover` lists it).

What the sync has done is written down as it goes (records.LocalState), so a sync killed part
way leaves every file on the share old or new, and the next one carries on from there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dbguard.data.project import Project
from dbguard.data.store import ProjectStore
from dbguard.errors import GuardError, IntegrityError, UsageError, share_failure
from dbguard.stage import copying, records
from dbguard.stage.records import LocalState
from dbguard.stage.tree import MARKER, TEMP_PREFIX, Item, inside, scan

# Small files are copied several at a time: on a network mount each costs round trips, not bytes.
_SMALL = 8 << 20
_PARALLEL = 8
_SAVE_EVERY = 1.0  # seconds between writes of the local state during a long sync

Progress = Callable[[int, int], None]  # bytes done, bytes in all


class Fence:
    """Whether this host may still publish to the project under ``token``: one stat of the next
    manifest's name per check while nothing new was published (a newer holder's acquire
    publishes one at once, `ProjectStore.fence`), and ``lease_check``, this host's own view of
    its lease (raising LeaseLost once its agent knows the lease is gone)."""

    def __init__(self, project: Project, token: int, lease_check: Callable[[], object]) -> None:
        self.store = ProjectStore(project.path, project.id)
        self.token = token
        self._lease_check = lease_check
        self._lock = threading.Lock()
        manifest = self.store.latest()
        self.store.check_token(manifest, token)  # raises Fenced
        self._generation = manifest.generation

    def check(self) -> None:
        self._lease_check()
        # The stat outside the lock: eight copying threads must not queue behind one round trip.
        if not self.store.manifest_path(self._generation + 1).exists():
            return
        with self._lock:
            manifest = self.store.latest()  # this host's own flush, or a newer holder's fence
            self.store.check_token(manifest, self.token)
            self._generation = max(self._generation, manifest.generation)


@dataclass
class SyncResult:
    copied: int = 0
    bytes: int = 0
    deleted: int = 0
    links: int = 0
    recorded_links: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # folders deleted here that hold others' files
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "copied": self.copied,
            "bytes": self.bytes,
            "deleted": self.deleted,
            "links": self.links,
            "recorded_links": self.recorded_links,
            "kept": self.kept,
            "seconds": round(self.seconds, 3),
        }


def mark_folder(path: Path, state: LocalState) -> None:
    """Write the deployment's marker into its folder (once), and keep its id in the state."""
    if not state.dir_id:
        state.dir_id = uuid.uuid4().hex
    marker = path / MARKER
    if not marker.exists():
        marker.write_text(f"{state.dir_id}\ndbguard: this folder is a deployment of {state.path}\n")


def _folder_id(path: Path) -> str:
    try:
        return (path / MARKER).read_text().split("\n", 1)[0]
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return ""


def check_folder(state: LocalState) -> None:
    """Refuse to sync from a folder that is not the one deployed: missing, or made again at the
    same path (every file would look deleted, and be deleted on the share)."""
    deployment = Path(state.dir)
    if not state.dir_id or _folder_id(deployment) != state.dir_id:
        raise IntegrityError(
            f"{deployment} is not the folder {state.path} was deployed to (it is missing or was made "
            "again): nothing was synced, so nothing on the share was deleted. If its work is "
            "elsewhere, copy it to the share by hand; `dbguard undeploy --discard` then ends the deployment",
            path=str(deployment),
        )
    if state.state == "removing":
        raise UsageError(f"{deployment} is being removed by undeploy: run `dbguard undeploy` again")


def _remove_leftovers(share: Path, state: LocalState) -> None:
    """The temporary files a sync cut short left in the folders it syncs (never a published
    name: they all start with TEMP_PREFIX)."""
    folders = {""} | {path for path, (item, _) in state.synced.items() if item.kind == "dir"}
    for folder in sorted(folders):
        directory = inside(share, folder) if folder else share
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(directory):
                if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


def pending(state: LocalState) -> tuple[list[str], list[str]]:
    """What a sync would do now: the paths changed or created in the deployment, and the paths
    deleted from it, since the last sync."""
    current = scan(Path(state.dir))
    synced = state.tree()
    changed = sorted(p for p, item in current.items() if not item.same_content(synced.get(p)))
    deleted = sorted(p for p in synced if p not in current)
    return changed, deleted


def sync(
    cache_root: Path,
    state: LocalState,
    lease_check: Callable[[], object],
    *,
    progress: Progress | None = None,
) -> SyncResult:
    """Carry what changed in ``state.dir`` over to the share (see the module docstring);
    ``lease_check`` raises once this host's lease is known to be gone (see `Fence`)."""
    started = time.monotonic()
    project = Project(state.project, Path(state.path))
    share, deployment = Path(state.path), Path(state.dir)
    then = (
        "nothing was lost: every file on the share is whole (old or new) and the deployment is "
        "untouched; fix the share and run `dbguard sync` again to finish"
    )
    check_folder(state)
    fence = Fence(project, state.token, lease_check)
    current = scan(deployment)
    synced = state.synced
    changed = {p: item for p, item in current.items() if not item.same_content(synced.get(p, (None, 0))[0])}
    deleted = [p for p in synced if p not in current]
    result = SyncResult()
    total = sum(item.size for item in changed.values() if item.kind == "file")
    done = [0]
    lock = threading.Lock()
    last_save = [time.monotonic()]

    def note(path: str, item: Item, crc: int) -> None:
        with lock:
            synced[path] = (item, crc)
            if time.monotonic() - last_save[0] >= _SAVE_EVERY:
                last_save[0] = time.monotonic()
                records.write_local(cache_root, state)

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                done[0] += n
                progress(done[0], total)

    links = records.read_links(share)
    links_before = dict(links)
    try:
        if state.syncing:
            fence.check()
            _remove_leftovers(share, state)
        state.syncing = True
        records.write_local(cache_root, state)
        # Deletions first, deepest first: a folder is empty of what we had in it before it goes,
        # and a path that changed kind (a folder that became a file) is free for its new self.
        kind_changed = [p for p in changed if p in synced and synced[p][0].kind != changed[p].kind]
        for path in sorted({*deleted, *kind_changed}, key=lambda p: (p.count("/"), p), reverse=True):
            old_item = synced[path][0]
            try:
                copying.remove(inside(share, path), old_item, before_publish=fence.check)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                result.kept.append(path)  # it holds files this host never had: left as it is
            links.pop(path, None)
            with lock:
                synced.pop(path, None)
            if path in deleted:
                result.deleted += 1
        for path in sorted(p for p, item in changed.items() if item.kind == "dir"):
            copying.make_dir(inside(share, path), changed[path], before_publish=fence.check)
            note(path, changed[path], 0)
        files = sorted(p for p, item in changed.items() if item.kind == "file")

        def copy(path: str) -> None:
            item = changed[path]
            source, target = inside(deployment, path), inside(share, path)
            try:
                crc = copying.copy_file(source, target, item, before_publish=fence.check, progress=advance)
            except FileNotFoundError:
                if source.exists() or source.is_symlink():
                    raise
                return  # deleted from the deployment since the scan: the next sync says so
            note(path, item, crc)
            with lock:
                result.copied += 1
                result.bytes += item.size

        small = [p for p in files if changed[p].size < _SMALL]
        large = [p for p in files if changed[p].size >= _SMALL]
        with concurrent.futures.ThreadPoolExecutor(_PARALLEL) as pool:
            for future in [pool.submit(copy, p) for p in small]:
                future.result()
        for path in large:
            copy(path)
        for path in sorted(p for p, item in changed.items() if item.kind == "link"):
            item = changed[path]
            target = inside(share, path)
            if copying.make_link(target, item, before_publish=fence.check):
                links.pop(path, None)
            else:  # the share holds no symlinks: keep it in the record, and no stale file there
                fence.check()
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                links[path] = item.target
                result.recorded_links.append(path)
            note(path, item, 0)
            result.links += 1
        if links != links_before:
            fence.check()
            records.write_links(share, links)
        if changed or deleted or not records.tree_numbers(share):
            fence.check()
            records.publish_tree(share, synced, state.token)
    except OSError as exc:
        raise share_failure(share, exc, then) from exc
    except ValueError as exc:  # a path of the share under a symbolic link there (`inside`)
        raise IntegrityError(
            f"cannot sync into {share}: {exc}. A folder of the deployment is a symbolic link on the "
            "share: make it a folder there (or a link here), then run `dbguard sync` again",
            path=str(share),
        ) from exc
    except GuardError:
        raise
    else:
        state.syncing = False
        state.last_sync = time.time()
    finally:
        records.write_local(cache_root, state)
    result.seconds = time.monotonic() - started
    return result
