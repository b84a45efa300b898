"""The `cli` benchmark section still runs: a quick run measures every figure it documents."""

from __future__ import annotations

import math

from tests.support import fail_or_skip
from tools import bench


def test_the_cli_section_times_the_command_and_its_baseline_in_a_quick_run() -> None:
    module = bench.load_section("cli")
    why = module.missing()
    if why is not None:
        fail_or_skip(why)  # on CI (root, a bare machine set up by tools/test) it must run
    figures = module.run(True)
    assert figures, "section cli returned no figures"
    for key, value in figures.items():
        assert key.startswith("cli."), key
        assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{key} = {value!r}"
    missing = set(module.TARGETS) - set(figures)
    assert not missing, f"section cli measured none of its targets {sorted(missing)}"
    documented = module.__doc__ or ""
    undocumented = [key for key in figures if f"``{key}``" not in documented]
    assert not undocumented, f"figures the docstring of bench_cli.py does not explain: {undocumented}"
    for key in ("python_ms", "startup_ms", "status_ms", "import_ms", "startup_vs_python"):
        assert f"cli.{key}" in figures
    assert figures["cli.rounds"] == module.QUICK.rounds
    # Any dbguard command is a Python start and more.
    assert figures["cli.startup_ms"] > figures["cli.python_ms"]
