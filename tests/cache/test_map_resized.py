"""A process whose map another process grew adopts the new size instead of failing.

LMDB refuses every new transaction with MDB_MAP_RESIZED once another process has written past
the end of this process's map, until this process adopts the new size. A writer appending
gigabytes grows the cache's map over and over while the agent flushes and reads dirty counts;
tools/bench_memory.py found the agent dying of that error (its flush opening the environment,
its dirty count reading it), and its heartbeat thread can die of it too.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from dbguard.cache import CacheStore
from dbguard.cache import store as cache_store

MiB = 1 << 20
CHUNK = np.ones(MiB // 8, dtype=np.float64)  # 1 MiB per record


def _grow(root: str, records: int) -> None:
    with CacheStore(Path(root), "p", map_size=1 * MiB) as store:
        for index in range(records):
            store.put("x", 100 + index, CHUNK)


def _grow_in_another_process(root: Path, records: int) -> None:
    worker = multiprocessing.get_context("spawn").Process(target=_grow, args=(str(root), records))
    worker.start()
    worker.join(timeout=60)
    assert worker.exitcode == 0


def test_an_open_store_reads_notes_and_dirty_bytes_after_another_process_grew_the_map(
    tmp_path: Path,
) -> None:
    with CacheStore(tmp_path, "p", map_size=1 * MiB) as mine:
        mine.put("x", 0, CHUNK)
        mine.note(store_generation=7)
        before = mine.dirty_bytes()
        _grow_in_another_process(tmp_path, 40)
        assert mine.noted("store_generation") == 7
        assert CacheStore.dirty_bytes_of(tmp_path, "p") > 40 * before
        with mine.reader() as reader:
            np.testing.assert_array_equal(reader.array("x", 139), CHUNK)
        mine.put("x", 1, CHUNK)
        assert mine.count("x") == 140


def test_dirty_bytes_of_a_closed_store_after_another_process_grew_the_map(tmp_path: Path) -> None:
    with CacheStore(tmp_path, "p", map_size=1 * MiB) as mine:
        mine.put("x", 0, CHUNK)
        single = mine.dirty_bytes()
    _grow_in_another_process(tmp_path, 40)
    assert CacheStore.dirty_bytes_of(tmp_path, "p") == 41 * single


def test_an_environment_opens_with_room_for_a_writer_to_grow_meanwhile(tmp_path: Path) -> None:
    _grow_in_another_process(tmp_path, 20)
    path = tmp_path / "projects" / "p"
    # lmdb.open begins a transaction at once: with a map of just the file's size, a writer
    # appending anything in between would have it refused.
    env = cache_store._open_env(path, 1 * MiB, readonly=True)
    try:
        assert env.info()["map_size"] >= 2 * (path / "data.mdb").stat().st_size
    finally:
        env.close()
