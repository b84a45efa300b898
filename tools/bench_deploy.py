"""Benchmark section `deploy`: deploy and sync of a project folder against ``rsync -a`` and ``cp -a``.

`dbguard deploy PROJECT --to DIR` takes the project's writer lease and copies its folder from the
share to DIR on the host's local disk; `dbguard sync` copies what changed in DIR back to the share
(each file to a temporary name, fsynced, fenced, renamed); `dbguard undeploy` makes a last sync,
reads every file back from the share to check its CRC-32, removes DIR and releases the lease.
Here one simulated host (`tools.testbed.SimHost`: its own hostname, its own /tmp, and its own
sshfs mount of the share at /mnt/share over a private loopback sshd) runs everything, with a real
broker. DIR is on the host's /tmp; the share's directory (what the sshd serves) and the host's
/tmp are on the same local disk of this machine, so every byte that crosses the mount goes
through sshfs, ssh and the SFTP server on loopback, and the baselines pay the same.

Two trees are measured: ``small``, many small files of random bytes (FULL: 2,000 files of
16 KiB, 31 MiB, spread over 10 folders of 10 folders each), and ``large``, a few large ones (FULL: 4 files
of 64 MiB, 256 MiB). ``--quick`` uses 500 small files and 4 large files of 16 MiB (still above
the 8 MiB from which dbguard copies a file alone rather than 8 at a time). Every round of a tree
uses a fresh project, created new on the share with `dbguard init`, and fresh folders:

1. ``dbguard deploy`` of the empty project to ``/tmp/up-<round>``, then (not timed) the tree
   copied into that DIR with ``cp -a`` from a source made once at the start.
2. To the share, in an order that rotates from round to round: ``dbguard sync`` of the
   project, which copies the whole tree, new, to the share; ``rsync -a DIR/
   /mnt/share/rsync-<round>/``; ``rsync -a --fsync DIR/ /mnt/share/rsync-fsync-<round>/``; and
   ``cp -a DIR /mnt/share/cp-<round>``: each into a folder that does not exist yet, from the
   same DIR onto the same mount.
3. ``dbguard undeploy`` of the project (a sync with nothing to copy, then every file read back
   from the share and checked).
4. From the share, again rotating: ``dbguard deploy`` of the project, now holding the tree, to
   a new ``/tmp/down-<round>``; ``rsync -a /mnt/share/rsync-<round>/ /tmp/rsync-<round>/``; and
   ``cp -a /mnt/share/cp-<round> /tmp/cp-<round>``.
5. Not timed: ``dbguard undeploy`` again, and every folder of the round removed (on the share,
   from the server's side).

Each timed step is one whole command run on the host (``nsenter`` into its namespaces, then the
program), timed from this process from start to exit: process start is included for dbguard
(a Python interpreter importing dbguard: see ``deploy.dbguard_start_s``) and for rsync and cp
alike. Before each timed step, dirty pages are written back (``sync``) and the kernel's page cache,
dentries and inodes are dropped (``echo 3 > /proc/sys/vm/drop_caches``, as root), so that every
command reads its source from the disk, cold, and writes into empty memory; then the program
about to be timed runs once untimed with ``--version``, so that its own code (Python's and
dbguard's modules; rsync's or cp's binary) is warm and only the data is cold. sshfs's own cache
of file attributes (``dir_cache``, 20 s) is left as it is: each tree was written through this
same mount seconds before it is read back, by whichever tool reads it. After each step (not
timed) what it wrote is checked: every file of the tree with the same size and the same bytes,
and nothing else (dbguard's own aside: the share's ``.dbguard`` folder, the marker file a
deployment holds, which ``rsync`` and ``cp`` copy along from DIR); dbguard's ``--json`` answer
must count every file and byte of the tree.

What dbguard does and ``rsync -a`` and ``cp -a`` do not: it fsyncs every file it writes (on sshfs, an
``fsync@openssh.com`` request that the SFTP server turns into an fsync on the server's disk),
checks before each rename that no newer lease holder has fenced the project (one ``stat`` of a
manifest name over the mount), and keeps its record of what it synced, with a CRC-32 of every
file, on the host. It copies small files (below 8 MiB) 8 at a time, large ones one by one; rsync
and cp copy one file at a time. rsync, like dbguard, writes each file to a temporary name and
renames it; cp writes in place. Neither ``rsync -a`` nor ``cp -a`` fsyncs; ``rsync -a --fsync``
does, after each file, as dbguard does, so it shows what that costs rsync.

Figures, each the total bytes of the tree in MiB over one command's time, in MiB/s (higher is
better), the median over the repetitions:

- ``deploy.sync_small_mib_s``, ``deploy.sync_large_mib_s``: ``dbguard sync`` of the whole tree,
  new in DIR since the (empty) deploy, to the share.
- ``deploy.sync_inside_small_mib_s``, ``deploy.sync_inside_large_mib_s``: the same syncs, over
  the seconds that their ``--json`` answer reports: the time inside the copy, from just before
  the scan of DIR to the end of the copy, without starting Python, importing dbguard and
  checking the lease before it. Not a throughput to compare with the baselines, which include
  all that: it tells how much of the difference lies outside the copy.
- ``deploy.rsync_small_mib_s``, ``deploy.rsync_large_mib_s``: ``rsync -a`` of the same DIR to a
  new folder on the same mount.
- ``deploy.rsync_fsync_small_mib_s``, ``deploy.rsync_fsync_large_mib_s``: ``rsync -a --fsync``
  of the same DIR likewise.
- ``deploy.cp_small_mib_s``, ``deploy.cp_large_mib_s``: ``cp -a`` of the same DIR likewise.
- ``deploy.undeploy_small_mib_s``, ``deploy.undeploy_large_mib_s``: ``dbguard undeploy`` right
  after that sync: a sync that finds nothing to copy, every file read back from the share past
  the page cache and its CRC-32 checked, DIR removed, the lease released. No baseline.
- ``deploy.deploy_small_mib_s``, ``deploy.deploy_large_mib_s``: ``dbguard deploy`` (taking the
  lease included) of the project holding the tree, from the share to a new DIR.
- ``deploy.rsync_from_share_small_mib_s``, ``deploy.rsync_from_share_large_mib_s``: ``rsync -a``
  of the tree the rsync step wrote, from the share to a new local folder.
- ``deploy.cp_from_share_small_mib_s``, ``deploy.cp_from_share_large_mib_s``: ``cp -a`` of the
  tree the cp step wrote, from the share to a new local folder.

Ratios (higher is better), each taken within one round, the median over the repetitions:

- ``deploy.sync_vs_rsync_small``, ``deploy.sync_vs_rsync_large``: ``sync / rsync`` to the
  share; the targets (the issue's): at least rsync's throughput for many small files, at least
  0.8 of it for large files.
- ``deploy.sync_vs_rsync_fsync_small``, ``deploy.sync_vs_rsync_fsync_large``:
  ``sync / rsync_fsync`` to the share.
- ``deploy.sync_vs_cp_small``, ``deploy.sync_vs_cp_large``: ``sync / cp`` to the share.
- ``deploy.deploy_vs_rsync_small``, ``deploy.deploy_vs_rsync_large``: ``deploy / rsync`` from
  the share.

Also: ``deploy.dbguard_start_s``, the median of 5 runs of ``dbguard --version`` on the host the
same way (nsenter included), after the last round and one untimed run, so warm: roughly the part
of every dbguard figure that is starting Python and importing dbguard, where rsync and cp start
in milliseconds; and the trees of this run: ``deploy.small_files`` files of
``deploy.small_file_kib`` KiB, ``deploy.large_files`` files of ``deploy.large_file_mib`` MiB.
A first round of each tree, not recorded, absorbs one-time costs (the mount's first writes, the
agent's start, the first lease). Every command runs on one machine that has, besides them, the
broker, the host's agent, sshfs, sshd and the SFTP server on its cores, ours and the baselines
alike; on 2 cores the same command's time over loopback sshfs varies by up to 2x from one run to
the next (more when anything else runs: dropping the caches is for the whole machine, so run
this section on a machine that does nothing else), which is why ratios are taken within a round.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.sshfs import SshServer, sshfs_unavailable
from tools.testbed import BrokerProcess, SimHost, namespaces_unavailable

log = logging.getLogger("bench.deploy")

TARGETS: dict[str, tuple[str, float]] = {
    # The issue: "at least 0.8x rsync's throughput for large files, at least rsync's for many
    # small files".
    "deploy.sync_vs_rsync_large": (">=", 0.8),
    "deploy.sync_vs_rsync_small": (">=", 1.0),
}

KIB = 1 << 10
MIB = 1 << 20
SHARE_MOUNT = "/mnt/share"  # where the host sees the share
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# What copies a tree to the share and from it, in the order of a round's rotation.
TO_SHARE = ("dbguard", "rsync", "rsync-fsync", "cp")
FROM_SHARE = ("dbguard", "rsync", "cp")
# The baselines' commands (the source and the target follow).
BASELINES = {"rsync": ("rsync", "-a"), "rsync-fsync": ("rsync", "-a", "--fsync"), "cp": ("cp", "-a")}
# Ratios of throughput, ours over theirs, by the steps' names (the time of theirs over ours).
RATIOS = {
    "sync_vs_rsync": ("sync", "rsync"),
    "sync_vs_rsync_fsync": ("sync", "rsync_fsync"),
    "sync_vs_cp": ("sync", "cp"),
    "deploy_vs_rsync": ("deploy", "rsync_from_share"),
}
# Every timed step of a round, by the name its figures take.
STEPS = (
    "sync",
    "sync_inside",
    "rsync",
    "rsync_fsync",
    "cp",
    "undeploy",
    "deploy",
    "rsync_from_share",
    "cp_from_share",
)
STARTS = 5  # warm runs of `dbguard --version` timed for deploy.dbguard_start_s
# What dbguard keeps of its own at the top of a project or a deployment (the share's .dbguard
# folder, a deployment's marker file): not part of the tree, whoever copied it.
OWN = ".dbguard"
# Seconds for one command: 256 MiB over a slow loopback sshfs, or undeploy reading it all back.
RUN_TIMEOUT = 600.0


@dataclass(frozen=True)
class Tree:
    """A tree of ``files`` files of ``size`` bytes each: ``small`` ones spread over folders two
    levels deep (at most 10 x 10 folders), ``large`` ones in one folder."""

    name: str  # "small" or "large"
    files: int
    size: int

    def paths(self) -> list[str]:
        if self.name == "large":
            return [f"big/part-{index:02d}.bin" for index in range(self.files)]
        return [f"d{index % 10:02d}/s{index // 10 % 10:02d}/f{index:05d}.bin" for index in range(self.files)]

    @property
    def mib(self) -> float:
        return self.files * self.size / MIB


@dataclass(frozen=True)
class Plan:
    small: Tree
    large: Tree
    repetitions: int  # figures are medians over these
    warm_up: bool  # a first, unrecorded round of each tree


FULL = Plan(Tree("small", 2000, 16 * KIB), Tree("large", 4, 64 * MIB), repetitions=3, warm_up=True)
QUICK = Plan(Tree("small", 500, 16 * KIB), Tree("large", 4, 16 * MIB), repetitions=3, warm_up=True)
# For tests/test_bench_deploy.py: runs every code path in seconds (the large file is still above
# the 8 MiB from which dbguard copies a file alone); its figures mean nothing.
TINY = Plan(Tree("small", 24, 16 * KIB), Tree("large", 1, 9 * MIB), repetitions=1, warm_up=False)


def rotated(tools: Sequence[str], rotation: int) -> list[str]:
    """``tools`` in the order of round ``rotation``: each goes first in turn."""
    shift = rotation % len(tools)
    return [*tools[shift:], *tools[:shift]]


def run(quick: bool) -> dict[str, float]:
    return measure(QUICK if quick else FULL)


def missing() -> str | None:
    """Why this section cannot run here, naming what is missing, or None if it can."""
    why = namespaces_unavailable()
    if why is not None:
        return f"the deploy section runs on a simulated host: {why}"
    why = sshfs_unavailable()
    if why is not None:
        return f"the deploy section needs a loopback sshfs mount: {why}"
    absent = [name for name in ("rsync", "cp") if shutil.which(name) is None]
    if absent:
        return (
            f"the deploy section's baselines need {' and '.join(absent)}: install the Debian package(s) "
            f"{' '.join('coreutils' if name == 'cp' else name for name in absent)} "
            "(tools/test installs those listed in DBGUARD_APT_PACKAGES)"
        )
    return None


def measure(plan: Plan) -> dict[str, float]:
    why = missing()
    if why is not None:
        raise RuntimeError(why)
    samples: dict[str, list[float]] = defaultdict(list)
    with Bed.started() as bed:
        sources = {tree.name: bed.make_source(tree) for tree in (plan.small, plan.large)}
        round_ = 0
        if plan.warm_up:
            for tree in (plan.small, plan.large):
                bed.one_round(tree, sources[tree.name], f"warm-up-{tree.name}", rotation=0)
        for rep in range(plan.repetitions):
            for tree in (plan.small, plan.large):
                found = bed.one_round(tree, sources[tree.name], f"r{rep}-{tree.name}", rotation=round_)
                round_ += 1
                for name, value in found.items():
                    samples[name].append(value)
                log.info(
                    "repetition %d/%d, %s tree (%d x %.0f KiB), MiB/s: to the share: sync %.1f "
                    "(inside %.1f), rsync %.1f, rsync --fsync %.1f, cp %.1f; undeploy %.1f; "
                    "from the share: deploy %.1f, rsync %.1f, cp %.1f",
                    rep + 1,
                    plan.repetitions,
                    tree.name,
                    tree.files,
                    tree.size / KIB,
                    *(found[f"{step}_{tree.name}_mib_s"] for step in STEPS),
                )
        samples["dbguard_start_s"] = bed.start_times(STARTS)
    figures = {f"deploy.{name}": statistics.median(values) for name, values in samples.items()}
    figures["deploy.small_files"] = float(plan.small.files)
    figures["deploy.small_file_kib"] = plan.small.size / KIB
    figures["deploy.large_files"] = float(plan.large.files)
    figures["deploy.large_file_mib"] = plan.large.size / MIB
    return figures


# ------------------------------------------------------------------ setting


@dataclass
class Bed:
    """A broker, a share exported by a loopback sshd, and the one host that mounts it at
    `SHARE_MOUNT` and runs every command."""

    export: Path  # the share, as the file server's disk holds it
    host: SimHost

    @classmethod
    @contextlib.contextmanager
    def started(cls) -> Iterator[Bed]:
        """Everything stopped (the host's processes killed) and removed on exit."""
        with contextlib.ExitStack() as stack:
            root = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="dbguard-bench-deploy-", ignore_cleanup_errors=True)
                )
            )
            broker = BrokerProcess(root / "broker" / "state", ttl=30.0, lock_delay=5.0)
            broker.start()
            stack.callback(broker.stop)
            server = stack.enter_context(SshServer(root / "sshd"))
            export = root / "share"
            export.mkdir()
            # No periodic sync by the agent: only the commands timed here copy anything.
            host = SimHost(
                "host-a", root / "hosts", broker, server, export, SHARE_MOUNT, sync_interval="3600"
            )
            stack.callback(host.stop)  # before the server unmounts what is left, and the broker stops
            host.start()
            yield cls(export, host)

    def local(self, inside: str) -> Path:
        """A path of the host's /tmp as this process reaches it."""
        return self.host.tmp / Path(inside).relative_to("/tmp")

    def make_source(self, tree: Tree) -> Path:
        """The tree, made once on the host's local disk (random bytes: nothing compresses)."""
        source = self.host.tmp / f"source-{tree.name}"
        for relative in tree.paths():
            path = source / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(tree.size))
        return source

    # -------------------------------------------------------------- commands

    def command(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """``argv`` run on the host (its namespaces, its environment), never raising on exit codes."""
        return subprocess.run(
            [*self.host.enter(), *argv],
            env=self.host.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def dbguard(self, *args: str) -> dict[str, Any]:
        """`dbguard ARGS --json` on the host, untimed; its answer."""
        done = self.host.run(*args, "--json", timeout=RUN_TIMEOUT)
        return self._answer(args, done)

    def _answer(self, args: Sequence[str], done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
        if done.returncode != 0:
            raise RuntimeError(
                f"dbguard {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-3000:]}\n"
                f"{self.host.agent_log()[-3000:]}"
            )
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    def settle(self, tool: str) -> None:
        """Before a timed step: dirty pages written back, the page cache, dentries and inodes
        dropped, and the program about to run warmed up."""
        os.sync()
        # A container may not let even root drop caches: then the runs start warm, and the
        # log says so (the figures are not comparable with cold ones).
        try:
            DROP_CACHES.write_text("3\n")
        except OSError as exc:
            log.warning("cannot drop the page cache (%s): runs start with warm caches", exc)
        done = self.host.run("--version") if tool == "dbguard" else self.command([tool, "--version"])
        if done.returncode != 0:
            raise RuntimeError(f"{tool} --version failed on the host: {done.stderr.strip()}")

    def start_times(self, count: int) -> list[float]:
        """Seconds of ``count`` runs of `dbguard --version` on the host, after one untimed run."""
        times = []
        for _ in range(count + 1):
            started = time.perf_counter()
            done = self.host.run("--version")
            times.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"dbguard --version failed on the host: {done.stderr.strip()}")
        return times[1:]

    def timed_dbguard(self, *args: str) -> tuple[float, dict[str, Any]]:
        self.settle("dbguard")
        started = time.perf_counter()
        done = self.host.run(*args, "--json", timeout=RUN_TIMEOUT)
        seconds = time.perf_counter() - started
        return seconds, self._answer(args, done)

    def timed(self, argv: Sequence[str]) -> float:
        self.settle(argv[0])
        started = time.perf_counter()
        done = self.command(argv)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-3000:]}")
        return seconds

    # -------------------------------------------------------------- one round

    def one_round(self, tree: Tree, source: Path, label: str, rotation: int) -> dict[str, float]:
        """One round of ``tree`` (see the module docstring); MiB/s of each step and the ratios."""
        project = f"project-{label}"
        shared = f"{SHARE_MOUNT}/{project}"
        up, down = f"/tmp/up-{label}", f"/tmp/down-{label}"
        seconds: dict[str, float] = {}
        try:
            (self.export / project).mkdir()
            self.dbguard("init", shared)
            deployed = self.dbguard("deploy", shared, "--to", up)
            if deployed["files"] != 0:
                raise RuntimeError(f"the deploy of the new project {shared} copied {deployed['files']} files")
            filled = subprocess.run(
                ["cp", "-a", f"{source}/.", str(self.local(up))], capture_output=True, text=True, check=False
            )
            if filled.returncode != 0:
                raise RuntimeError(f"could not fill {up} with the {tree.name} tree: {filled.stderr.strip()}")

            for tool in rotated(TO_SHARE, rotation):
                if tool == "dbguard":
                    seconds["sync"], synced = self.timed_dbguard("sync", shared)
                    self.check_answer("sync", synced, tree, files="copied")
                    # Its answer rounds to milliseconds; no sync over the mount takes less than one.
                    seconds["sync_inside"] = max(float(synced["seconds"]), 0.001)
                    self.check_tree(self.export / project, source, tree, "dbguard sync")
                else:
                    program, *options = BASELINES[tool]
                    # rsync copies what is in DIR (DIR/), cp DIR itself: both make the folder.
                    origin = f"{up}/" if program == "rsync" else up
                    copy = f"{SHARE_MOUNT}/{tool}-{label}"
                    seconds[tool.replace("-", "_")] = self.timed([program, *options, origin, copy])
                    self.check_tree(self.export / f"{tool}-{label}", source, tree, " ".join(BASELINES[tool]))

            seconds["undeploy"], undeployed = self.timed_dbguard("undeploy", shared)
            if undeployed["synced"] is None or undeployed["synced"]["copied"] != 0:
                raise RuntimeError(f"the undeploy right after a sync copied something: {undeployed}")
            if undeployed["checked"] != tree.files or not undeployed["released"]:
                raise RuntimeError(
                    f"the undeploy did not check all {tree.files} files or release: {undeployed}"
                )

            for tool in rotated(FROM_SHARE, rotation):
                if tool == "dbguard":
                    seconds["deploy"], deployed = self.timed_dbguard("deploy", shared, "--to", down)
                    self.check_answer("deploy", deployed, tree, files="files")
                    self.check_tree(self.local(down), source, tree, "dbguard deploy")
                else:
                    program, *options = BASELINES[tool]
                    origin = f"{SHARE_MOUNT}/{tool}-{label}" + ("/" if program == "rsync" else "")
                    copy = f"/tmp/{tool}-{label}"
                    seconds[f"{tool}_from_share"] = self.timed([program, *options, origin, copy])
                    self.check_tree(
                        self.local(copy), source, tree, f"{' '.join(BASELINES[tool])} from the share"
                    )
            self.dbguard("undeploy", shared)
        finally:
            self.clean(project, label)
        found = {f"{step}_{tree.name}_mib_s": tree.mib / took for step, took in seconds.items()}
        for ratio, (ours, theirs) in RATIOS.items():
            found[f"{ratio}_{tree.name}"] = seconds[theirs] / seconds[ours]
        return found

    def clean(self, project: str, label: str) -> None:
        """Everything a round made, removed (on the share from the server's side, faster than
        through the mount); a deployment left by a failed round is forgotten with its folder."""
        for path in (
            self.export / project,
            *(self.export / f"{tool}-{label}" for tool in BASELINES),
            *(self.local(f"/tmp/{name}-{label}") for name in ("up", "down", *BASELINES)),
        ):
            shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------- checks

    @staticmethod
    def check_answer(command: str, answer: dict[str, Any], tree: Tree, *, files: str) -> None:
        if answer[files] != tree.files or answer["bytes"] != tree.files * tree.size:
            raise RuntimeError(
                f"dbguard {command} reports {answer[files]} files and {answer['bytes']} bytes, not the "
                f"{tree.files} files and {tree.files * tree.size} bytes of the {tree.name} tree: {answer}"
            )

    @staticmethod
    def check_tree(copy: Path, source: Path, tree: Tree, by: str) -> None:
        """``copy`` holds exactly the files of ``source`` (dbguard's own aside), each with the
        same size and bytes."""
        found = sorted(
            str(path.relative_to(copy))
            for path in copy.rglob("*")
            if path.is_file() and not path.relative_to(copy).parts[0].startswith(OWN)
        )
        if found != sorted(tree.paths()):
            extra = sorted(set(found) - set(tree.paths()))[:5]
            lacking = sorted(set(tree.paths()) - set(found))[:5]
            raise RuntimeError(f"{by} left {copy} with {len(found)} files (extra {extra}, missing {lacking})")
        for relative in found:
            ours, theirs = copy / relative, source / relative
            if ours.stat().st_size != tree.size or not filecmp.cmp(ours, theirs, shallow=False):
                raise RuntimeError(f"{by} left {ours} different from {theirs}")
