"""The benchmark sections (peers, guard, workers, deploy, scale, memory) still run, and
`bench.py --write` writes its page.

Each section module has a ``TINY`` plan that runs every code path of the section (a real broker,
agents, mounts and load generators) in seconds; its figures mean nothing, but a section whose
code rotted fails here instead of in the next real benchmark run. The peers section needs root
and sshfs: off CI it skips without them and says why; on CI (CI=true) that is a failure.
"""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path
from types import ModuleType

import pytest

from tools import bench

ON_CI = os.environ.get("CI") == "true"


def _checked(name: str, module: ModuleType, figures: dict[str, float]) -> None:
    """Figures of the section's own name, finite numbers, with every target among them."""
    assert figures, f"section {name} returned no figures"
    for key, value in figures.items():
        assert key.startswith(f"{name}."), key
        assert isinstance(value, float) and math.isfinite(value), f"{key} = {value!r}"
    missing = set(module.TARGETS) - set(figures)
    assert not missing, f"section {name} measured none of its targets {sorted(missing)}"
    documented = module.__doc__ or ""
    undocumented = [key for key in figures if f"``{key}``" not in documented]
    assert not undocumented, f"figures the docstring of bench_{name}.py does not explain: {undocumented}"


def test_the_peers_section_measures_every_figure_in_a_tiny_run() -> None:
    module = bench.load_section("peers")
    why = module.missing()
    if why is not None:
        if ON_CI:
            pytest.fail(f"CI must run the peers section, but: {why}")
        pytest.skip(why)
    figures = module.measure(module.TINY)
    _checked("peers", module, figures)
    assert figures["peers.images"] == module.TINY.images
    # Unmodified flufl.lock cannot release a lock on sshfs (no link counts over SFTP).
    assert figures["peers.flufl_unmodified_works"] == 0.0
    assert figures["peers.lock_vs_flufl"] > 0


def test_the_guard_section_measures_each_place_in_a_tiny_run() -> None:
    module = bench.load_section("guard")
    why = module.missing()
    if why is not None:
        if ON_CI:
            pytest.fail(f"CI must run the guard section, but: {why}")
        pytest.skip(why)
    figures = module.measure(module.TINY)
    _checked("guard", module, figures)
    assert figures["guard.opens"] == module.TINY
    assert all(figures[f"guard.{place}_us"] > 0 for place in ("inside_local", "outside_sshfs", "first_sshfs"))


def test_the_scale_section_renews_every_lease_in_a_tiny_run() -> None:
    module = bench.load_section("scale")
    figures = module.measure(module.TINY)
    _checked("scale", module, figures)
    plan = module.TINY
    assert figures["scale.projects"] == plan.hosts * plan.projects_per_host
    assert figures["scale.failures"] == 0.0
    assert figures["scale.per_host_failures"] == 0.0
    assert figures["scale.renews_per_s"] == pytest.approx(plan.hosts / plan.interval, rel=0.2)


def test_the_memory_section_samples_the_writer_and_the_agent_in_a_tiny_run() -> None:
    module = bench.load_section("memory")
    figures = module.measure(module.TINY)
    _checked("memory", module, figures)
    assert figures["memory.data_gib"] == pytest.approx(module.TINY.images * module.IMAGE_BYTES / 2**30)
    assert figures["memory.writer_peak_rss_mb"] > 0
    assert figures["memory.agent_peak_anon_mb"] > 0


def _outcomes() -> list[bench.Outcome]:
    return [
        bench.Outcome(
            "lease",
            12.0,
            {"lease.cycle_p50_ms": 0.5, "lease.fsync_ms": 0.1},
            {"lease.cycle_p50_ms": ("<=", 1.0)},
            None,
            "Benchmark section `lease`.\n\n- ``lease.cycle_p50_ms``: one client's cycle.",
        ),
        bench.Outcome(
            "peers", 3.0, {}, {"peers.write_vs_h5py": (">=", 2.0)}, "RuntimeError: sshfs is missing", None
        ),
    ]


