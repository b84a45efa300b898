"""Run dbguard's benchmarks and print what they measured.

    python tools/bench.py [SECTION ...] [--json] [--quick] [--write]

Each section is a module ``tools/bench_<name>.py`` beside this file that exposes

    TARGETS: dict[str, tuple[str, float]]    # {"lease.cycle_p50_ms": ("<=", 1.0)}
    def run(quick: bool) -> dict[str, float]  # {"lease.cycle_p50_ms": 0.83, ...}

Figures are keyed ``"<section>.<figure>"``. A new section needs no change here: dropping its
module into ``tools/`` is enough. Sections are imported as ``tools.bench_<name>``, and import
what they share (each other's helpers, the test bed, dbguard) the same way, absolutely from the
repository's root: ``from tools.bench_lease import running_broker``. Sections report progress
through `logging` (a logger named ``bench.<section>``); it reaches stderr only when stderr is a
terminal, so ``--json`` output can be piped and parsed.

This tool measures, it does not judge: a missed target is shown, not turned into a failure.
The exit code is 0 unless a section could not run (1), or the command line was wrong (2).

``--write`` also regenerates ``BENCHMARKS.md`` at the top of the repository from this run: the
table of figures and targets, the machine, the date and commit, the command, and what every
figure means, taken from the section modules' docstrings so that the page and the code that
measures cannot drift apart. A section that fails is listed on the page as failed, with why;
the page is written all the same.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import math
import operator
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

log = logging.getLogger("bench")

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
PAGE = REPO / "BENCHMARKS.md"

# The repository's root on sys.path is what makes ``tools.bench_<name>``, ``tools.sshfs`` and this
# checkout's dbguard importable: pytest puts it there (pyproject's pythonpath), ``python -m
# tools.bench`` from the root has it, and run as a script (python tools/bench.py) this file puts
# it first. A section's 'spawn' child processes get this sys.path, so they import the section by
# the same name.
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

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
    module = importlib.import_module(f"tools.bench_{name}")
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


def rows(
    figures: Mapping[str, float], targets: Mapping[str, tuple[str, float]], *, missed: str = "NOT MET"
) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, met) for every figure measured, then every target not measured."""
    found = []
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
                met = missed
        found.append((key, "-" if value is None else format_value(value), target, met))
    return found


def table(figures: Mapping[str, float], targets: Mapping[str, tuple[str, float]]) -> str:
    lines_of = [("figure", "value", "target", "met"), *rows(figures, targets)]
    widths = [max(len(row[i]) for row in lines_of) for i in range(3)]
    lines = [
        f"{key:<{widths[0]}}  {value:>{widths[1]}}  {target:<{widths[2]}}  {met}".rstrip()
        for key, value, target, met in lines_of
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


# ------------------------------------------------------------------ the results page


@dataclass
class Outcome:
    """What one section of a run gave: its figures, or why it failed; and what it is."""

    name: str
    seconds: float
    figures: dict[str, float] = field(default_factory=dict)
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)
    error: str | None = None  # the failure, one line
    doc: str | None = None  # the section module's docstring


def summary(exc: BaseException) -> str:
    """An error on one line: its first line, and its last when it has more (a message that
    ends with a log or a traceback has the cause at its end)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ... ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
    return f"{type(exc).__name__}: {text}"


def describe(name: str) -> tuple[dict[str, tuple[str, float]], str | None]:
    """A section's targets and docstring without running it (for a section that failed)."""
    try:
        module = load_section(name)
    except Exception:
        return {}, None
    return dict(getattr(module, "TARGETS", {})), module.__doc__


