"""Run dbguard's benchmarks and print what they measured.

    python tools/bench.py [SECTION ...] [--json] [--quick]

Each section is a module ``tools/bench_<name>.py`` beside this file that exposes

    TARGETS: dict[str, tuple[str, float]]    # {"lease.cycle_p50_ms": ("<=", 1.0)}
    def run(quick: bool) -> dict[str, float]  # {"lease.cycle_p50_ms": 0.83, ...}

Figures are keyed ``"<section>.<figure>"``. A new section needs no change here: dropping its
module into ``tools/`` is enough. Sections report progress through `logging` (a logger named
``bench.<section>``); it reaches stderr only when stderr is a terminal, so ``--json`` output can
be piped and parsed.

This tool measures, it does not judge: a missed target is shown, not turned into a failure.
The exit code is 0 unless a section could not run (1), or the command line was wrong (2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import operator
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

log = logging.getLogger("bench")

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent

# How a target compares a measured value with its bound.
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}


class SectionError(Exception):
    """A section that could not run or returned something that is not a set of figures."""


def available_sections() -> list[str]:
    """Every section module beside this file, by name, in alphabetical order."""
    return sorted(path.stem.removeprefix("bench_") for path in TOOLS.glob("bench_*.py"))


def load_section(name: str) -> ModuleType:
    # Sections are imported as top-level modules (``bench_lease``), whether this file runs as a
    # script or not, so that 'spawn' child processes of a section can import it by that name.
    for where in (str(TOOLS), str(REPO)):
        if where not in sys.path:
            sys.path.append(where)
    module = importlib.import_module(f"bench_{name}")
    if not callable(getattr(module, "run", None)):
        raise SectionError(f"tools/bench_{name}.py defines no run(quick) function")
    return module


def run_section(name: str, quick: bool) -> tuple[dict[str, float], dict[str, tuple[str, float]]]:
    """The figures one section measured and its targets; raise SectionError if it failed."""
    module = load_section(name)
    targets: dict[str, tuple[str, float]] = dict(getattr(module, "TARGETS", {}))
    for key, (op, _) in targets.items():
        if op not in COMPARISONS:
            raise SectionError(f"target {key} uses {op!r}; use one of {', '.join(COMPARISONS)}")
    figures = module.run(quick)
    if not isinstance(figures, Mapping):
        raise SectionError(f"section {name} returned {type(figures).__name__}, not a dict of figures")
    checked: dict[str, float] = {}
    for key, value in figures.items():
        if not isinstance(key, str) or not key.startswith(f"{name}."):
            raise SectionError(f"section {name} returned figure {key!r}; keys must start with '{name}.'")
        # JSON has no NaN or infinity, and a figure that is not a finite number measured nothing.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SectionError(f"section {name} returned {value!r} for {key}; figures must be finite numbers")
        checked[key] = float(value)
    return checked, targets


def format_value(value: float) -> str:
    if value == 0 or 0.001 <= abs(value) < 1e6:
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{value:.3e}"


def table(figures: Mapping[str, float], targets: Mapping[str, tuple[str, float]]) -> str:
    rows = [("figure", "value", "target", "met")]
    for key in [*figures, *(k for k in targets if k not in figures)]:
        value = figures.get(key)
        target, met = "", ""
        if key in targets:
            op, bound = targets[key]
            target = f"{op} {format_value(bound)}"
            if value is None:
                met = "not measured"
            elif COMPARISONS[op](value, bound):
                met = "met"
            else:
                met = "NOT MET"
        rows.append((key, "-" if value is None else format_value(value), target, met))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"{key:<{widths[0]}}  {value:>{widths[1]}}  {target:<{widths[2]}}  {met}".rstrip()
        for key, value, target, met in rows
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sections = available_sections()
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Measure dbguard's performance figures against their targets.",
        epilog=f"sections: {', '.join(sections) or 'none'}. "
        "Exit 0 even when targets are missed; 1 if a section failed to run.",
    )
    parser.add_argument("sections", nargs="*", metavar="SECTION", help="sections to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object {figure: value}")
    parser.add_argument("--quick", action="store_true", help="fewer samples and shorter windows")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in sections]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; there are: {', '.join(sections)}")

    # Progress is for a person watching; a pipe or a log file gets only warnings and failures.
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if sys.stderr.isatty() else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    figures: dict[str, float] = {}
    targets: dict[str, tuple[str, float]] = {}
    failed: list[str] = []
    for name in dict.fromkeys(args.sections or sections):  # each once, in the order given
        started = time.monotonic()
        log.info("running section %s%s", name, " (quick)" if args.quick else "")
        try:
            section_figures, section_targets = run_section(name, args.quick)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            # Keep going: the other sections' figures are still worth having.
            failed.append(name)
            print(f"bench: section {name} failed: {exc}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        figures.update(section_figures)
        targets.update(section_targets)
        log.info("section %s done in %.1fs", name, time.monotonic() - started)

    if args.json:
        print(json.dumps(figures))
    else:
        print(table(figures, targets))
        if failed:
            print(f"\nfailed to run: {', '.join(failed)} (see stderr)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
