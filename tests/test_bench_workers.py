"""The benchmark section workers still runs (see test_bench_sections.py for the other sections).

Its ``TINY`` plan runs every code path of the section (a real broker, simulated hosts with their
own sshfs mounts, the holder serving fresh projects, worker processes appending through it and
writing HDF5 files, the raw TCP stream) in seconds; its figures mean nothing, but a section whose
code rotted fails here instead of in the next real benchmark run. It needs root (namespaces,
sshfs) and h5py: off CI it skips without them and says why; on CI (CI=true) that is a failure.
"""

from __future__ import annotations

import math
import os

import pytest

from tools import bench

ON_CI = os.environ.get("CI") == "true"


def test_the_workers_section_measures_every_figure_in_a_tiny_run() -> None:
    module = bench.load_section("workers")
    why = module.missing()
    if why is not None:
        if ON_CI:
            pytest.fail(f"CI must run the workers section, but: {why}")
        pytest.skip(why)
    figures = module.measure(module.TINY)
    assert figures, "section workers returned no figures"
    for key, value in figures.items():
        assert key.startswith("workers."), key
        assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{key} = {value!r}"
    missing = set(module.TARGETS) - set(figures)
    assert not missing, f"section workers measured none of its targets {sorted(missing)}"
    documented = module.__doc__ or ""
    undocumented = [key for key in figures if f"``{key}``" not in documented]
    assert not undocumented, f"figures the docstring of bench_workers.py does not explain: {undocumented}"
    assert figures["workers.images_per_worker"] == module.TINY.images
    for count in module.WORKER_COUNTS:
        assert f"workers.holder_mib_s_{count}" in figures
        assert f"workers.hdf5_mount_mib_s_{count}" in figures
