"""A flush never reports success for data that was set aside (invariant 3, as a writer sees it).

Found by the chaos checker (tools/chaos/): a writer host frozen while dirty, its lease broken
and granted to another host, wakes up; its agent's flush is fenced and sets the unflushed data
aside. The writer then called `dbguard.flush`, which found nothing dirty and returned
``{"records": 0, "generation": None}``: the writer took its records for durable, and they were
not in the store.
"""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

from tests.support import TTL, project_state
from tools.testbed import Host, wait_for


def test_a_flush_after_the_lease_was_lost_says_the_data_was_kept_aside(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    written = a.python(
        textwrap.dedent(
            f"""
            import numpy as np, dbguard
            with dbguard.open({str(project)!r}, "images", "a") as db:
                for i in range(4):
                    db.append(np.full((8, 8), i, np.float32))
            """
        )
    )
    assert written.returncode == 0, written.stderr
    assert wait_for(lambda: (project_state(b, project)["writer"] or {}).get("unflushed", 0) > 0, TTL * 2)
    a.signal_agent(signal.SIGSTOP)
    try:
        assert wait_for(lambda: project_state(b, project)["state"] == "orphaned", TTL * 3)
        assert b.run("break", str(project), "--force").returncode == 0
        assert b.run("acquire", str(project)).returncode == 0
    finally:
        a.signal_agent(signal.SIGCONT)

    def kept_aside() -> bool:
        result = a.run("recover", "--json")
        return result.returncode == 0 and bool(json.loads(result.stdout)["aside"])

    assert wait_for(kept_aside, TTL * 4)
    flushed = a.run("flush", str(project), "--json")
    assert flushed.returncode == 3, f"flush reported success for data kept aside: {flushed.stdout}"
    assert "kept aside" in flushed.stderr and "dbguard recover" in flushed.stderr
