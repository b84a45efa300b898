"""The data path under faults: kill -9 mid-flush, a full filesystem, stale tokens, racing flushers.

Everything is real: LMDB caches, segment and manifest files, separate processes, a tmpfs that
really runs out of space. No broker is involved: the library is called with a token, as the
agent calls it once the broker granted one.

Child processes come from a multiprocessing *forkserver* that has imported numpy, LMDB and
dbguard once: every child is still a fresh process (forked from a server that never opened an
LMDB environment, so nothing is shared with pytest's process), but starting one takes
milliseconds instead of the half second of a new interpreter, which is what lets many kill
trials fit in a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.context import ForkServerContext
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from dbguard.cache import CacheStore, prepare_cache_dir
from dbguard.data.flushing import flush_project, list_aside, verify_cache_in_store
from dbguard.data.project import Project
from dbguard.data.project import init as init_project
from dbguard.data.store import PendingRecord, ProjectStore, record_crc
from dbguard.errors import Fenced, GuardError
from tests.support import small_tmpfs

ON_CI = os.environ.get("CI") == "true"
SIDES = (64, 96, 128, 192, 256)  # float32 images of 16 KiB to 256 KiB
Key = tuple[str, int]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Put:
    db: str
    index: int
    array: NDArray[np.float32]
    attrs: bytes

    @property
    def crc(self) -> int:
        # What the store records for it: flush_project stores the attrs text, "{}" if empty.
        return record_crc(self.array.tobytes(), self.attrs.decode() or "{}")


def round_records(seed: int, rnd: int) -> list[Put]:
    """The records written in round ``rnd`` of a run: a few dozen new ones in round 0, then some
    new ones and some rewrites of earlier ones (so later segments override earlier ones)."""
    rng = np.random.default_rng([seed, rnd])
    if rnd == 0:
        keys = [("images", i) for i in range(16)] + [("masks", i) for i in range(8)]
    else:
        fresh = [("images", 16 + 4 * (rnd - 1) + j) for j in range(4)] + [("masks", 8 + rnd - 1)]
        rewrites = [("images", int(i)) for i in rng.choice(16, size=3, replace=False)]
        keys = fresh + rewrites + [("masks", int(rng.integers(8)))]
    puts = []
    for db, index in keys:
        side = int(rng.choice(SIDES))
        array = rng.standard_normal((side, side), dtype=np.float32)
        attrs = json.dumps({"round": rnd, "index": index}).encode()
        puts.append(Put(db, index, array, attrs))
    return puts


def put_round(cache_root: Path, project_id: str, puts: list[Put]) -> None:
    with CacheStore(cache_root, project_id) as cache:
        for db in sorted({p.db for p in puts}):
            cache.put_many(db, [(p.index, p.array, p.attrs) for p in puts if p.db == db])


# --------------------------------------------------------------------------- child processes


class _Log:
    """Lines a child appends to a file with single write(2) calls: whatever was written before
    a SIGKILL is there afterwards, whole."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def say(self, *words: object) -> None:
        os.write(self._fd, (" ".join(str(w) for w in words) + "\n").encode())


def _logged(log_path: str, body: Callable[[_Log], None]) -> None:
    log = _Log(log_path)
    try:
        body(log)
    except BaseException:
        log.say("error", json.dumps(traceback.format_exc()))
        raise


def child_fill_and_flush(
    cache_root: str, project_dir: str, project_id: str, token: int, seed: int, rounds: int, log_path: str
) -> None:
    """Fill the cache round by round and flush after each round; say how far it got."""

    def body(log: _Log) -> None:
        project = Project(project_id, Path(project_dir))
        log.say("ready")
        for rnd in range(rounds):
            put_round(Path(cache_root), project_id, round_records(seed, rnd))
            log.say("put", rnd)
            result = flush_project(Path(cache_root), project, token)
            log.say("flushed", rnd, result.generation)
        log.say("finished")

    _logged(log_path, body)


def child_flush(cache_root: str, project_dir: str, project_id: str, token: int, log_path: str) -> None:
    def body(log: _Log) -> None:
        result = flush_project(Path(cache_root), Project(project_id, Path(project_dir)), token)
        log.say("flushed", result.generation, result.records)

    _logged(log_path, body)


