"""A narrated tour of dbguard on a cluster of one: run by `tools/demo` (`--keep` leaves it running).

Three simulated hosts share one lab folder: two workstations, ws1 and ws2, and the head node,
head. As root each runs in its own UTS namespace, so it has its own hostname; otherwise they
share this machine's hostname and differ only by cache directory. Every command shown is the
real command, run on that host with its real output and exit code; the Python shown is the
code that runs. The tour exits 0 only if every step that must succeed did and every refusal
that must happen did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.testbed import free_port, namespaces_unavailable

TTY = sys.stdout.isatty()
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if TTY else ("", "", "")
PAUSE = 0.6 if TTY else 0.0
TTL = 6.0
PROJECT = "ribosome-2026"  # every host runs its commands in the lab folder that holds it
QUOTED = json.dumps(PROJECT)  # as the Python shown spells it
# The address `dbguard up` gives the status page at.
PAGE_URL = re.compile(r"https?://[\w.\-]+(?::\d+)?/\S*")


def say(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    say(f"\n{DIM}# {text}{RESET}")


def indented(text: str) -> None:
    for line in text.rstrip().splitlines():
        say(f"  {line}")


class Tour:
    """The checks the tour makes: a command that must succeed, a refusal that must happen."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, result: subprocess.CompletedProcess[str], code: int, what: str) -> bool:
        if result.returncode != code:
            self.failures.append(f"{what}: exit code {result.returncode}, expected {code}")
            say(f"{BOLD}  !! expected exit code {code} here{RESET}")
            return False
        return True

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            say(f"{BOLD}  !! {what}{RESET}")
        return ok