def test_the_results_page_has_figures_targets_failures_machine_command_and_meanings() -> None:
    page = bench.render_page(
        _outcomes(),
        "python tools/bench.py --write lease peers",
        when=datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC),
        revision="abc1234",
        host=[("CPU", "a test CPU, 2 logical cores")],
    )
    assert "2026-01-02 03:04 UTC at commit abc1234" in page
    assert "| `lease.cycle_p50_ms` | 0.5 | &lt;= 1 | met |" in page
    assert "| `lease.fsync_ms` | 0.1 |  |  |" in page
    assert "| `peers.write_vs_h5py` | - | &gt;= 2 | not measured |" in page
    assert "| `peers` | **failed**: RuntimeError: sshfs is missing | 3 |" in page
    assert "| CPU | a test CPU, 2 logical cores |" in page
    assert "python tools/bench.py --write lease peers" in page
    # The docstring becomes the section's explanation, its literals in Markdown's backticks.
    assert "### lease\n\nBenchmark section `lease`.\n\n- `lease.cycle_p50_ms`: one client's cycle." in page
    assert "bench_peers.py could not be loaded" in page


def test_write_regenerates_the_page_even_when_a_section_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "BENCHMARKS.md"

    def run_section(name: str, quick: bool) -> tuple[dict[str, float], dict[str, tuple[str, float]]]:
        if name == "peers":
            raise RuntimeError("sshfs is missing\nsecond line")
        return {"lease.cycle_p50_ms": 2.0}, {"lease.cycle_p50_ms": ("<=", 1.0)}

    monkeypatch.setattr(bench, "PAGE", page)
    monkeypatch.setattr(bench, "run_section", run_section)
    monkeypatch.setattr(bench, "available_sections", lambda: ["lease", "peers"])
    assert bench.main(["--write", "lease", "peers"]) == 1
    text = page.read_text()
    assert "| `lease.cycle_p50_ms` | 2 | &lt;= 1 | **not met** |" in text
    # A failure on one line: its first line and its last, where a log or a traceback ends.
    assert "| `peers` | **failed**: RuntimeError: sshfs is missing ... second line |" in text
    assert "--write lease peers" in text
    # The real section's docstring and targets, although it failed.
    assert "| `peers.write_vs_h5py` | - | &gt;= 2 | not measured |" in text
    assert "### peers\n\nBenchmark section `peers`" in text


def test_the_transfer_section_imports_and_exports_against_mrcfile_and_tifffile_in_a_tiny_run() -> None:
    module = bench.load_section("transfer")
    figures = module.measure(module.TINY)
    _checked("transfer", module, figures)
    assert figures["transfer.images"] == module.TINY.images
    assert all(figures[key] > 0 for key in module.TARGETS)


def _section_or_skip(name: str) -> ModuleType:
    module = bench.load_section(name)
    why = module.missing()
    if why is not None:
        if ON_CI:
            pytest.fail(f"CI must run the {name} section, but: {why}")
        pytest.skip(why)
    return module


def test_the_workers_section_measures_every_figure_in_a_tiny_run() -> None:
    """Simulated hosts, the holder serving fresh projects, workers appending through it and
    writing HDF5 files on their mounts, the raw TCP stream."""
    module = _section_or_skip("workers")
    figures = module.measure(module.TINY)
    _checked("workers", module, figures)
    assert all(value > 0 for value in figures.values()), figures
    assert figures["workers.images_per_worker"] == module.TINY.images
    for count in module.WORKER_COUNTS:
        assert f"workers.holder_mib_s_{count}" in figures
        assert f"workers.hdf5_mount_mib_s_{count}" in figures


def test_the_deploy_section_measures_every_figure_in_a_tiny_run() -> None:
    """deploy, sync and undeploy of fresh projects against rsync -a and cp -a of the same trees,
    both ways, every copy checked (needs rsync, which tools/test installs)."""
    module = _section_or_skip("deploy")
    figures = module.measure(module.TINY)
    _checked("deploy", module, figures)
    assert all(value > 0 for value in figures.values()), figures
    assert figures["deploy.small_files"] == module.TINY.small.files
    assert figures["deploy.large_files"] == module.TINY.large.files
    for tree in ("small", "large"):
        for step in module.STEPS:
            assert f"deploy.{step}_{tree}_mib_s" in figures
        for ratio in module.RATIOS:
            assert f"deploy.{ratio}_{tree}" in figures