def child_racing_flusher(
    cache_root: str,
    project_dir: str,
    project_id: str,
    token: int,
    rounds: int,
    wait_for_token: int,
    log_path: str,
) -> None:
    """Flush one small new record per round under ``token`` and log every outcome, until the
    store refuses the token; then keep trying at the store itself (no cache involved) for the
    rest of the rounds, each attempt racing the newer flusher's publishes.

    With ``wait_for_token``, start only once the store has a generation with that token (so the
    older flusher has published before the newer one begins, and is still flushing).
    """

    def body(log: _Log) -> None:
        root, project = Path(cache_root), Project(project_id, Path(project_dir))
        store = ProjectStore(project.path, project_id)
        deadline = time.monotonic() + 60
        while wait_for_token and store.latest().token != wait_for_token:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no generation with token {wait_for_token} appeared")
            time.sleep(0.002)
        log.say("start")
        fenced = False
        for rnd in range(rounds):
            array = np.full((32, 32), token * 1000 + rnd, dtype=np.float32)
            attrs = f'{{"r": {rnd}}}'
            try:
                if not fenced:
                    with CacheStore(root, project_id) as cache:
                        cache.put(f"t{token}", rnd, array, attrs.encode())
                    result = flush_project(root, project, token)
                else:
                    record = PendingRecord(
                        f"t{token}", rnd, array.dtype.str, array.shape, array.tobytes(), attrs
                    )
                    result = store.flush([record], token=token)
            except Fenced as exc:
                fenced = True
                log.say("fenced", rnd, exc.current)
            except Exception as exc:
                log.say("failed", json.dumps(f"round {rnd}: {type(exc).__name__}: {exc}"))
            else:
                log.say("ok", rnd, result.generation)

    _logged(log_path, body)


@pytest.fixture(scope="module")
def forkserver() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    # Imported once in the server; then each child starts in milliseconds.
    context.set_forkserver_preload([__name__])
    return context


def read_log(path: Path) -> list[list[str]]:
    """Each line as [word, arguments...]; an error line as [word, its JSON text]."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        lines.append([word, rest] if word in ("error", "failed") else [word, *rest.split()])
    return lines


def log_errors(path: Path) -> str:
    return "\n".join(json.loads(line[1]) for line in read_log(path) if line[0] == "error")


def wait_for_line(
    path: Path, word: str, process: multiprocessing.process.BaseProcess, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not any(line[0] == word for line in read_log(path)):
        if not process.is_alive():
            raise AssertionError(f"child exited with {process.exitcode} before {word!r}:\n{log_errors(path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"child did not say {word!r} within {timeout}s")
        time.sleep(0.002)


def run_child(
    context: ForkServerContext, target: Callable[..., None], *args: object, timeout: float = 60
) -> int:
    process = context.Process(target=target, args=args)
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f"{target.__name__} did not finish within {timeout}s")
    assert process.exitcode is not None
    return process.exitcode


# --------------------------------------------------------------------------- checks


def check_store_whole(store: ProjectStore) -> dict[Key, int]:
    """The newest generation opens, verifies, and every record in it matches its checksum;
    return its records' checksums."""
    manifest = store.latest()
    problems = list(store.verify())
    assert problems == [], f"generation {manifest.generation} does not verify: {problems}"
    live = store.live_entries(manifest)
    for entry in live.values():
        payload = store.read_payload(entry)  # raises IntegrityError on a checksum mismatch
        assert record_crc(payload, entry.attrs) == entry.crc
    return {key: entry.crc for key, entry in live.items()}


def strays(store: ProjectStore) -> tuple[list[str], list[str]]:
    """(temporary manifests, segments no manifest names): debris that a crash may leave behind.
    Neither is ever read; both are allowed after a kill."""
    referenced: set[str] = set()
    for generation in store.generations():
        referenced |= set(store.read_manifest(generation).segments)
    try:
        temps = [n for n in os.listdir(store.manifests_dir) if n.startswith(".")]
        segments = [n for n in os.listdir(store.segments_dir) if n.removesuffix(".seg") not in referenced]
    except FileNotFoundError:
        return [], []
    return temps, segments


# --------------------------------------------------------------------------- a. kill -9


TRIALS = 80
ROUNDS = 4


@dataclass
class KillStats:
    phases: dict[str, int] = field(default_factory=dict)
    temp_manifests: int = 0
    orphan_segments: int = 0
    generations: list[int] = field(default_factory=list)

    def count(self, phase: str) -> None:
        self.phases[phase] = self.phases.get(phase, 0) + 1


