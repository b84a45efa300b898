"""The per-project LMDB store: records, counters, dirty tracking, growth, damage."""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from dbguard.cache import CacheCorrupt, CacheError, CacheStore, DirtyEntry, decode_record, encode_record
from dbguard.cache import store as cache_store

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


def _last_txnid(store: CacheStore) -> int:
    return int(store._live().env.info()["last_txnid"])


def test_put_many_commits_about_a_mib_per_transaction(store: CacheStore) -> None:
    image = np.ones((256, 256), np.float32)  # 256 KiB: three fit in 1 MiB with headers, four do not
    per_txn = cache_store._MANY_TXN_BYTES // _size(image)
    assert per_txn == 3
    before = _last_txnid(store)
    store.put_many("m", ((i, image * i, b"") for i in range(10)))
    assert _last_txnid(store) - before == -(-10 // per_txn)
    assert store.count("m") == 10
    np.testing.assert_array_equal(store.get("m", 9), image * 9)
    assert [e.index for e in store.dirty_entries()] == list(range(10))
    assert store.dirty_bytes() == 10 * _size(image)


def test_put_many_of_a_small_batch_is_one_transaction(store: CacheStore) -> None:
    before = _last_txnid(store)
    store.put_many("m", [(i, np.full(100, i), b"x") for i in range(50)])
    assert _last_txnid(store) - before == 1


def test_put_many_gives_a_record_larger_than_the_cap_its_own_transaction(store: CacheStore) -> None:
    big = np.zeros(2 * MiB, np.uint8)
    small = np.zeros(10, np.uint8)
    before = _last_txnid(store)
    store.put_many("m", [(0, small, b""), (1, big, b""), (2, small, b"")])
    assert _last_txnid(store) - before == 3
    assert store.get("m", 1).nbytes == 2 * MiB


@pytest.mark.parametrize(
    "bad", [(-1, np.zeros(3), b""), (True, np.zeros(3), b""), (5, np.array([{}], dtype=object), b"")]
)
def test_put_many_checks_every_item_before_writing_any(
    store: CacheStore, bad: tuple[int, NDArray[Any], bytes]
) -> None:
    items = [(i, np.ones((256, 256), np.float32), b"") for i in range(8)]
    with pytest.raises((ValueError, TypeError)):
        store.put_many("m", [*items, bad])
    assert store.count("m") == 0
    assert store.dirty_bytes() == 0


def test_non_contiguous_arrays_are_stored_in_c_order_and_left_untouched(store: CacheStore) -> None:
    base = np.arange(48, dtype=np.float64).reshape(6, 8)
    views = [base[:, ::2], base.T, base[::-1], np.asfortranarray(base), base[1:4, 2:7], base[:, 3]]
    for index, view in enumerate(views):
        store.put("v", index, view, b"a")
    store.put_many("w", [(i, v, b"") for i, v in enumerate(views)])
    appended = [store.append("x", v) for v in views]
    np.testing.assert_array_equal(base, np.arange(48, dtype=np.float64).reshape(6, 8))
    with store.reader() as r:
        for db, indexes in (("v", range(len(views))), ("w", range(len(views))), ("x", appended)):
            for view, index in zip(views, indexes, strict=True):
                np.testing.assert_array_equal(r.array(db, index), view)
                assert r.record(db, index).data.tobytes() == np.ascontiguousarray(view).tobytes()
    for view in views:
        record = decode_record(encode_record(view, b"z"))
        np.testing.assert_array_equal(record.array(), view)
        assert record.attrs == b"z"


def test_stored_records_do_not_alias_the_callers_array(store: CacheStore) -> None:
    array = np.zeros((64, 64), np.float32)
    store.put("x", 0, array)
    store.append("x", array)
    array += 1
    np.testing.assert_array_equal(store.get("x", 0), np.zeros((64, 64)))
    np.testing.assert_array_equal(store.get("x", 1), np.zeros((64, 64)))


@pytest.mark.parametrize("attrs", [b"", b'{"apix": 1.0}'])
def test_zero_dimensional_arrays_keep_their_shape(store: CacheStore, attrs: bytes) -> None:
    scalar = np.array(2.5, dtype=">f8")
    store.put("s", 0, scalar, attrs)
    store.append("s", np.array(7, dtype=np.int8), attrs)
    with store.reader() as r:
        view = r.array("s", 0)
        assert view.shape == () and view.dtype == np.dtype(">f8") and view == 2.5
        assert r.array("s", 1).shape == () and r.array("s", 1) == 7
        record = r.record("s", 0)
        assert (record.dtype, record.shape, record.attrs) == (">f8", (), attrs)
        assert record.array() == 2.5
    decoded = decode_record(encode_record(scalar, attrs))
    assert (decoded.shape, decoded.attrs, decoded.array()) == ((), attrs, 2.5)


@pytest.mark.parametrize("dtype", ["M8[s]", "m8[ms]", "<U5", "S3", "?", "e", ">i4", ">c16"])
def test_every_plain_dtype_round_trips(store: CacheStore, dtype: str) -> None:
    array = np.arange(12).reshape(3, 4).astype(dtype)
    store.put("d", 0, array, b"attrs")
    store.put_many("d", [(1, array[:, ::2], b"")])
    copy = store.get("d", 0)
    assert copy.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(copy, array)
    np.testing.assert_array_equal(store.get("d", 1), array[:, ::2])
    assert store.dirty_bytes() == _size(array, b"attrs") + _size(array[:, ::2])
    record = decode_record(encode_record(array))
    assert np.dtype(record.dtype) == np.dtype(dtype)
    np.testing.assert_array_equal(record.array(), array)


def test_records_of_one_size_but_another_dtype_or_shape_read_as_written(store: CacheStore) -> None:
    # All 16 bytes long: only the headers tell them apart, so the reader must not take
    # the layout of the database's first records for that of every record.
    first = np.arange(4, dtype="<i4")
    store.put("x", 0, first)
    store.put("x", 1, first)
    with store.reader() as before:
        store.put("x", 1, np.arange(4, dtype=">i4"))
        store.append("x", np.arange(2, dtype=np.float64))
        store.put("x", 3, np.arange(16, dtype=np.uint8).reshape(4, 4), b"attrs")
        with store.reader() as after:
            assert after.array("x", 1).dtype == np.dtype(">i4")
            np.testing.assert_array_equal(after.array("x", 1), np.arange(4))
            assert after.array("x", 2).dtype == np.float64
            assert after.array("x", 3).shape == (4, 4)
            assert after.attrs("x", 3) == b"attrs"
            np.testing.assert_array_equal(after.array("x", 0), first)
        # The snapshot taken before the rewrites still reads what it saw.
        assert before.array("x", 1).dtype == np.dtype("<i4")
        with pytest.raises(KeyError):
            before.array("x", 2)
    assert store.count("x") == 4


def test_attrs_are_replaced_with_their_record(store: CacheStore) -> None:
    store.put("a", 0, np.zeros(3), b"old")
    store.put("a", 0, np.ones(3))
    assert store.attrs("a", 0) == b""
    store.put("a", 0, np.ones(3), b"new")
    assert store.attrs("a", 0) == b"new"
    np.testing.assert_array_equal(store.get("a", 0), np.ones(3))


def test_missing_records_raise_key_error_whether_or_not_layouts_are_shared(store: CacheStore) -> None:
    store.put("same", 0, np.zeros(3))
    store.put("same", 2, np.zeros(3))
    store.put("mixed", 0, np.zeros(3))
    store.put("mixed", 2, np.zeros(4))
    with store.reader() as r:
        for db in ("same", "mixed", "never"):
            with pytest.raises(KeyError):
                r.array(db, 1)
            with pytest.raises(KeyError):
                r.record(db, 1)
            with pytest.raises(KeyError):
                r.attrs(db, 1)
        with pytest.raises(ValueError):
            r.array("same", -1)
        with pytest.raises(ValueError):
            r.array("same", 1 << 64)


def test_more_shapes_than_the_caches_hold_still_read_back(store: CacheStore) -> None:
    n = cache_store._CACHE_LIMIT + 20
    store.put_many("many", [(i, np.full(i + 1, i, np.int32), b"") for i in range(n)])
    with store.reader() as r:
        for i in range(n):
            assert r.array("many", i).shape == (i + 1,)
            assert r.array("many", i)[-1] == i


@pytest.mark.parametrize("path", ["header", "payload"])
@pytest.mark.parametrize("db", ["same", "mixed"])
def test_a_record_whose_header_and_payload_disagree_raises_cache_corrupt(
    store: CacheStore, path: str, db: str
) -> None:
    store.put(db, 0, np.zeros(8, np.float32))
    if db == "mixed":
        store.put(db, 1, np.zeros(3, np.float32))
    shared = store._live()
    key = db.encode() + b"\x00" + (0).to_bytes(8, "big")
    with shared.env.begin(write=True) as txn:
        if path == "payload":
            txn.put(key, bytes(12), db=shared.records)
        else:
            txn.put(key + b"h", b"\x01\x02", db=shared.records)
    with store.reader() as r:
        with pytest.raises(CacheCorrupt, match=rf"{db}\[0\]"):
            r.record(db, 0)
        if path == "header" and db == "same":
            # Arrays of a database whose records share a layout are read without their
            # headers: only the payload's length is checked.
            np.testing.assert_array_equal(r.array(db, 0), np.zeros(8))
            return
        with pytest.raises(CacheCorrupt, match=rf"{db}\[0\]"):
            r.array(db, 0)
    with pytest.raises(CacheCorrupt):
        store.get(db, 0)


def _write_foreign_environment(root: Path, meta: dict[bytes, bytes]) -> Path:
    path = root / "projects" / "old"
    path.mkdir(parents=True)
    env = lmdb.open(str(path), subdir=True, max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(b"meta", txn=txn)
        for key, value in meta.items():
            txn.put(key, value, db=db)
    env.close()
    return path


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        # What format 1 wrote: no format key, a sequence number and dirty bytes.
        ({b"seq": (3).to_bytes(8, "big"), b"dirty_bytes": (300).to_bytes(8, "big")}, "format 1"),
        ({b"format": (99).to_bytes(8, "big"), b"state": bytes(16)}, "format 99"),
    ],
)
def test_an_environment_in_another_format_is_refused_not_taken_for_empty(
    tmp_path: Path, meta: dict[bytes, bytes], says: str
) -> None:
    path = _write_foreign_environment(tmp_path, meta)
    with pytest.raises(CacheCorrupt, match=says) as info:
        CacheStore(tmp_path, "old")
    assert str(path) in str(info.value)
    # Reporting 0 dirty bytes would let `dbguard clear` drop records it cannot read.
    with pytest.raises(CacheCorrupt, match=says):
        CacheStore.dirty_bytes_of(tmp_path, "old")


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
