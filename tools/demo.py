"""A narrated demo of dbguard on a cluster of one: run by `tools/demo`.

Two workstations, ws1 and ws2, share one project directory. As root each runs in its own UTS
namespace, so it has its own hostname; otherwise they differ only by cache directory. Every
command shown is the real `dbguard` command, with its real output and exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.testbed import free_port, namespaces_unavailable

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
PAUSE = 0.6 if sys.stdout.isatty() else 0.0


class Workstation:
    def __init__(self, name: str, root: Path, env: dict[str, str], isolated: bool) -> None:
        self.name = name
        self.isolated = isolated
        # Each workstation has its own cache and its own idea of "this machine's broker state",
        # so ws2's `dbguard down` stops only ws2's agent; ws1 started the broker.
        self.env = {
            **env,
            "DBGUARD_CACHE": str(root / name / "cache"),
            "XDG_STATE_HOME": str(root / name / "state"),
        }

    def command(self, args: list[str]) -> list[str]:
        base = [sys.executable, "-m", "dbguard", *args]
        if self.isolated:
            return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *base]
        return base

    def run(self, *args: str, note: str = "") -> subprocess.CompletedProcess[str]:
        if note:
            print(f"\n{DIM}# {note}{RESET}")
        print(f"{BOLD}{self.name}$ dbguard {' '.join(args)}{RESET}")
        result = subprocess.run(
            self.command(list(args)), env=self.env, capture_output=True, text=True, check=False
        )
        for line in (result.stdout + result.stderr).strip().splitlines():
            print(f"  {line}")
        print(f"{DIM}  (exit code {result.returncode}){RESET}")
        time.sleep(PAUSE)
        return result

    def start(self, *args: str, note: str) -> subprocess.Popen[str]:
        print(f"\n{DIM}# {note}{RESET}")
        print(f"{BOLD}{self.name}$ dbguard {' '.join(args)} &{RESET}")
        return subprocess.Popen(
            self.command(list(args)),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="dbguard-demo-"))
    why_not = namespaces_unavailable()
    env = {
        **os.environ,
        "DBGUARD_BROKER": f"tcp://127.0.0.1:{free_port()}",
        "DBGUARD_TTL": "6",
        "XDG_CONFIG_HOME": str(root / "config"),
    }
    ws1, ws2 = (Workstation(name, root, env, why_not is None) for name in ("ws1", "ws2"))
    project = root / "lab" / "ribosome-2026"
    project.mkdir(parents=True)
    print(f"{BOLD}dbguard demo{RESET}: a cluster of one in {root}")
    if why_not:
        print(f"(both workstations share this machine's hostname: {why_not})")
    exit_codes = []
    try:
        ws1.run("up", note="start a broker and this workstation's agent: no configuration needed")
        ws1.run("init", str(project), note="make the shared directory a project (its id lives in .dbguard/)")
        exit_codes.append(ws1.run("acquire", str(project), note="ws1 becomes the writer").returncode)
        held = ws2.run(
            "acquire", str(project), note="ws2 tries too: refused, told who holds it (exit code 3)"
        )
        exit_codes.append(0 if held.returncode == 3 else 1)
        ws2.run("status", str(project), note="anyone can see who writes, since when, with which token")
        waiting = ws2.start(
            "acquire",
            str(project),
            "--wait",
            "30",
            note="ws2 queues for the project (first come, first served)",
        )
        time.sleep(1.0)
        ws1.run("release", str(project), note="ws1 is done and releases")
        output, _ = waiting.communicate(timeout=30)
        print("\n".join(f"  {line}" for line in output.strip().splitlines()))
        print(f"{DIM}  (ws2's queued acquire exited with {waiting.returncode}){RESET}")
        exit_codes.append(waiting.returncode)
        taken = ws1.run(
            "acquire",
            str(project),
            "--takeover",
            note="ws1 needs it back now: --takeover asks ws2's agent to hand it over",
        )
        exit_codes.append(taken.returncode)
        print(f"\n{DIM}# the human-readable record in the project, for anyone to cat{RESET}")
        print(f"{BOLD}$ cat {project}/.dbguard/writer.json{RESET}")
        print(
            "\n".join(f"  {line}" for line in (project / ".dbguard" / "writer.json").read_text().splitlines())
        )
        ws1.run("release", str(project), note="done for the day")
    finally:
        ws2.run("down", note="stop ws2's agent")
        ws1.run("down", note="stop ws1's agent and the broker `up` started")
    ok = all(code == 0 for code in exit_codes)
    print(f"\n{BOLD}demo {'finished' if ok else 'FAILED'}{RESET}; files left in {root}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