def _phase(lines: list[list[str]]) -> str:
    """Where the child was when it died, from the last thing it said."""
    if not lines:
        return "starting"
    last = lines[-1][0]
    return {"ready": "filling", "put": "flushing", "flushed": "filling", "finished": "finished"}.get(
        last, last
    )


def _expected_versions(seed: int) -> dict[Key, dict[int, int]]:
    """key -> {checksum: round} for every version of every record a run writes."""
    versions: dict[Key, dict[int, int]] = {}
    for rnd in range(ROUNDS):
        for put in round_records(seed, rnd):
            versions.setdefault((put.db, put.index), {})[put.crc] = rnd
    return versions


def test_kill_9_at_random_points_never_tears_the_store_or_loses_a_finished_flush(
    forkserver: ForkServerContext, tmp_path: Path
) -> None:
    rng = random.Random(20240611)
    token = 3

    def paths(name: str) -> tuple[Path, Path, Path, str]:
        base = tmp_path / name
        project_dir = base / "project"
        project_dir.mkdir(parents=True)
        return (
            prepare_cache_dir(base / "cache"),
            project_dir,
            base / "child.log",
            init_project(project_dir).id,
        )

    # Calibration: one undisturbed run, under the machine's current load, says how long a run
    # takes, so the kill delays below spread over a whole run rather than a guess.
    cache_root, project_dir, log, project_id = paths("calibration")
    child = forkserver.Process(
        target=child_fill_and_flush,
        args=(str(cache_root), str(project_dir), project_id, token, 0, ROUNDS, str(log)),
    )
    child.start()
    wait_for_line(log, "ready", child, 60)
    began = time.monotonic()
    child.join(120)
    run_time = time.monotonic() - began
    assert child.exitcode == 0, log_errors(log)

    stats = KillStats()
    for trial in range(TRIALS):
        seed = 1000 + trial
        cache_root, project_dir, log, project_id = paths(f"trial-{trial:02d}")
        child = forkserver.Process(
            target=child_fill_and_flush,
            args=(str(cache_root), str(project_dir), project_id, token, seed, ROUNDS, str(log)),
        )
        child.start()
        wait_for_line(log, "ready", child, 60)
        time.sleep(rng.uniform(0, 1.1 * run_time))
        assert child.pid is not None
        with contextlib.suppress(ProcessLookupError):  # it may have finished its run already
            os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        lines = read_log(log)
        assert not any(line[0] == "error" for line in lines), f"trial {trial}: {log_errors(log)}"
        stats.count(_phase(lines))
        context = f"trial {trial} (seed {seed}), killed while {_phase(lines)}"

        # The store opens at a whole generation, at least as new as every flush that returned.
        store = ProjectStore(project_dir, project_id)
        manifest = store.latest()
        finished = [(int(line[1]), int(line[2])) for line in lines if line[0] == "flushed"]
        assert manifest.generation >= max((g for _, g in finished), default=0), context
        crcs = check_store_whole(store)
        # Nothing a returned flush wrote was lost or rolled back to an older version.
        versions = _expected_versions(seed)
        for key, crc in crcs.items():
            assert crc in versions[key], f"{context}: {key} holds data the child never wrote"
        for rnd, _ in finished:
            for put in round_records(seed, rnd):
                key = (put.db, put.index)
                assert key in crcs, f"{context}: {key}, flushed in round {rnd}, is gone"
                assert versions[key][crcs[key]] >= rnd, f"{context}: {key} went back to an older version"
        temps, orphans = strays(store)
        stats.temp_manifests += len(temps)
        stats.orphan_segments += len(orphans)

        # A new process flushes what the dead one left dirty, and then the store holds the cache.
        reflush_log = log.with_name("reflush.log")
        code = run_child(
            forkserver, child_flush, str(cache_root), str(project_dir), project_id, token, str(reflush_log)
        )
        assert code == 0, f"{context}: the re-flush failed:\n{log_errors(reflush_log)}"
        project = Project(project_id, project_dir)
        checked = verify_cache_in_store(cache_root, project).checked
        after = check_store_whole(store)
        assert checked == len(after), f"{context}: the cache has {checked} records, the store {len(after)}"
        assert CacheStore.dirty_bytes_of(cache_root, project_id) == 0, context
        stats.generations.append(store.latest().generation)
        shutil.rmtree(tmp_path / f"trial-{trial:02d}")

    summary = (
        f"{TRIALS} kills, a run takes {run_time:.2f}s; killed while {stats.phases}; left behind "
        f"{stats.temp_manifests} temporary manifests and {stats.orphan_segments} unreferenced segments "
        f"(allowed: never read); final generations {sorted(set(stats.generations))}"
    )
    print(summary)
    # The test proves something only if kills landed inside flushes, not just around them.
    assert stats.phases.get("flushing", 0) >= 5, summary


