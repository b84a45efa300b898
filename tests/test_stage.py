"""Staged project folders: `dbguard deploy` to a node's local disk, `sync` back under the lease,
`undeploy`; on whole simulated hosts with their own hostnames, /tmp and sshfs mounts of the
share, with agents killed, hosts frozen past the TTL and a share that runs out of space."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import MakeSimHost, sim_hosts, small_tmpfs
from tools.sshfs import sshfs_unavailable
from tools.testbed import LeaseBackend, SimHost, namespaces_unavailable, wait_for

_WHY_NOT = namespaces_unavailable() or sshfs_unavailable()
if _WHY_NOT and os.environ.get("CI") != "true":
    pytestmark = pytest.mark.skip(
        reason=f"simulated hosts need namespaces and sshfs (run as root): {_WHY_NOT}"
    )

WORK = "/tmp/work"  # the deployment, on each host's own /tmp


@pytest.fixture
def make_host(
    tmp_path: Path, broker: LeaseBackend, shared: Path, request: pytest.FixtureRequest
) -> Iterator[MakeSimHost]:
    with sim_hosts(tmp_path, broker, shared, request) as make:
        yield make


def run_json(host: SimHost, *args: str) -> Any:
    result = host.run(*args, "--json")
    assert result.returncode == 0, f"dbguard {' '.join(args)} on {host.name}: {result.stderr}"
    return json.loads(result.stdout)


def tree_of(root: Path) -> dict[str, str]:
    """Every file (its sha256), link (its target) and folder under ``root``, but `.dbguard/`."""
    found: dict[str, str] = {}
    for directory, folders, files in os.walk(root):
        here = Path(directory)
        rel = here.relative_to(root)
        if rel.parts[:1] == (".dbguard",):
            continue
        for name in folders + files:
            path = here / name
            key = str(rel / name) if str(rel) != "." else name
            if key in (".dbguard", ".dbguard-deployment"):  # dbguard's own, on either side
                continue
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        folders[:] = [f for f in folders if not (here / f).is_symlink()]
    return found


def tree_seen_by(host: SimHost, path: str) -> dict[str, str]:
    """``tree_of`` as ``host`` sees ``path`` (through its own sshfs mount for the share)."""
    code = textwrap.dedent(
        f"""
        import hashlib, json, os
        from pathlib import Path
        root = Path({path!r}); found = {{}}
        for directory, folders, files in os.walk(root):
            here = Path(directory); rel = here.relative_to(root)
            if rel.parts[:1] == (".dbguard",):
                continue
            for name in folders + files:
                p = here / name
                key = str(rel / name) if str(rel) != "." else name
                if key in (".dbguard", ".dbguard-deployment"):  # dbguard's own, on either side
                    continue
                if p.is_symlink():
                    found[key] = "-> " + os.readlink(p)
                elif p.is_dir():
                    found[key] = "dir"
                else:
                    found[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            folders[:] = [f for f in folders if not (here / f).is_symlink()]
        print(json.dumps(found))
        """
    )
    result = host.python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    tree: dict[str, str] = json.loads(result.stdout)
    return tree


def make_project(shared: Path, *, big: int = 200 << 20) -> None:
    """Nested folders, small files, one large file and symbolic links (to a file, to a folder)."""
    (shared / "raw" / "2026" / "run1").mkdir(parents=True)
    (shared / "relion" / "Class2D").mkdir(parents=True)
    for n in range(20):
        (shared / "raw" / "2026" / "run1" / f"mic{n:03d}.txt").write_text(f"micrograph {n}\n" * (n + 1))
    (shared / "relion" / "Class2D" / "run_it025_data.star").write_text("data_\nloop_\n" * 100)
    chunk = os.urandom(1 << 20)
    with open(shared / "raw" / "stack.mrcs", "wb") as out:
        for n in range(big >> 20):
            out.write(chunk[n:] + chunk[:n])
    os.symlink("raw/2026/run1/mic000.txt", shared / "first.txt")
    os.symlink("relion/Class2D", shared / "latest")


def test_deploy_work_sync_undeploy_and_the_next_host_takes_over(make_host: MakeSimHost, shared: Path) -> None:
    make_project(shared)
    a, b = make_host("ws-a", "/mnt/a/proj"), make_host("ws-b", "/mnt/b/proj")
    run_json(a, "init")
    deployed = run_json(a, "deploy", "--to", WORK)
    work = a.tmp / "work"
    assert deployed["bytes"] >= 200 << 20
    assert tree_of(work) == tree_of(shared)
    assert os.readlink(work / "latest") == "relion/Class2D"

    # Every host sees who works where; nobody else can deploy meanwhile.
    state = run_json(b, "status")["projects"][0]
    assert state["deployment"]["host"] == "ws-a" and state["deployment"]["dir"] == WORK
    assert state["deployment"]["state"] == "deployed"
    refused = b.run("deploy", "--to", WORK)
    assert refused.returncode == 3 and "ws-a" in refused.stderr

    # Work in the deployment: change, create, delete files, folders and links.
    (work / "relion" / "Class2D" / "run_it025_data.star").write_text("changed\n")
    (work / "relion" / "Class3D" / "job001").mkdir(parents=True)
    (work / "relion" / "Class3D" / "job001" / "run_class001.mrc").write_bytes(os.urandom(3 << 20))
    (work / "raw" / "2026" / "run1" / "mic005.txt").unlink()
    for n in range(10, 20):
        (work / "raw" / "2026" / "run1" / f"mic{n:03d}.txt").unlink()
    (work / "first.txt").unlink()
    os.symlink("relion/Class3D/job001/run_class001.mrc", work / "first.txt")
    os.symlink("relion/Class3D", work / "newest")
    before = tree_of(shared)
    synced = run_json(a, "sync")
    assert synced["copied"] == 2 and synced["deleted"] == 11 and synced["links"] == 2
    expected = tree_of(work)
    # B browses the share through its own mount, whose client caches directory listings for a
    # while (as an NFS client does): it sees the new tree once its cache expires, and never a
    # file that is neither the old one nor the new one.
    seen: list[dict[str, str]] = []

    def b_sees_the_new_tree() -> bool:
        seen.append(tree_seen_by(b, "/mnt/b/proj"))
        return seen[-1] == expected

    assert wait_for(b_sees_the_new_tree, timeout=45, interval=2.0), seen[-1]
    for view in seen:
        assert all(view[path] in (before.get(path), expected.get(path)) for path in view), view

    more = work / "notes.txt"
    more.write_text("written after the last sync\n")
    expected = tree_of(work)
    undeployed = run_json(a, "undeploy")
    assert undeployed["released"] and undeployed["checked"] >= 12
    assert not work.exists()
    assert tree_of(shared) == expected, undeployed
    assert run_json(b, "status")["projects"][0]["deployment"] is None
    taken = run_json(b, "deploy", "--to", WORK)
    assert taken["token"] > deployed["token"]
    assert tree_of(b.tmp / "work") == expected


def test_a_deploy_to_a_network_filesystem_is_refused_before_the_lease_is_taken(
    make_host: MakeSimHost,
) -> None:
    a = make_host("ws-a", "/mnt/a/proj")
    run_json(a, "init")
    refused = a.run("deploy", "--to", "/mnt/a/proj/work")  # on the share's sshfs mount
    assert refused.returncode == 5 and "fuse.sshfs" in refused.stderr and "local disk" in refused.stderr
    assert run_json(a, "status")["projects"][0]["state"] == "free"


def test_the_agent_killed_mid_sync_leaves_each_file_old_or_new_and_the_next_sync_finishes(
    make_host: MakeSimHost, shared: Path
) -> None:
    (shared / "data").mkdir()
    old = {f"data/part{n:02d}.bin": os.urandom(2 << 20) for n in range(40)}
    for name, body in old.items():
        (shared / name).write_bytes(body)
    a = make_host("ws-a", "/mnt/a/proj", sync_interval="1")
    run_json(a, "init")
    run_json(a, "deploy", "--to", WORK)
    work = a.tmp / "work"
    new = {name: os.urandom(2 << 20) for name in old}
    for name, body in new.items():
        (work / name).write_bytes(body)
    # The agent's periodic sync starts within a second; kill the agent once it has published
    # some files but not all.
    assert wait_for(lambda: any((shared / n).read_bytes() == new[n] for n in new), timeout=30)
    a.kill_agent()
    landed = 0
    for name in new:
        body = (shared / name).read_bytes()
        assert body in (old[name], new[name]), f"{name} is torn"
        landed += body == new[name]
    assert landed > 0, landed
    finished = run_json(a, "sync")
    assert finished["copied"] <= len(new)
    assert all((shared / name).read_bytes() == new[name] for name in new)
    assert not [p for p in (shared / "data").iterdir() if p.name.startswith(".dbguard-sync-")]
    assert tree_of(shared) == tree_of(work)


def test_a_frozen_holder_broken_by_an_operator_publishes_nothing_after_the_new_holder(
    make_host: MakeSimHost, shared: Path
) -> None:
    (shared / "results").mkdir()
    (shared / "results" / "model.txt").write_text("before\n")
    a = make_host("ws-a", "/mnt/a/proj", sync_interval="0.5")
    b = make_host("ws-b", "/mnt/b/proj")
    run_json(a, "init")
    run_json(a, "deploy", "--to", WORK)
    a.pause()
    try:
        # A deployed project is dirty: its holder frozen past the TTL leaves it orphaned.
        assert wait_for(lambda: run_json(b, "status")["projects"][0]["state"] == "orphaned", timeout=20)
        work = a.tmp / "work"
        (work / "results" / "model.txt").write_text("A's work after the break\n")
        (work / "results" / "extra.txt").write_text("new on A\n")
        broken = run_json(b, "break", ".", "--force")
        assert broken["broken"]["host"] == "ws-a"
        run_json(b, "deploy", "--to", WORK)
        after_b = tree_of(shared)
    finally:
        a.resume()
    # A wakes up with changes to sync, and its agent's periodic sync comes round: refused.
    time.sleep(3)
    assert tree_of(shared) == after_b
    refused = a.run("sync")
    assert refused.returncode == 3 and "recover" in refused.stderr
    assert tree_of(shared) == after_b
    kept = run_json(a, "recover")["deployments"]
    assert len(kept) == 1 and kept[0]["dir"] == WORK
    assert sorted(kept[0]["unsynced"]) == ["results/extra.txt", "results/model.txt"]
    assert (a.tmp / "work" / "results" / "extra.txt").exists()  # nothing of A's work is lost


def test_a_full_share_during_a_sync_is_refused_with_exit_7_and_nothing_is_lost(
    tmp_path: Path, broker: LeaseBackend, request: pytest.FixtureRequest
) -> None:
    with small_tmpfs(tmp_path / "small", "24m") as small:
        project = small / "proj"
        project.mkdir()
        (project / "small.txt").write_text("fits\n")
        with sim_hosts(tmp_path, broker, project, request) as make:
            a = make("ws-a", "/mnt/a/proj")
            run_json(a, "init")
            run_json(a, "deploy", "--to", WORK)
            work = a.tmp / "work"
            big = os.urandom(40 << 20)
            (work / "big.bin").write_bytes(big)
            (work / "small.txt").write_text("changed\n")
            refused = a.run("sync")
            assert refused.returncode == 7, refused.stderr
            assert "nothing was lost" in refused.stderr
            assert (work / "big.bin").read_bytes() == big
            assert not (project / "big.bin").exists()
            assert not [p for p in project.iterdir() if p.name.startswith(".dbguard-sync-")]
            # Room made: the next sync carries everything over.
            (work / "big.bin").write_bytes(big[: 4 << 20])
            run_json(a, "sync")
            assert tree_of(project) == tree_of(work)


def test_a_deployment_folder_made_again_empty_deletes_nothing_and_release_waits_for_undeploy(
    make_host: MakeSimHost, shared: Path
) -> None:
    (shared / "keep").mkdir()
    (shared / "keep" / "results.star").write_text("data_\n")
    a = make_host("ws-a", "/mnt/a/proj")
    run_json(a, "init")
    run_json(a, "deploy", "--to", WORK)
    before = tree_of(shared)
    refused = a.run("release")
    assert refused.returncode == 8 and "dbguard undeploy" in refused.stderr
    # A reboot or a scratch cleaner: the folder is there again, empty.
    work = a.tmp / "work"
    for path in sorted(work.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    work.rmdir()
    work.mkdir()
    refused = a.run("sync")
    assert refused.returncode == 6 and "not the folder" in refused.stderr, refused.stderr
    assert tree_of(shared) == before
    discarded = run_json(a, "undeploy", "--discard")
    assert discarded["released"] and not work.exists()
    assert tree_of(shared) == before


def test_records_on_the_share_cannot_make_deploy_write_outside_its_folder(
    make_host: MakeSimHost, shared: Path
) -> None:
    (shared / ".dbguard").mkdir()
    (shared / ".dbguard" / "symlinks.json").write_text(
        json.dumps({"links": {"x": "/tmp/outside", "x/evil": "/etc/passwd", "../up": "/"}})
    )
    a = make_host("ws-a", "/mnt/a/proj")
    (a.tmp / "outside").mkdir()
    run_json(a, "init")
    run_json(a, "deploy", "--to", WORK)
    assert os.readlink(a.tmp / "work" / "x") == "/tmp/outside"  # a link as recorded, and no more
    assert list((a.tmp / "outside").iterdir()) == []
    assert not (a.tmp / "up").exists()
