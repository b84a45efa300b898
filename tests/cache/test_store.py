"""The per-project LMDB store: records, counters, dirty tracking, growth, damage."""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from cache import CacheCorrupt, CacheError, CacheStore, DirtyEntry, decode_record, encode_record

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CacheStore]:
    with CacheStore(tmp_path, "project-1") as s:
        yield s


def _sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> NDArray[Any]:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=shape) * 100
    if np.dtype(dtype).kind == "c":
        return (values + 1j * rng.normal(size=shape)).astype(dtype)
    return values.astype(dtype)


def _size(array: NDArray[Any], attrs: bytes = b"") -> int:
    return len(encode_record(array, attrs))


@pytest.mark.parametrize("shape", [(), (7,), (256, 256), (3, 4, 5)])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64", "complex64"])
def test_arrays_and_attrs_round_trip(store: CacheStore, dtype: str, shape: tuple[int, ...]) -> None:
    array = _sample(dtype, shape)
    attrs = json.dumps({"apix": 1.5, "ctf": [1, 2]}).encode()
    store.put("particles", 3, array, attrs)

    copy = store.get("particles", 3)
    assert copy.dtype == array.dtype and copy.shape == shape
    np.testing.assert_array_equal(copy, array)
    assert copy.flags.writeable
    assert store.attrs("particles", 3) == attrs

    with store.reader() as r:
        view = r.array("particles", 3)
        np.testing.assert_array_equal(view, array)
        assert not view.flags.writeable  # it points into the LMDB map


def test_non_contiguous_and_big_endian_arrays_keep_values_and_byte_order(
    store: CacheStore,
) -> None:
    transposed = np.arange(12, dtype=np.int32).reshape(3, 4).T
    big_endian = np.arange(5, dtype=">f8")
    store.put("x", 0, transposed)
    store.put("x", 1, big_endian)
    np.testing.assert_array_equal(store.get("x", 0), transposed)
    assert store.get("x", 1).dtype == np.dtype(">f8")
    np.testing.assert_array_equal(store.get("x", 1), big_endian)


def test_empty_arrays_round_trip(store: CacheStore) -> None:
    store.put("x", 0, np.zeros((0, 4), dtype=np.float32))
    assert store.get("x", 0).shape == (0, 4)


def test_object_arrays_are_refused(store: CacheStore) -> None:
    with pytest.raises(TypeError):
        store.put("x", 0, np.array([{"a": 1}], dtype=object))


def test_payload_offset_is_16_byte_aligned() -> None:
    for attrs in (b"", b"x", b"{}" * 37):
        for shape in ((), (3,), (2, 3, 4, 5, 6)):
            value = encode_record(np.zeros(shape, dtype=np.complex128), attrs)
            record = decode_record(value)
            assert (len(value) - record.data.nbytes) % 16 == 0
            assert record.attrs == attrs