def test_a_cache_whose_creator_was_killed_before_its_first_commit_does_not_block_the_next_flush(
    forkserver: ForkServerContext, tmp_path: Path
) -> None:
    """kill -9 between LMDB creating ``data.mdb`` and writing its meta pages leaves an empty
    ``data.mdb``: an environment with no commit, so nothing dirty. The kill test above lands there
    now and then (a kill just after the child said "ready"); this test makes that state directly,
    as LMDB leaves it, so that it is checked on every run."""
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    project = init_project(project_dir)
    cache_root = prepare_cache_dir(tmp_path / "cache")
    environment = cache_root / "projects" / project.id
    environment.mkdir(parents=True)
    (environment / "data.mdb").touch()
    (environment / "lock.mdb").touch()

    log = tmp_path / "flush.log"
    code = run_child(forkserver, child_flush, str(cache_root), str(project_dir), project.id, 3, str(log))
    assert code == 0, f"flushing after the crash failed:\n{log_errors(log)}"
    assert ProjectStore(project.path, project.id).latest().generation == 0  # nothing to flush
    put_round(cache_root, project.id, round_records(5, 0))
    assert flush_project(cache_root, project, 3).generation == 1
    assert verify_cache_in_store(cache_root, project).checked == len(round_records(5, 0))


