"""Benchmark section `transfer`: import and export against the libraries that read and write the files.

One stack of N 512x512 float32 images (1 MiB each) is written once as an MRC stack (``.mrcs``)
and as a TIFF. Import appends every image of the file to an image database (the lease holder's
cache, as `dbguard import` does); its baseline is the library alone reading every image of the
same file into memory (mrcfile's memory map, one ``numpy.array`` copy per image; tifffile, one
``page.asarray()`` per page). Export writes the database back out to a new file after a flush,
from a second cache directory that stands for another host browsing the project; its baseline
is the library alone writing the same images to a new file (``mrcfile.new_mmap`` filled image by
image; ``tifffile.TiffWriter`` writing the pages from an iterator), both fsynced before the clock
stops. The MRC export runs first, so it alone includes the browsing host's one-time copy and
check of the project's segments from the share (what a first export from another host pays).
Ours and the baseline alternate which goes first; a ratio is taken per repetition and the
figure is the median. The setting is `data`'s: a broker process and this host's agent.

Figures (``our MiB/s / baseline MiB/s``, higher is better):

- ``transfer.import_mrc_vs_mrcfile``, ``transfer.import_tiff_vs_tifffile``: import vs reading.
- ``transfer.export_mrc_vs_mrcfile``, ``transfer.export_tiff_vs_tifffile``: export vs writing.

Raw figures (medians, MiB/s): ``transfer.import_mrc_mib_per_s``, ``transfer.mrcfile_read_mib_per_s``,
``transfer.import_tiff_mib_per_s``, ``transfer.tifffile_read_mib_per_s``,
``transfer.export_mrc_mib_per_s``, ``transfer.mrcfile_write_mib_per_s``,
``transfer.export_tiff_mib_per_s``, ``transfer.tifffile_write_mib_per_s``; and
``transfer.images``, the N of this run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mrcfile  # type: ignore[import-untyped, unused-ignore]  # mrcfile ships no type hints
import numpy as np
import tifffile

import dbguard
from dbguard.agent import local as local_agent
from dbguard.data.flushing import drop_cache
from dbguard.files.transfer import export_database, import_files
from dbguard.settings import Settings
from tools.bench_data import bench_hosts

log = logging.getLogger("bench.transfer")

# Importing adds an LMDB write per image to the read; exporting reads verified records back.
TARGETS: dict[str, tuple[str, float]] = {
    "transfer.import_mrc_vs_mrcfile": (">=", 0.3),
    "transfer.import_tiff_vs_tifffile": (">=", 0.3),
    "transfer.export_mrc_vs_mrcfile": (">=", 0.5),
    "transfer.export_tiff_vs_tifffile": (">=", 0.5),
}

SHAPE = (512, 512)
MIB = 1 << 20


@dataclass(frozen=True)
class Plan:
    images: int
    repetitions: int


FULL = Plan(images=1000, repetitions=3)
QUICK = Plan(images=200, repetitions=3)
TINY = Plan(images=8, repetitions=1)


def run(quick: bool) -> dict[str, float]:
    return measure(QUICK if quick else FULL)


def measure(plan: Plan) -> dict[str, float]:
    rng = np.random.default_rng(20240601)
    samples: dict[str, list[float]] = defaultdict(list)
    with bench_hosts() as hosts:
        files = hosts.root / "files"
        files.mkdir()
        stack = rng.random((plan.images, *SHAPE), dtype=np.float32)
        with mrcfile.new_mmap(files / "in.mrcs", shape=stack.shape, mrc_mode=2) as mrc:
            mrc.set_image_stack()
            mrc.data[:] = stack
        tifffile.imwrite(files / "in.tif", stack, photometric="minisblack")
        del stack
        size = plan.images * SHAPE[0] * SHAPE[1] * 4 / MIB
        for rep in range(plan.repetitions):
            project_dir = hosts.root / f"project-{rep}"
            project_dir.mkdir()
            project = dbguard.init(project_dir)
            dbguard.acquire(project_dir, settings=hosts.writer)
            try:
                for kind, suffix in (("mrc", ".mrcs"), ("tiff", ".tif")):
                    source = files / f"in{suffix}"
                    pairs: list[tuple[str, Callable[[], None]]] = [
                        (
                            f"import_{kind}",
                            functools.partial(_import, project_dir, kind, source, hosts.writer),
                        ),
                        (_baseline(kind, "read"), functools.partial(_read, kind, source)),
                    ]
                    _timed(pairs, rep % 2 == 1, size, samples)
                dbguard.flush(project_dir, settings=hosts.writer)
                for kind, suffix in (("mrc", ".mrcs"), ("tiff", ".tif")):
                    ours, theirs = files / f"ours-{rep}{suffix}", files / f"theirs-{rep}{suffix}"
                    pairs = [
                        (
                            f"export_{kind}",
                            functools.partial(_export, project_dir, kind, ours, hosts.browser),
                        ),
                        (
                            _baseline(kind, "write"),
                            functools.partial(_write, kind, files / "in.mrcs", theirs),
                        ),
                    ]
                    _timed(pairs, rep % 2 == 0, size, samples)
                    ours.unlink()
                    theirs.unlink()
            finally:
                dbguard.release(project_dir, settings=hosts.writer)
                for settings in (hosts.writer, hosts.browser):
                    with contextlib.suppress(Exception):
                        drop_cache(local_agent.cache_dir(settings), project.id)
            log.info("repetition %d/%d done", rep + 1, plan.repetitions)
    figures = {f"transfer.{name}": statistics.median(values) for name, values in samples.items()}
    for step, baseline in (("import", "read"), ("export", "write")):
        for kind, library in (("mrc", "mrcfile"), ("tiff", "tifffile")):
            mine, base = samples[f"{step}_{kind}_mib_per_s"], samples[f"{library}_{baseline}_mib_per_s"]
            figures[f"transfer.{step}_{kind}_vs_{library}"] = statistics.median(
                a / b for a, b in zip(mine, base, strict=True)
            )
    figures["transfer.images"] = float(plan.images)
    return figures


def _baseline(kind: str, step: str) -> str:
    return f"{'mrcfile' if kind == 'mrc' else 'tifffile'}_{step}"


def _timed(
    pairs: list[tuple[str, Callable[[], None]]], swap: bool, size: float, samples: dict[str, list[float]]
) -> None:
    for name, step in reversed(pairs) if swap else pairs:
        os.sync()  # neither side pays for writing back the other's dirty pages
        started = time.perf_counter()
        step()
        samples[f"{name}_mib_per_s"].append(size / (time.perf_counter() - started))


def _import(project: Path, kind: str, source: Path, settings: Settings) -> None:
    import_files(project, kind, [source], settings=settings)


def _export(project: Path, kind: str, target: Path, settings: Settings) -> None:
    export_database(project, kind, target, settings=settings)
    _fsync(target)


def _read(kind: str, source: Path) -> None:
    total = 0.0
    if kind == "mrc":
        with mrcfile.mmap(source, mode="r") as mrc:
            for i in range(mrc.data.shape[0]):
                total += float(np.array(mrc.data[i])[0, 0])
    else:
        with tifffile.TiffFile(source) as tif:
            for page in tif.pages:
                total += float(page.asarray()[0, 0])


def _write(kind: str, source: Path, target: Path) -> None:
    # The images come from the input file's memory map, as ours come from the database's.
    with mrcfile.mmap(source, mode="r") as images:
        data = images.data
        if kind == "mrc":
            with mrcfile.new_mmap(target, shape=data.shape, mrc_mode=2) as mrc:
                mrc.set_image_stack()
                for i in range(data.shape[0]):
                    mrc.data[i] = data[i]
        else:
            with tifffile.TiffWriter(target) as tif:
                tif.write(data=iter(data), shape=data.shape, dtype=data.dtype, photometric="minisblack")
    _fsync(target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