class Host:
    """A simulated host: its own cache and state directory and, as root, its own hostname."""

    def __init__(self, name: str, root: Path, env: dict[str, str], isolated: bool, cwd: Path) -> None:
        self.name = name
        self.isolated = isolated
        self.cwd = cwd
        self.cache = root / name / "cache"
        # Each host has its own idea of "this machine's broker state", so that head's and ws2's
        # `dbguard down` stop only their agents; ws1 started the broker.
        self.env = {**env, "DBGUARD_CACHE": str(self.cache), "XDG_STATE_HOME": str(root / name / "state")}

    def on_host(self, argv: list[str]) -> list[str]:
        if self.isolated:
            return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]
        return argv

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.on_host(argv),
            env=self.env,
            cwd=self.cwd,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def _show(self, shown: str, result: subprocess.CompletedProcess[str]) -> None:
        say(f"{BOLD}{self.name}$ {shown}{RESET}")
        indented(result.stdout + result.stderr)
        say(f"{DIM}  (exit code {result.returncode}){RESET}")
        time.sleep(PAUSE)

    def dbguard(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `dbguard ARGS` here and show it."""
        result = self.quietly(*args)
        self._show(f"dbguard {shlex.join(args)}", result)
        return result

    def quietly(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `dbguard ARGS` here without showing it (the tour's own polling)."""
        return self._run([sys.executable, "-m", "dbguard", *args])

    def status(self) -> dict[str, Any]:
        result = self.quietly("status", PROJECT, "--json")
        if result.returncode != 0:
            return {}
        item: dict[str, Any] = json.loads(result.stdout)["projects"][0]
        return item

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        """Run a Python script here, shown as the heredoc it is."""
        code = textwrap.dedent(code).strip() + "\n"
        result = self._run([sys.executable, "-"], stdin=code)
        self._show("python - <<'EOF'\n" + code + "EOF", result)
        return result

    def shell(self, command: str) -> subprocess.CompletedProcess[str]:
        result = self._run(["sh", "-c", command])
        self._show(command, result)
        return result

    def start(self, *args: str, shown: str) -> subprocess.Popen[str]:
        say(f"{BOLD}{self.name}$ dbguard {shown} &{RESET}")
        return subprocess.Popen(
            self.on_host([sys.executable, "-m", "dbguard", *args]),
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def agent_pid(self) -> int | None:
        """The pid in the agent's lock file, if that process is this host's dbguard agent."""
        try:
            pid = int((self.cache / "agent.lock").read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        ours = f"DBGUARD_CACHE={self.cache}".encode() in environ
        return pid if b"agent" in command and ours else None


def section(number: int, title: str) -> None:
    say(f"\n{BOLD}== {number}. {title} =={RESET}")


def wait_until(predicate: Any, timeout: float) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.25)
    return None


def tour(ws1: Host, ws2: Host, head: Host, root: Path, t: Tour) -> str | None:
    """The story; returns the status page's address if `dbguard up` printed one."""
    section(1, "ws1 starts working on the project")
    note("start a broker and this workstation's agent: no configuration needed")
    up = ws1.dbguard("up")
    t.expect(up, 0, "ws1: dbguard up")
    page = PAGE_URL.search(up.stdout + up.stderr)
    if page is None:
        t.failures.append("ws1: dbguard up printed no status page address")
    note("make the shared folder a project (its id lives in ribosome-2026/.dbguard/)")
    t.expect(ws1.dbguard("init", PROJECT), 0, "ws1: dbguard init")
    note("ws1 becomes the writer: one host at a time may write a project")
    t.expect(ws1.dbguard("acquire", PROJECT), 0, "ws1: dbguard acquire")
    note("a script on ws1 writes particle images: they land in ws1's local cache, not on the share")
    wrote = ws1.python(
        f"""
        import dbguard, numpy
        rng = numpy.random.default_rng(1)
        with dbguard.open({QUOTED}, "particles", "w") as db:
            for i in range(12):
                image = rng.normal(size=(64, 64)).astype(numpy.float32)
                db.append(image, {{"micrograph": i // 4, "defocus_um": round(1.5 + 0.1 * i, 2)}})
            print(len(db), "particles in ws1's cache")
        """
    )
    t.expect(wrote, 0, "ws1: writing images from Python")

    section(2, "the head node browses while ws1 writes")
    note("head sees only what the writer has flushed to the share, and how much waits on ws1")
    early = head.dbguard("browse", PROJECT)
    t.expect(early, 0, "head: dbguard browse before the flush")
    t.check("no databases flushed yet" in early.stdout, "head saw records before ws1 flushed them")
    note("ws1 flushes: its records go to the share as one whole new generation")
    t.expect(ws1.dbguard("flush", PROJECT), 0, "ws1: dbguard flush")
    browsed = head.dbguard("browse", PROJECT)
    t.expect(browsed, 0, "head: dbguard browse")
    t.check("particles" in browsed.stdout, "head does not see the flushed particles")
    note("every record with its attributes, read-only, no lease needed")
    t.expect(head.dbguard("ls", PROJECT, "particles"), 0, "head: dbguard ls")
    note("but head may not write: the project is ws1's (exit code 3 names the holder)")
    t.expect(head.dbguard("acquire", PROJECT), 3, "head: dbguard acquire must be refused")
    note("from Python too: reading needs no lease, opening to write is refused before anything is written")
    refused = head.python(
        f"""
        import dbguard
        with dbguard.open({QUOTED}, "particles") as db:  # mode "r"
            print(len(db), "particles; the first is", db[0].shape, db.attrs(0))
        try:
            dbguard.open({QUOTED}, "particles", "a")
        except dbguard.LeaseHeld as refused:
            print("refused:", refused)
            raise SystemExit(refused.exit_code)
        """
    )
    t.expect(refused, 3, "head: opening for write from Python must be refused")

    section(3, "a tool runs under the lease on ws1")
    note("`dbguard run` holds the lease while a command runs (--keep: still held after it)")
    script = (
        "import mrcfile, numpy, time; time.sleep(4); "
        f'mrcfile.write("{PROJECT}/average.mrc", numpy.zeros((32, 32, 32), numpy.float32), '
        'voxel_size=1.06, overwrite=True); print("wrote average.mrc")'
    )
    shown = shlex.join(["run", PROJECT, "--keep", "--", "python", "-c", script])
    running = ws1.start("run", PROJECT, "--keep", "--", sys.executable, "-c", script, shown=shown)
    # The run tells the lease service what it runs once its command has started.
    t.check(
        wait_until(lambda: bool((head.status().get("writer") or {}).get("command")), 10) is not None,
        "status never showed the command `dbguard run` runs",
    )
    note("meanwhile anyone can see what the writer is running, and its pid")
    t.expect(head.dbguard("status", PROJECT), 0, "head: dbguard status during run")
    try:
        output, _ = running.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        running.kill()
        output, _ = running.communicate()
    note("the command ends; `dbguard run` exits with the command's exit code")
    say(f"{BOLD}ws1$ wait{RESET}")
    indented(output)
    say(f"{DIM}  (exit code {running.returncode}){RESET}")
    t.check(running.returncode == 0, f"ws1: dbguard run exited with {running.returncode}")

    section(4, "ws1 is done; the work moves to ws2")
    note("before switching machines, `clear`: flush, read every record back, drop the cache, release")
    t.expect(ws1.dbguard("clear", PROJECT), 0, "ws1: dbguard clear")
    note("now ws2 may take over the project")
    t.expect(ws2.dbguard("acquire", PROJECT), 0, "ws2: dbguard acquire")
    more = ws2.python(
        f"""
        import dbguard, numpy
        with dbguard.open({QUOTED}, "particles", "a") as db:
            for i in range(8):
                db.append(numpy.full((64, 64), i, numpy.float32), {{"micrograph": 3 + i // 4}})
            print(len(db), "particles now: 12 from ws1 on the share, 8 new in ws2's cache")
        """
    )
    t.expect(more, 0, "ws2: writing images from Python")
    t.expect(ws2.dbguard("flush", PROJECT), 0, "ws2: dbguard flush")

    section(5, "ws2 crashes with unflushed data")
    note("ws2 writes 6 more particles; nobody flushes them")
    unflushed = ws2.python(
        f"""
        import dbguard, numpy
        with dbguard.open({QUOTED}, "particles", "a") as db:
            db.extend(numpy.ones((6, 64, 64), numpy.float32))
            print(len(db), "particles; the last 6 exist only in ws2's cache")
        """
    )
    t.expect(unflushed, 0, "ws2: writing unflushed images")
    note("ws2's agent dies (SIGKILL, as in a crash): its pid is in agent.lock in ws2's cache directory")
    victim = ws2.agent_pid()
    if t.check(victim is not None, "ws2 has no running agent to kill"):
        kill = 'pid=$(cat "$DBGUARD_CACHE/agent.lock") && kill -KILL "$pid" && echo "killed pid $pid"'
        killed = ws2.shell(kill)
        t.expect(killed, 0, "killing ws2's agent")
    note(f"no heartbeats from ws2: after the TTL ({TTL:g} s here, 30 by default) the broker gives up on it")
    waited = wait_until(lambda: head.status().get("state") == "orphaned", 4 * TTL)
    if t.check(waited is not None, "the project was never orphaned"):
        say(f"{DIM}  (after {waited:.1f} s){RESET}")
    note("orphaned, not free: ws2 may hold records nobody else has, so nobody else gets the lease")
    t.expect(head.dbguard("status", PROJECT), 0, "head: dbguard status of the orphaned project")
    note("ws1 wants to carry on: refused, and told why")
    t.expect(ws1.dbguard("acquire", PROJECT), 3, "ws1: acquiring the orphaned project must be refused")

    section(6, "the operator breaks the lease; ws2 recovers what it kept")
    note("breaking takes --force, and says what it would do without it (exit code 2)")
    t.expect(head.dbguard("break", PROJECT), 2, "head: dbguard break without --force must be refused")
    t.expect(head.dbguard("break", PROJECT, "--force"), 0, "head: dbguard break --force")
    note("the project is free again: ws1 carries on from the share (12 + 8 particles)")
    t.expect(ws1.dbguard("acquire", PROJECT), 0, "ws1: dbguard acquire after the break")
    note("ws2 comes back: its agent finds its lease broken and keeps the unflushed records aside")
    recovered = ws2.dbguard("recover")
    t.expect(recovered, 0, "ws2: dbguard recover")
    t.check("unflushed" in recovered.stdout, "ws2's recover lists nothing kept aside")
    note("--export writes what was kept as .npy files (attributes in .json beside them), to look at")
    kept = root / "ws2" / "kept"
    t.expect(ws2.dbguard("recover", "--export", str(kept)), 0, "ws2: dbguard recover --export")
    note("ws2 may not write the project any more: the lease is ws1's now")
    t.expect(ws2.dbguard("acquire", PROJECT), 3, "ws2: acquiring ws1's project must be refused")
    t.expect(ws1.dbguard("release", PROJECT), 0, "ws1: dbguard release")

    section(7, "the record")
    note("what the share holds at the end: 20 particles; the 6 stranded ones are in ws2's kept/ folder")
    t.expect(head.dbguard("browse", PROJECT), 0, "head: final dbguard browse")
    note("the project's history: grants, releases, expiries, orphanings, breaks, flushes")
    t.expect(head.dbguard("log", PROJECT), 0, "head: dbguard log")
    return page.group(0) if page else None


def stop_commands(hosts: list[Host]) -> list[str]:
    """How to stop each host's agent (ws1 last: it also stops the broker `up` started)."""
    names = ("DBGUARD_BROKER", "DBGUARD_CACHE", "XDG_STATE_HOME", "XDG_CONFIG_HOME")
    installed = Path(sys.executable).parent / "dbguard"  # the venv's, also off its PATH
    command = shlex.join([str(installed)] if installed.exists() else [sys.executable, "-m", "dbguard"])
    return [
        " ".join(f"{name}={shlex.quote(host.env[name])}" for name in names) + f" {command} down"
        for host in hosts
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the broker, the agents and the status page running after the tour",
    )
    options = parser.parse_args()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="dbguard-demo-"))
    lab = root / "lab"
    (lab / PROJECT).mkdir(parents=True)
    why_not = namespaces_unavailable()
    env = {
        # Nothing of this machine's own dbguard settings (a site broker, keys, DBGUARD_GUARD=1).
        **{key: value for key, value in os.environ.items() if not key.startswith("DBGUARD_")},
        "DBGUARD_BROKER": f"tcp://127.0.0.1:{free_port()}",
        "DBGUARD_TTL": f"{TTL:g}",
        # Agents also flush every 30 s by themselves; here only the flushes you see move data,
        # so that the crash in step 5 strands what it should.
        "DBGUARD_FLUSH_INTERVAL": "3600",
        "XDG_CONFIG_HOME": str(root / "config"),
    }
    ws1, ws2, head = (Host(name, root, env, why_not is None, lab) for name in ("ws1", "ws2", "head"))
    say(f"{BOLD}dbguard tour{RESET}: a broker, two workstations (ws1, ws2) and a head node (head)")
    say(f"sharing the lab folder {lab}; every host runs its commands there, on project {PROJECT}.")
    say(f"Lease TTL {TTL:g} s (default 30) so that expiries happen while you watch; agents do not")
    say("flush on their own here (default: every 30 s), so only the flushes you see move data.")
    if why_not:
        say(f"(all hosts share this machine's hostname and differ only by cache directory: {why_not})")
    t = Tour()
    page: str | None = None
    try:
        page = tour(ws1, ws2, head, root, t)
    except subprocess.TimeoutExpired as exc:
        t.failures.append(f"a command did not finish: {exc}")
    finally:
        hosts = [head, ws2, ws1]
        if options.keep:
            script = root / "down.sh"
            script.write_text("\n".join(["#!/bin/sh", *stop_commands(hosts)]) + "\n")
            script.chmod(0o755)
            say(f"\n{BOLD}still running{RESET} (--keep): what `dbguard up` started on ws1, and the agents.")
            say("To stop them, run `dbguard down` with each host's settings, ws1 last (it stops the broker):")
            for line in stop_commands(hosts):
                say(f"  {line}")
            say(f"or all at once: {BOLD}sh {script}{RESET}")
        else:
            for host in hosts:
                what = "what `dbguard up` started there" if host is ws1 else "nothing else"
                note(f"stop {host.name}'s agent, and {what}")
                host.dbguard("down")
    say("")
    if page:
        say(f"{BOLD}status page: {page}{RESET}")
        if options.keep:
            say("(open it in a browser while the tour's broker runs)")
        else:
            say("(stopped with the broker; run `tools/demo --keep` to leave it up and open it)")
    else:
        say("status page: `dbguard up` printed no http:// address (counted as a failure above)")
    elapsed = time.monotonic() - started
    if t.failures:
        say(f"{BOLD}tour FAILED{RESET} ({elapsed:.0f} s); files left in {root}")
        for failure in t.failures:
            say(f"  - {failure}")
        return 1
    say(f"{BOLD}tour finished{RESET} in {elapsed:.0f} s; files left in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
