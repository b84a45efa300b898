"""The Python API returns typed values and speaks Python; the command line adds its flags.

`dbguard.acquire` returns a `Lease` and `dbguard.status` a `Status`, and a refusal tells a
Python caller which parameter to pass (``wait=SECONDS``), where the same refusal from the
`dbguard` command names the flag (``--wait SECONDS``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tools.testbed import Host

TYPED = """
import json, dbguard
from dbguard.results import Lease, Status
project = {project!r}
lease = dbguard.acquire(project)
status = dbguard.status(project)
assert isinstance(lease, Lease) and isinstance(status, Status), (type(lease), type(status))
[item] = status.projects
print(json.dumps({{
    "lease": lease.to_json(), "state": str(item.state), "writer": item.writer.host,
    "token": item.token, "path": str(item.path), "status": status.to_json(),
}}))
"""

REFUSED = """
import json, dbguard
try:
    dbguard.acquire({project!r})
except dbguard.LeaseHeld as exc:
    print(json.dumps({{"message": str(exc), "holder": exc.holder}}))
"""


def last_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """What a script printed last, as one line of JSON."""
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return found


def printed_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """What `dbguard ... --json` printed."""
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def test_acquire_and_status_return_typed_values_with_the_json_the_command_prints(
    hosts: dict[str, Host], project: Path
) -> None:
    a = hosts["a"]
    typed = last_json(a.python(TYPED.format(project=str(project))))
    lease = typed["lease"]
    assert typed["state"] == "held" and typed["writer"] == "host-a"
    assert typed["token"] == lease["token"] and typed["path"] == lease["path"] == str(project.resolve())
    # The command's --json is the typed values' to_json(): the same fields scripts read before.
    printed = printed_json(a.run("status", str(project), "--json"))
    assert printed.keys() == typed["status"].keys()
    [item] = printed["projects"]
    assert item["writer"]["host"] == "host-a" and item["token"] == lease["token"]
    acquired = printed_json(a.run("acquire", str(project), "--json"))
    assert acquired["token"] == lease["token"] and acquired["status"] == "granted"
    # What the agent reports of a held lease, as the command printed it before Lease existed.
    assert {"project", "path", "ttl", "since", "state", "reason", "takeover_by", "marked"} <= acquired.keys()
    every = printed_json(a.run("status", "--json"))  # no project named: every project the service knows
    assert [item["project"] for item in every["projects"]] == [lease["project"]]


def test_a_refusal_names_python_parameters_in_python_and_flags_on_the_command_line(
    hosts: dict[str, Host], project: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    assert a.run("acquire", str(project)).returncode == 0
    refused = last_json(b.python(REFUSED.format(project=str(project))))
    message = str(refused["message"])
    assert "held by" in message and "host-a" in message
    assert "acquire(wait=SECONDS)" in message and "acquire(takeover=True)" in message
    assert "--" not in message
    on_command_line = b.run("acquire", str(project))
    assert on_command_line.returncode == 3
    assert "--wait SECONDS" in on_command_line.stderr and "--takeover" in on_command_line.stderr
    assert "wait=SECONDS" not in on_command_line.stderr