# --------------------------------------------------------------------------- b. full filesystem


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a project directory that really runs out of space."""
    with small_tmpfs(tmp_path / "tiny") as directory:
        yield directory


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_full_project_filesystem_fails_the_flush_cleanly_and_keeps_every_dirty_byte(
    tiny_filesystem: Path, tmp_path: Path
) -> None:
    project = init_project(tiny_filesystem)
    cache_root = prepare_cache_dir(tmp_path / "cache")
    store = ProjectStore(project.path, project.id)
    first = round_records(7, 0)[:4]
    put_round(cache_root, project.id, first)
    before = flush_project(cache_root, project, 1)
    assert before.generation == 1

    # Four 256x256 float32 images (1 MiB) to flush, and a filler that leaves less than that free.
    big = [
        Put("images", 100 + i, np.random.default_rng(i).standard_normal((256, 256), dtype=np.float32), b"")
        for i in range(4)
    ]
    dirty_size = sum(p.array.nbytes for p in big)
    filler = tiny_filesystem / "filler.bin"
    filler.write_bytes(b"\xff" * (_free_bytes(tiny_filesystem) - dirty_size // 2))
    assert _free_bytes(tiny_filesystem) < dirty_size
    put_round(cache_root, project.id, big)
    with CacheStore(cache_root, project.id) as cache:
        dirty_bytes, dirty_entries = cache.dirty_bytes(), cache.dirty_entries()
    assert dirty_bytes > dirty_size
    segments_before = sorted(os.listdir(store.segments_dir))
    manifests_before = sorted(os.listdir(store.manifests_dir))

    with pytest.raises(GuardError) as info:
        flush_project(cache_root, project, 1)
    message = str(info.value)
    assert not isinstance(info.value, Fenced)
    assert "no space" in message.lower(), message
    assert "free some space" in message.lower() and "dbguard flush" in message, message
    # The cache still has every dirty byte, marked dirty.
    with CacheStore(cache_root, project.id) as cache:
        assert cache.dirty_bytes() == dirty_bytes
        assert cache.dirty_entries() == dirty_entries
        for put in big:
            assert np.array_equal(cache.get(put.db, put.index), put.array)
    # The store is still at the previous whole generation; the half-written segment is gone.
    assert store.latest().generation == before.generation
    assert check_store_whole(store) == {(p.db, p.index): p.crc for p in first}
    assert sorted(os.listdir(store.segments_dir)) == segments_before
    assert sorted(os.listdir(store.manifests_dir)) == manifests_before

    filler.unlink()
    after = flush_project(cache_root, project, 1)
    assert after.generation == before.generation + 1 and after.records == len(big)
    assert verify_cache_in_store(cache_root, project).checked == len(first) + len(big)
    assert check_store_whole(store) == {(p.db, p.index): p.crc for p in first + big}


def test_running_out_of_space_while_publishing_leaves_store_cache_and_disk_as_they_were(
    tiny_filesystem: Path, tmp_path: Path
) -> None:
    """The segment fits, to the page, and the manifest that would publish it does not."""
    project = init_project(tiny_filesystem)
    cache_root = prepare_cache_dir(tmp_path / "cache")
    store = ProjectStore(project.path, project.id)
    first = round_records(9, 0)[:2]
    put_round(cache_root, project.id, first)
    before = flush_project(cache_root, project, 1)
    second = round_records(9, 1)

    # The segment these records make, measured by flushing them to a scratch project elsewhere:
    # its bytes depend only on the records.
    scratch = init_project(Path(tempfile.mkdtemp(dir=tmp_path)))
    scratch_cache = prepare_cache_dir(tmp_path / "scratch-cache")
    put_round(scratch_cache, scratch.id, second)
    measured = flush_project(scratch_cache, scratch, 1)
    assert measured.segment is not None
    segment_size = os.path.getsize(ProjectStore(scratch.path, scratch.id).segment_path(measured.segment))
    page = os.statvfs(tiny_filesystem).f_frsize
    filler = tiny_filesystem / "filler.bin"
    filler.write_bytes(b"\xff" * (_free_bytes(tiny_filesystem) - -(-segment_size // page) * page))

    put_round(cache_root, project.id, second)
    with CacheStore(cache_root, project.id) as cache:
        dirty_bytes, dirty_entries = cache.dirty_bytes(), cache.dirty_entries()
    segments_before = sorted(os.listdir(store.segments_dir))
    manifests_before = sorted(os.listdir(store.manifests_dir))
    with pytest.raises(GuardError) as info:
        flush_project(cache_root, project, 1)
    assert "no space" in str(info.value).lower(), str(info.value)
    with CacheStore(cache_root, project.id) as cache:
        assert (cache.dirty_bytes(), cache.dirty_entries()) == (dirty_bytes, dirty_entries)
    assert store.latest().generation == before.generation
    assert check_store_whole(store) == {(p.db, p.index): p.crc for p in first}
    assert sorted(os.listdir(store.segments_dir)) == segments_before, "the unpublished segment was left"
    left = sorted(os.listdir(store.manifests_dir))

    filler.unlink()
    after = flush_project(cache_root, project, 1)
    assert after.generation == before.generation + 1
    assert verify_cache_in_store(cache_root, project).checked == len(
        {(p.db, p.index) for p in first + second}
    )
    # A failed flush cleans up after itself: every retry on a full disk must not add debris.
    assert left == manifests_before, f"a failed publish left {sorted(set(left) - set(manifests_before))}"


# --------------------------------------------------------------------------- c. stale token


def test_a_flush_with_an_older_token_is_fenced_and_its_data_set_aside(tmp_path: Path) -> None:
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    project = init_project(project_dir)
    cache_root = prepare_cache_dir(tmp_path / "cache")
    store = ProjectStore(project.path, project.id)
    earlier = round_records(11, 0)[:6]
    put_round(cache_root, project.id, earlier)
    assert flush_project(cache_root, project, 4).generation == 1

    fence = store.fence(5, {"host": "successor"})
    assert (fence.generation, fence.token) == (2, 5)
    late = round_records(11, 1)
    put_round(cache_root, project.id, late)
    dirty = CacheStore.dirty_bytes_of(cache_root, project.id)
    assert dirty > 0

    with pytest.raises(Fenced) as info:
        flush_project(cache_root, project, 4)
    assert (info.value.token, info.value.current) == (4, 5)
    assert "successor" in str(info.value) and "dbguard recover" in str(info.value)
    latest = store.latest()
    assert (latest.generation, latest.token) == (2, 5)
    assert store.generations() == [1, 2]
    assert check_store_whole(store) == {(p.db, p.index): p.crc for p in earlier}

    # The lost lease's data is kept aside, whole, and no longer in the live cache.
    assert not CacheStore.exists(cache_root, project.id)
    [aside] = list_aside(cache_root)
    assert (aside.project, aside.dirty_bytes) == (project.id, dirty)
    expected = {(p.db, p.index): p for p in earlier}
    expected.update({(p.db, p.index): p for p in late})
    with CacheStore(aside.path, project.id, create=False) as kept:
        assert kept.dirty_bytes() == dirty
        for (db, index), put in expected.items():
            assert np.array_equal(kept.get(db, index), put.array)
            assert kept.attrs(db, index) == put.attrs


def test_two_fenced_flushes_in_one_second_are_both_kept_aside(tmp_path: Path) -> None:
    """A host that lost its lease may be refused twice within one second (the agent's periodic
    flush, then `dbguard release`); the data of each refused flush must be kept aside."""
    for attempt in range(5):
        project_dir = tmp_path / f"attempt-{attempt}" / "project"
        project_dir.mkdir(parents=True)
        project = init_project(project_dir)
        cache_root = prepare_cache_dir(tmp_path / f"attempt-{attempt}" / "cache")
        ProjectStore(project.path, project.id).fence(5)
        second = time.strftime("%Y%m%dT%H%M%S")
        kept: list[int] = []
        for rnd in range(2):
            put_round(cache_root, project.id, round_records(13, rnd))
            kept.append(CacheStore.dirty_bytes_of(cache_root, project.id))
            with pytest.raises(Fenced):
                flush_project(cache_root, project, 4)
        if time.strftime("%Y%m%dT%H%M%S") == second:
            break  # both refusals fell in one second, the case this test is about
    assert sorted(a.dirty_bytes for a in list_aside(cache_root)) == sorted(kept)


# --------------------------------------------------------------------------- d. racing tokens


def test_racing_flushers_never_publish_the_older_token_after_the_newer_one(
    forkserver: ForkServerContext, tmp_path: Path
) -> None:
    """Two hosts, each with its own cache, flush one store under tokens 7 and 8. The older one
    starts first and flushes back to back; the newer one starts once the older one has published,
    so the older one is mid-flush when the newer one's first generation lands. Repeated on fresh
    stores, so that the boundary between the two is raced several times."""
    races, summary = 6, []
    for race in range(races):
        base = tmp_path / f"race-{race}"
        project_dir = base / "project"
        project_dir.mkdir(parents=True)
        project = init_project(project_dir)
        store = ProjectStore(project.path, project.id)
        logs = {token: base / f"flusher-{token}.log" for token in (7, 8)}
        plan = {7: (200, 0), 8: (30, 7)}  # token: (rounds, start once this token has published)
        children = {
            token: forkserver.Process(
                target=child_racing_flusher,
                args=(
                    str(prepare_cache_dir(base / f"cache-{token}")),
                    str(project_dir),
                    project.id,
                    token,
                    rounds,
                    wait_for,
                    str(logs[token]),
                ),
            )
            for token, (rounds, wait_for) in plan.items()
        }
        for child in children.values():
            child.start()
        for child in children.values():
            child.join(120)
        for token, child in children.items():
            assert child.exitcode == 0, f"race {race}, flusher {token}: {log_errors(logs[token])}"
        outcome = {token: read_log(path) for token, path in logs.items()}

        by_generation = {g: store.read_manifest(g).token for g in store.generations()}
        tokens = list(by_generation.values())
        assert set(tokens) == {7, 8}, f"race {race}: {tokens}"
        first_8 = tokens.index(8)
        assert 7 not in tokens[first_8:], f"race {race}: token 7 published after token 8: {tokens}"
        check_store_whole(store)
        # Every flush that returned is in the store, under its own token, and the older
        # flusher's returned only before the newer one's first generation.
        for token, lines in outcome.items():
            for line in (line for line in lines if line[0] == "ok"):
                generation = int(line[2])
                assert by_generation[generation] == token, f"race {race}, flusher {token}: {line}"
                assert token == 8 or generation <= first_8, f"race {race}: {line} after {first_8 + 1}"
        # The newer flusher never fails; the older one is refused, only ever with Fenced.
        assert [line for line in outcome[8] if line[0] not in ("start", "ok")] == [], f"race {race}"
        refused = [line for line in outcome[7] if line[0] != "ok" and line[0] != "start"]
        assert refused and all(line[0] == "fenced" for line in refused), f"race {race}: {refused}"
        summary.append(f"{tokens.count(7)}x7 then {tokens.count(8)}x8, {len(refused)} refused")
    print("; ".join(summary))
