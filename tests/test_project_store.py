"""The project store on real files: generations, plain-numpy segments, compaction, damage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from dbguard.data.store import ALIGN, PendingRecord, ProjectStore
from dbguard.data.view import StoreView
from dbguard.errors import Fenced, IntegrityError

PROJECT_ID = "6f1c6d1e-0000-4000-8000-000000000001"


def pending(db: str, index: int, array: np.ndarray, attrs: dict[str, object] | None = None) -> PendingRecord:
    return PendingRecord(db, index, array.dtype.str, array.shape, array.tobytes(), json.dumps(attrs or {}))


@pytest.fixture
def store(tmp_path: Path) -> ProjectStore:
    (tmp_path / "project").mkdir()
    return ProjectStore(tmp_path / "project", PROJECT_ID)


def test_each_flush_publishes_the_next_whole_generation(store: ProjectStore) -> None:
    assert store.latest().generation == 0
    first = store.flush([pending("a", i, np.full(4, i, np.int32)) for i in range(3)], token=1)
    second = store.flush([pending("a", 3, np.full(4, 3, np.int32))], token=1)
    assert (first.generation, second.generation) == (1, 2)
    manifest = store.latest()
    assert manifest.databases["a"]["count"] == 4 and manifest.token == 1
    assert store.generations() == [1, 2]
    assert list(store.verify()) == []


def test_segment_payloads_are_readable_with_plain_numpy(store: ProjectStore) -> None:
    images = [np.random.default_rng(i).random((17, 31)).astype(np.float32) for i in range(5)]
    store.flush([pending("img", i, image) for i, image in enumerate(images)], token=3)
    for (_, index), entry in store.live_entries(store.latest()).items():
        assert entry.offset % ALIGN == 0
        array = np.memmap(
            store.segment_path(entry.segment), np.dtype(entry.dtype), "r", entry.offset, entry.shape
        )
        assert np.array_equal(array, images[index])


def test_a_newer_token_fences_older_holders(store: ProjectStore) -> None:
    store.flush([pending("a", 0, np.zeros(2))], token=2)
    store.fence(5)
    before = store.latest()
    with pytest.raises(Fenced) as refused:
        store.flush([pending("a", 0, np.ones(2))], token=4)
    assert refused.value.current == 5 and "kept aside" in str(refused.value)
    assert store.latest().generation == before.generation
    assert store.flush([pending("a", 1, np.ones(2))], token=5).generation == before.generation + 1


def test_later_flushes_override_earlier_records_and_compaction_keeps_the_newest(store: ProjectStore) -> None:
    for version in range(4):
        store.flush([pending("a", i, np.full(3, 10 * version + i, np.int16)) for i in range(5)], token=1)
    old_view = StoreView(store, store.root.parent / "reader-cache")  # opened before compaction
    compacted = store.compact(token=1, retire_delay=3600)
    assert len(compacted.segments) == 1 and len(compacted.retired) == 4
    live = store.live_entries(compacted)
    assert [int(store.read_payload(live[("a", i)])[0]) for i in range(5)] == [30, 31, 32, 33, 34]
    # Retired segments stay for readers of the older generation until the delay has passed.
    assert [int(old_view.array(old_view.entry("a", i))[0]) for i in range(5)] == [30, 31, 32, 33, 34]
    assert all(store.segment_path(name).exists() for name in compacted.retired)
    deleted = store.delete_retired(compacted, retire_delay=0)
    assert sorted(deleted) == sorted(compacted.retired)
    assert list(store.verify()) == []
    old_view.close()


def test_a_reader_skips_a_damaged_newest_manifest_for_the_whole_one_before(store: ProjectStore) -> None:
    store.flush([pending("a", 0, np.zeros(2))], token=1)
    store.flush([pending("a", 1, np.zeros(2))], token=1)
    newest = store.manifest_path(2)
    newest.write_text(newest.read_text().replace('"token": 1', '"token": 9'))  # checksum now wrong
    assert store.latest().generation == 1
    problems = list(store.verify())
    assert len(problems) == 1 and str(newest) in problems[0]


def test_a_truncated_segment_is_reported_and_never_served(store: ProjectStore, tmp_path: Path) -> None:
    store.flush([pending("a", i, np.arange(1000, dtype=np.float64)) for i in range(3)], token=1)
    segment = next(store.segments_dir.glob("*.seg"))
    segment.write_bytes(segment.read_bytes()[:5000])
    assert any("truncated" in p or "trailer" in p for p in store.verify())
    view = StoreView(store, tmp_path / "reader")
    with pytest.raises(IntegrityError):
        view.entries()


def test_a_local_copy_is_checked_before_use(store: ProjectStore, tmp_path: Path) -> None:
    store.flush([pending("a", 0, np.arange(100, dtype=np.float64))], token=1)
    segment = next(store.segments_dir.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[8] ^= 0xFF  # inside the payload
    segment.write_bytes(bytes(data))
    view = StoreView(store, tmp_path / "reader")
    entry = view.entry("a", 0)
    assert entry is not None
    with pytest.raises(IntegrityError, match="checksum"):
        view.array(entry)
    assert not any((tmp_path / "reader").rglob("*.seg"))  # the bad copy was not kept


def test_an_empty_flush_publishes_nothing(store: ProjectStore) -> None:
    result = store.flush([], token=1)
    assert result.records == 0 and store.generations() == []
    assert not any(store.segments_dir.glob("*.seg"))


def test_old_manifests_are_pruned_only_after_the_delay(store: ProjectStore) -> None:
    for i in range(5):
        store.flush([pending("a", i, np.zeros(1))], token=1)
    manifest = store.latest()
    store.delete_retired(manifest, retire_delay=3600)
    assert store.generations() == [1, 2, 3, 4, 5]
    time.sleep(0.01)
    store.delete_retired(manifest, retire_delay=0)
    assert store.generations() == [4, 5]