@pytest.mark.parametrize("value", [b"", b"DBGC", b"XXXX" + bytes(40), encode_record(np.zeros(4))[:-1]])
def test_values_that_are_not_records_are_refused(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_record(value)


def test_large_records_are_read_aligned_in_memory(store: CacheStore) -> None:
    store.put("x", 0, np.ones((64, 64), dtype=np.complex128))
    with store.reader() as r:
        assert r.array("x", 0).flags.aligned


def test_missing_record_raises_key_error(store: CacheStore) -> None:
    with pytest.raises(KeyError):
        store.get("x", 0)


def test_append_hands_out_increasing_indexes_after_the_highest_written(
    store: CacheStore,
) -> None:
    assert [store.append("a", np.array([i])) for i in range(3)] == [0, 1, 2]
    assert store.count("a") == 3
    store.put("a", 9, np.array([9]))
    assert store.count("a") == 10
    assert store.append("a", np.array([10])) == 10
    assert store.count("b") == 0
    assert store.databases() == ["a"]


def test_put_many_writes_all_items(store: CacheStore) -> None:
    items = ((i, np.full(4, i, dtype=np.int16), f"{i}".encode()) for i in range(5))
    store.put_many("m", items)
    assert store.count("m") == 5
    assert store.attrs("m", 4) == b"4"
    np.testing.assert_array_equal(store.get("m", 2), np.full(4, 2, dtype=np.int16))


def test_dirty_bytes_tracks_puts_and_overwrites(store: CacheStore) -> None:
    small, big = np.zeros(10, np.uint8), np.zeros(1000, np.float64)
    store.put("a", 0, small, b"hdr")
    assert store.dirty_bytes() == _size(small, b"hdr")
    store.put("a", 0, big)
    assert store.dirty_bytes() == _size(big)
    store.put("a", 1, small)
    assert store.dirty_bytes() == _size(big) + _size(small)
    entries = store.dirty_entries()
    assert [(e.db, e.index, e.size) for e in entries] == [
        ("a", 0, _size(big)),
        ("a", 1, _size(small)),
    ]
    assert store.mark_flushed(entries) == store.dirty_bytes() + _size(big) + _size(small)
    assert store.dirty_bytes() == 0
    assert store.dirty_entries() == []


def test_mark_flushed_keeps_records_rewritten_after_the_snapshot_dirty(
    store: CacheStore,
) -> None:
    for i in range(3):
        store.put("a", i, np.zeros(8, np.uint8))
    snapshot = store.dirty_entries()
    rewritten = np.ones(100, np.uint8)
    store.put("a", 1, rewritten)

    cleaned = store.mark_flushed(snapshot)

    assert cleaned == 2 * _size(np.zeros(8, np.uint8))
    remaining = store.dirty_entries()
    assert [(e.db, e.index) for e in remaining] == [("a", 1)]
    assert remaining[0].seq > snapshot[1].seq
    assert store.dirty_bytes() == _size(rewritten)
    # Reporting the same snapshot again cleans nothing more.
    assert store.mark_flushed(snapshot) == 0


def test_dirty_entries_are_sorted_by_db_then_index(store: CacheStore) -> None:
    for db, index in [("b", 1), ("ab", 0), ("a", 256), ("a", 1), ("é", 0)]:
        store.put(db, index, np.zeros(1))
    keys = [(e.db, e.index) for e in store.dirty_entries()]
    assert keys == sorted(keys) == [("a", 1), ("a", 256), ("ab", 0), ("b", 1), ("é", 0)]
    assert store.databases() == ["a", "ab", "b", "é"]


def test_map_grows_past_its_initial_size(tmp_path: Path) -> None:
    chunk = np.ones(MiB // 8, dtype=np.float64)
    with CacheStore(tmp_path, "big", map_size=1 * MiB) as s:
        for i in range(20):
            s.put("x", i, chunk * i)
        assert s.count("x") == 20
    with CacheStore(tmp_path, "big", map_size=1 * MiB) as s:
        np.testing.assert_array_equal(s.get("x", 19), chunk * 19)
        assert s.dirty_bytes() == 20 * _size(chunk)


def test_map_growth_is_refused_while_a_zero_copy_reader_is_open(tmp_path: Path) -> None:
    with CacheStore(tmp_path, "p", map_size=1 * MiB) as s:
        s.put("x", 0, np.zeros(4))
        with s.reader() as r:
            view = r.array("x", 0)
            with pytest.raises(CacheError, match="reader"):
                s.put("x", 1, np.zeros(4 * MiB, np.uint8))
            np.testing.assert_array_equal(view, np.zeros(4))
        assert s.count("x") == 1


def _append_worker(root: str, tag: int, n: int, out: Any) -> None:
    with CacheStore(Path(root), "shared", map_size=1 * MiB) as s:
        out.put((tag, [s.append("frames", np.full(1000, tag, np.int32)) for _ in range(n)]))


def test_two_processes_appending_get_distinct_contiguous_indexes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    n = 200
    workers = [ctx.Process(target=_append_worker, args=(str(tmp_path), t, n, out)) for t in (1, 2)]
    for w in workers:
        w.start()
    results = dict(out.get(timeout=60) for _ in workers)
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0

    assert sorted(results[1] + results[2]) == list(range(2 * n))
    with CacheStore(tmp_path, "shared") as s:
        assert s.count("frames") == 2 * n
        for tag, indexes in results.items():
            assert all(s.get("frames", i)[0] == tag for i in indexes[:: n // 10])


def test_drop_removes_the_environment(tmp_path: Path) -> None:
    with CacheStore(tmp_path, "p") as s:
        s.put("x", 0, np.zeros(3))
        path = s.path
    CacheStore.drop(tmp_path, "p")
    assert not path.exists()
    assert os.listdir(tmp_path / "projects") == []
    CacheStore.drop(tmp_path, "p")  # dropping nothing is fine
    with CacheStore(tmp_path, "p") as s:
        assert s.count("x") == 0 and s.dirty_bytes() == 0


def test_drop_is_refused_while_this_process_has_the_project_open(store: CacheStore) -> None:
    with pytest.raises(CacheError, match="close"):
        CacheStore.drop(store.path.parent.parent, store.project_id)
    assert store.path.exists()


def test_dirty_bytes_of_a_missing_project_is_zero_and_creates_nothing(tmp_path: Path) -> None:
    assert CacheStore.dirty_bytes_of(tmp_path, "nobody") == 0
    assert list(tmp_path.iterdir()) == []


def test_dirty_bytes_of_reads_open_and_closed_environments(tmp_path: Path) -> None:
    array = np.zeros(100)
    with CacheStore(tmp_path, "p") as s:
        s.put("x", 0, array)
        assert CacheStore.dirty_bytes_of(tmp_path, "p") == _size(array)
        s.put("x", 1, array)  # the shared environment still works afterwards
    assert CacheStore.dirty_bytes_of(tmp_path, "p") == 2 * _size(array)


def test_stores_of_one_project_in_one_process_share_the_environment(tmp_path: Path) -> None:
    first, second = CacheStore(tmp_path, "p"), CacheStore(tmp_path, "p")
    first.put("x", 0, np.zeros(2))
    second.close()
    first.put("x", 1, np.zeros(2))
    assert first.count("x") == 2
    first.close()
    with pytest.raises(CacheError, match="closed"):
        first.count("x")


def test_open_without_create_requires_an_environment(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CacheStore(tmp_path, "p", create=False)
    assert not (tmp_path / "projects").exists()


@pytest.mark.parametrize("bad", ["", "..", "a/b", ".hidden", "x\x00"])
def test_unsafe_project_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        CacheStore(tmp_path, bad)


def test_a_garbage_data_file_raises_cache_corrupt(tmp_path: Path) -> None:
    env_dir = tmp_path / "projects" / "p"
    env_dir.mkdir(parents=True)
    (env_dir / "data.mdb").write_bytes(os.urandom(3) + b"not an lmdb file" * 1024)
    with pytest.raises(CacheCorrupt) as info:
        CacheStore(tmp_path, "p")
    assert str(env_dir) in str(info.value)
    assert "dbguard clear" in str(info.value)
    with pytest.raises(CacheCorrupt):
        CacheStore.dirty_bytes_of(tmp_path, "p")


# -- property: dirty_bytes is the sum of the dirty entries' sizes ---------------------

_DBS = st.sampled_from(["a", "b"])
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _DBS, st.integers(0, 5), st.integers(0, 300)),
        st.tuples(st.just("append"), _DBS, st.just(0), st.integers(0, 300)),
        st.tuples(st.just("snapshot"), st.just(""), st.just(0), st.just(0)),
        st.tuples(st.just("flush"), st.just(""), st.integers(0, 10), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_dirty_bytes_equals_the_sum_of_dirty_sizes(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, str, int, int]]
) -> None:
    root = tmp_path_factory.getbasetemp() / "prop"
    project = uuid.uuid4().hex
    model: dict[tuple[str, int], tuple[int, int]] = {}  # dirty key -> (seq, size)
    seq = 0
    snapshots: list[list[DirtyEntry]] = []
    with CacheStore(root, project) as s:
        for op, db, number, length in ops:
            array = np.zeros(length, np.uint8)
            if op in ("put", "append"):
                index = s.append(db, array) if op == "append" else number
                if op == "put":
                    s.put(db, index, array)
                seq += 1
                model[(db, index)] = (seq, _size(array))
            elif op == "snapshot":
                snapshots.append(s.dirty_entries())
            elif snapshots:
                for e in snapshots[number % len(snapshots)]:
                    if model.get((e.db, e.index), (None,))[0] == e.seq:
                        del model[(e.db, e.index)]
                s.mark_flushed(snapshots[number % len(snapshots)])
            entries = s.dirty_entries()
            assert s.dirty_bytes() == sum(e.size for e in entries)
            assert {(e.db, e.index): (e.seq, e.size) for e in entries} == model
    CacheStore.drop(root, project)
