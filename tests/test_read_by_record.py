"""Reading costs what is read: a view fetches the records it is asked for (and reads ahead of a
sequential scan), keeps them in a sparse local copy, and never hands out a byte that does not
match its checksum, whatever part of a segment was fetched and whatever happened to either copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbguard.data.store import PendingRecord, ProjectStore
from dbguard.data.view import StoreView
from dbguard.errors import IntegrityError

PROJECT_ID = "6f1c6d1e-0000-4000-8000-000000000002"
SIDE = 256  # a record is 256 KiB of float32, and its attrs pad it to the next ALIGN bytes


def image(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((SIDE, SIDE)).astype(np.float32)


def pending(n: int) -> PendingRecord:
    array = image(n)
    return PendingRecord("images", n, array.dtype.str, array.shape, array.tobytes(), json.dumps({"n": n}))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 24 records (6 MiB) in one segment, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("store") / "project"
    root.mkdir()
    ProjectStore(root, PROJECT_ID).flush([pending(n) for n in range(24)], token=1)
    return root


def _copy(pristine: Path, where: Path) -> ProjectStore:
    import shutil

    shutil.copytree(pristine, where)
    return ProjectStore(where, PROJECT_ID)


def _segment(store: ProjectStore) -> Path:
    return next(store.segments_dir.glob("*.seg"))


def test_one_record_of_a_large_segment_fetches_that_record_not_the_segment(
    pristine: Path, tmp_path: Path
) -> None:
    store = ProjectStore(pristine, PROJECT_ID)
    view = StoreView(store, tmp_path / "reader")
    entry = view.entry("images", 12)
    assert entry is not None
    assert np.array_equal(view.array(entry), image(12))
    assert view.fetched == entry.length
    local = tmp_path / "reader" / "segments" / PROJECT_ID / _segment(store).name
    assert local.stat().st_size == _segment(store).stat().st_size  # the segment's layout ...
    assert local.stat().st_blocks * 512 < 2 * entry.length  # ... with only that record in it
    view.close()
    again = StoreView(store, tmp_path / "reader")  # a later reader finds it locally
    assert np.array_equal(again.array(entry), image(12)) and again.fetched == 0


def test_a_sequential_scan_reads_ahead_in_growing_windows(pristine: Path, tmp_path: Path) -> None:
    view = StoreView(ProjectStore(pristine, PROJECT_ID), tmp_path / "reader")
    fetches = 0
    last = 0
    for n in range(24):
        entry = view.entry("images", n)
        assert entry is not None
        assert np.array_equal(view.array(entry), image(n))
        if view.fetched != last:
            fetches += 1
            last = view.fetched
    assert view.fetched >= 24 * (SIDE * SIDE * 4)
    assert fetches <= 6, f"{fetches} reads from the share for a scan of 24 records"


def test_the_local_copies_stay_within_their_bound(pristine: Path, tmp_path: Path) -> None:
    store = ProjectStore(pristine, PROJECT_ID)
    reader = tmp_path / "reader"
    # Another project's copy, older: the first to go.
    old = reader / "segments" / "6f1c6d1e-0000-4000-8000-000000000009" / "old.seg"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x" * (4 << 20))
    view = StoreView(store, reader, read_cache=3 << 20)
    for n in range(24):
        entry = view.entry("images", n)
        assert entry is not None
        view.array(entry)
    view._trim()
    assert not old.exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flip=st.integers(min_value=0, max_value=(24 * SIDE * SIDE * 4) - 1),
    order=st.permutations(list(range(24))),
    sequential=st.booleans(),
    warm=st.sets(st.integers(0, 23), max_size=6),
)
def test_a_flipped_byte_on_the_share_is_never_returned_whatever_was_fetched(
    pristine: Path,
    tmp_path_factory: pytest.TempPathFactory,
    flip: int,
    order: list[int],
    sequential: bool,
    warm: set[int],
) -> None:
    where = tmp_path_factory.mktemp("case")
    store = _copy(pristine, where / "project")
    reader = where / "reader"
    # Some records were read (and kept) before the damage, as a head node would have.
    early = StoreView(store, reader)
    for n in sorted(warm):
        entry = early.entry("images", n)
        assert entry is not None
        early.array(entry)
    early.close()
    segment = _segment(store)
    data = bytearray(segment.read_bytes())
    data[flip % len(data)] ^= 0x01
    segment.write_bytes(bytes(data))
    view = StoreView(store, reader)
    try:
        entries = view.entries()
    except IntegrityError:
        return  # the flip hit the index or its trailer: nothing is served at all
    for n in range(24) if sequential else order:
        entry = entries[("images", n)]
        try:
            got = np.array(view.array(entry))
        except IntegrityError as exc:
            assert "checksum" in str(exc)
            continue
        assert np.array_equal(got, image(n)), f"record {n} served with a flipped byte"


def test_a_damaged_local_copy_is_fetched_again(pristine: Path, tmp_path: Path) -> None:
    store = ProjectStore(pristine, PROJECT_ID)
    view = StoreView(store, tmp_path / "reader")
    entry = view.entry("images", 5)
    assert entry is not None
    view.array(entry)
    view.close()
    local = tmp_path / "reader" / "segments" / PROJECT_ID / _segment(store).name
    copy = bytearray(local.read_bytes())
    copy[entry.offset + 100] ^= 0xFF
    local.write_bytes(bytes(copy))
    again = StoreView(store, tmp_path / "reader")
    assert np.array_equal(again.array(entry), image(5))
    assert again.fetched == entry.length


def test_read_ahead_spans_the_padding_between_records(tmp_path: Path) -> None:
    (tmp_path / "project").mkdir()
    store = ProjectStore(tmp_path / "project", PROJECT_ID)
    odd = [np.full(100_001, n % 251, dtype=np.uint8) for n in range(40)]  # padded to 64 bytes each
    store.flush(
        [PendingRecord("odd", n, a.dtype.str, a.shape, a.tobytes(), "{}") for n, a in enumerate(odd)], token=1
    )
    view = StoreView(store, tmp_path / "reader")
    reads = 0
    for n in range(40):
        before = view.fetched
        entry = view.entry("odd", n)
        assert entry is not None
        assert np.array_equal(view.array(entry), odd[n])
        reads += view.fetched != before
    assert reads <= 4, f"{reads} reads from the share for a scan of 40 padded records"
