"""The chaos checker: writers and readers on simulated hosts, a seeded nemesis, and a checker of
the invariants of docs/design.md over the histories they leave.

    python -m tools.chaos --hosts 3 --writers 3 --readers 2 --seconds 600 [--seed S] [--json]

Run as root (namespaces, FUSE, a tmpfs), from the repository's root. Its parts:

- `tools.chaos.clients`: the workload, writer and reader processes on the simulated hosts, and
  the records they write, each of which says who wrote it;
- `tools.chaos.harness`: the set-up (a broker or an etcd cluster, an sshd, the simulated hosts,
  a project on a small tmpfs), the clients kept running, the observers, the tear-down, and the
  command line;
- `tools.chaos.nemesis`: the faults, injected on a seeded random schedule;
- `tools.chaos.checker`: the invariants, decided from the histories after the run;
- `tools.chaos.history`: the history files every party appends to, fsynced line by line.

All times are CLOCK_MONOTONIC readings: the simulated hosts share this machine's kernel, so the
clients', the harness's and the broker's clocks are one clock.
"""

from tools.chaos.checker import INVARIANTS, Report, check
from tools.chaos.clients import client_main
from tools.chaos.harness import Harness, Options, main, render, summary
from tools.chaos.nemesis import FAULT_KINDS

__all__ = [
    "FAULT_KINDS",
    "INVARIANTS",
    "Harness",
    "Options",
    "Report",
    "check",
    "client_main",
    "main",
    "render",
    "summary",
]
