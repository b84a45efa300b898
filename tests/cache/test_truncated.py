"""A data.mdb shorter than its header says is refused before LMDB maps it (issue 12).

LMDB reads pages through its map, and a page past the end of the file kills the process with
SIGBUS. The check must refuse every file that would, and no healthy one: a healthy data.mdb is
often shorter than its last page number says (its last pages free, never written), so the free
database is read to tell the two apart. Both directions are checked against LMDB itself, in
child processes that read everything and write a little: the ones that die of SIGBUS.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np
import pytest

from dbguard.cache import CacheCorrupt, CacheStore
from dbguard.cache.lmdb_file import missing_pages

# Reads every entry of every database, then writes: a write transaction walks the free database
# too. Dies of SIGBUS if a page it needs lies past the end of the file.
EVERYTHING = textwrap.dedent(
    """
    import lmdb, sys
    env = lmdb.open(sys.argv[1], map_size=1 << 28, max_dbs=8)
    with env.begin() as txn:
        names = [bytes(key) for key, _ in txn.cursor()]
    for name in names:
        db = env.open_db(name)
        with env.begin(db=db) as txn:
            for key, value in txn.cursor():
                bytes(value)
    with env.begin(write=True) as txn:
        db = env.open_db(b"a", txn=txn)
        for n in range(100):
            txn.put(b"new%05d" % n, b"y" * 3000, db=db)
    """
)


def _read_everything(path: Path) -> int:
    return subprocess.run(
        [sys.executable, "-c", EVERYTHING, str(path)], capture_output=True, check=False
    ).returncode


def _churn(path: Path, seed: int, transactions: int) -> Path:
    """An environment after puts and deletes of all sizes, ranges deleted by cursor: the kind of
    history that leaves free pages at the end of the file."""
    rng = random.Random(seed)
    env = lmdb.open(str(path), map_size=1 << 28, max_dbs=8, sync=False, metasync=False)
    dbs = [env.open_db(name) for name in (b"a", b"b", b"c")]
    for _ in range(transactions):
        with env.begin(write=True) as txn:
            for _ in range(rng.randint(1, 200)):
                db = rng.choice(dbs)
                key = b"%08d" % rng.randint(0, 2000)
                roll = rng.random()
                if roll < 0.55:
                    txn.put(key, b"x" * rng.choice([10, 1000, 5000, 20000]), db=db)
                elif roll < 0.95:
                    txn.delete(key, db=db)
                else:
                    cursor = txn.cursor(db=db)
                    if cursor.first():
                        for _ in range(rng.randint(1, 300)):
                            if not cursor.delete():
                                break
    env.close()
    return path


def _header_says(path: Path) -> tuple[int, int]:
    """(bytes the newer meta page's last page number reaches, bytes in the file)."""
    env = lmdb.open(str(path), readonly=True, max_dbs=8, lock=False)
    try:
        needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    finally:
        env.close()
    return needed, (path / "data.mdb").stat().st_size


def test_a_healthy_file_shorter_than_its_last_page_number_is_not_refused(tmp_path: Path) -> None:
    found = None
    for seed in range(40):
        path = _churn(tmp_path / f"env-{seed}", seed, transactions=20)
        needed, size = _header_says(path)
        if size < needed:
            found = path
            break
    assert found is not None, "no history left free pages at the end of the file"
    assert missing_pages(found) is None
    assert _read_everything(found) == 0  # LMDB itself reads it all, and writes


def test_every_cut_that_would_kill_a_reader_is_refused_and_no_other(tmp_path: Path) -> None:
    rng = random.Random(7)
    refused = passed = 0
    for seed in range(6):
        source = _churn(tmp_path / f"env-{seed}", 100 + seed, transactions=rng.randint(5, 25))
        whole = (source / "data.mdb").read_bytes()
        for cut in range(4):
            size = max(8192, len(whole) - cut * 4096 - (rng.randrange(4096) if cut % 2 else 0))
            copy = tmp_path / f"cut-{seed}-{cut}"
            copy.mkdir()
            (copy / "data.mdb").write_bytes(whole[:size])
            why = missing_pages(copy)
            code = _read_everything(copy)
            if why is None:
                assert code == 0, f"{size} of {len(whole)} bytes: not refused, yet the reader exited {code}"
                passed += 1
            else:
                assert "truncated" in why
                refused += 1
            shutil.rmtree(copy)
    assert refused and passed  # both kinds were met


def test_the_issues_truncate_to_8192_bytes_is_a_cache_corrupt_error_not_a_sigbus(tmp_path: Path) -> None:
    with CacheStore(tmp_path, "project-1") as store:
        for n in range(40):
            store.put("images", n, np.full((64, 64), n, dtype=np.float32))
    environment = tmp_path / "projects" / "project-1"
    os.truncate(environment / "data.mdb", 8192)
    for call in (
        lambda: CacheStore(tmp_path, "project-1"),
        lambda: CacheStore.dirty_bytes_of(tmp_path, "project-1"),
    ):
        with pytest.raises(CacheCorrupt) as caught:
            call()
        assert caught.value.path == str(environment)
        assert "truncated" in str(caught.value) and "move the directory aside" in str(caught.value)
    # Unchecked, LMDB itself dies of it:
    code = _read_everything(environment)
    assert code == -signal.SIGBUS


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 100, b"not an lmdb file at all" * 400],
    ids=["empty", "short", "text"],
)
def test_files_that_are_no_lmdb_file_are_left_to_lmdb(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "data.mdb").write_bytes(content)
    assert missing_pages(tmp_path) is None  # LMDB refuses (or creates) these without mapping


def test_a_directory_named_data_mdb_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.mdb").mkdir()
    assert missing_pages(tmp_path) == "data.mdb is not a regular file"
