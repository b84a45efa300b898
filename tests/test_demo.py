"""The tour `tools/demo` gives a new user: it runs to the end, and shows the moments it promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_demo_tour_runs_to_the_end_and_shows_every_step() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py")],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout + result.stderr
    left = re.search(r"files left in (\S+)", out)
    if result.returncode == 0 and left:
        shutil.rmtree(left.group(1), ignore_errors=True)
    assert result.returncode == 0, out
    assert "Traceback" not in out, out
    assert "tour finished" in out
    for moment in (
        # 1: ws1 writes from Python into its cache, then flushes to the share
        "12 particles in ws1's cache",
        "flushed 12 records",
        # 2: head browses the flushed records and is refused as a writer, by command and from Python
        "particles                  12 records",
        "is held by",
        "refused: this host does not hold the writer lease",
        # 3: status names the command `dbguard run` runs
        "(python) of ",
        "wrote average.mrc",
        # 4: clear on ws1, ws2 takes over
        "cleared ",
        # 5: the crash strands data; the lease is orphaned
        "killed pid",
        "state    orphaned",
        "stranded at least",
        # 6: the operator breaks it; ws2 lists and exports what it kept aside
        "Run again with --force",
        "broke the lease of",
        "unflushed, lost while this agent was down",
        "exported ",
        # 7: what the share holds at the end
        "particles                  20 records",
    ):
        assert moment in out, f"{moment!r} not in the tour's output:\n{out}"
    assert out.count("(exit code 3)") >= 4, out  # head twice, ws1 after the crash, ws2 after the break
    assert re.search(r"stopped agent, .*broker", out), out  # ws1's `down` also stops the broker