def machine() -> list[tuple[str, str]]:
    """What the figures were measured on, as (what, description) pairs."""
    found: list[tuple[str, str]] = []
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    found.append(("CPU", f"{model}, {os.cpu_count()} logical cores"))
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]  # typed only with types-psutil

        found.append(("memory", f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB"))
    except ImportError:
        pass
    found.append(("kernel", f"{platform.system()} {platform.release()}"))
    try:
        with open("/etc/os-release") as release:
            pretty = [
                line.split("=", 1)[1].strip().strip('"')
                for line in release
                if line.startswith("PRETTY_NAME=")
            ]
        if pretty:
            found.append(("system", pretty[0]))
    except OSError:
        pass
    found.append(("Python", f"{platform.python_implementation()} {platform.python_version()}"))
    temp = tempfile.gettempdir()
    try:
        from dbguard.cache.location import find_mount

        mount = find_mount(temp)
        found.append(
            (f"{temp} (caches, brokers' state, loopback share)", f"{mount.fstype} on {mount.source}")
        )
    except Exception as exc:  # a description, not a measurement: say what is missing and go on
        found.append((temp, f"unknown ({exc})"))
    return found


def interpreter() -> str:
    """This Python as a command run from the repository: .venv/bin/python, or python."""
    try:
        return str(Path(sys.executable).relative_to(REPO))
    except ValueError:
        return "python"


def commit() -> str:
    """The checked-out commit, and whether the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} with uncommitted changes" if dirty else head


def markdown(text: str) -> str:
    """A section docstring as Markdown: reStructuredText's ``literal`` becomes `literal`."""
    return re.sub(r"``(.+?)``", r"`\1`", text, flags=re.DOTALL)


def render_page(
    outcomes: Sequence[Outcome],
    command: str,
    *,
    when: datetime.datetime,
    revision: str,
    host: Sequence[tuple[str, str]],
) -> str:
    figures: dict[str, float] = {}
    targets: dict[str, tuple[str, float]] = {}
    for outcome in outcomes:
        figures.update(outcome.figures)
        targets.update(outcome.targets)
    lines = [
        "# dbguard benchmarks",
        "",
        f"Generated by `{command}` on {when:%Y-%m-%d %H:%M} UTC at commit {revision}.",
        "Do not edit this page by hand: run the command again (see [Reproducing](#reproducing)).",
        "",
        "Each section measures dbguard and its baseline side by side in one run, on one machine,",
        "several times; a figure is the median over the repetitions. Ratios are taken so that",
        "higher or lower is better as each target says; a missed target is shown, not hidden.",
        "",
        "## Figures",
        "",
        "| figure | value | target | met |",
        "| --- | ---: | --- | --- |",
    ]
    for key, value, target, met in rows(figures, targets, missed="**not met**"):
        lines.append(f"| `{key}` | {value} | {target.replace('<', '&lt;').replace('>', '&gt;')} | {met} |")
    lines += ["", "| section | result | seconds |", "| --- | --- | ---: |"]
    for outcome in outcomes:
        result = "ran" if outcome.error is None else f"**failed**: {outcome.error.replace('|', '/')}"
        lines.append(f"| `{outcome.name}` | {result} | {outcome.seconds:.0f} |")
    lines += ["", "## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {what} | {description} |" for what, description in host]
    lines += [
        "",
        "## Reproducing",
        "",
        "From a checkout, as root (the `peers` section mounts sshfs over loopback; without root it",
        "fails and says why), with the environment `./tools/test` sets up (`.venv`, with the test",
        "extras that hold the baselines: h5py, mrcfile, flufl.lock):",
        "",
        "```sh",
        "./tools/test --co -q > /dev/null   # first time only: creates .venv with what is needed",
        command,
        "```",
        "",
        "`.venv/bin/python tools/bench.py SECTION ... --json` runs only those sections and prints",
        "their figures as one JSON object; `--quick` runs fewer and shorter repetitions (and a",
        "smaller `scale`); progress goes to stderr when it is a terminal.",
        "",
        "## What the figures mean",
        "",
    ]
    for outcome in outcomes:
        lines += [f"### {outcome.name}", ""]
        if outcome.doc:
            lines += [markdown(outcome.doc.strip()), ""]
        else:
            lines += [
                f"(tools/bench_{outcome.name}.py could not be loaded, so its description is missing.)",
                "",
            ]
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
    parser.add_argument(
        "--write", action="store_true", help=f"also regenerate {PAGE.name} from this run's figures"
    )
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
    outcomes: list[Outcome] = []
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
            known_targets, doc = describe(name)
            outcomes.append(Outcome(name, time.monotonic() - started, {}, known_targets, summary(exc), doc))
            continue
        figures.update(section_figures)
        targets.update(section_targets)
        outcomes.append(
            Outcome(
                name, time.monotonic() - started, section_figures, section_targets, None, describe(name)[1]
            )
        )
        log.info("section %s done in %.1fs", name, time.monotonic() - started)

    if args.json:
        print(json.dumps(figures))
    else:
        print(table(figures, targets))
        if failed:
            print(f"\nfailed to run: {', '.join(failed)} (see stderr)")
    if args.write:
        used = sys.argv[1:] if argv is None else argv
        page = render_page(
            outcomes,
            shlex.join([interpreter(), "tools/bench.py", *used]),
            when=datetime.datetime.now(datetime.UTC),
            revision=commit(),
            host=machine(),
        )
        PAGE.write_text(page + "\n")
        print(f"bench: wrote {PAGE}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
