"""The status page in a real browser (Debian's headless Chromium, driven by Playwright) and its
/metrics scraped and parsed with the Prometheus client's own parser, against a real broker and
real agents: one project held with a host queued for it, one orphaned with stranded data."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbguard.cache import CacheStore
from tests.support import TTL, acquire, fail_or_skip, project_state, script
from tools.testbed import Host, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Where the screenshot goes: a test artefact, and the README's picture is a copy of it.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@dataclass
class Site:
    url: str
    held: Path
    orphaned: Path
    hosts: dict[str, Host]
    waiting: subprocess.Popen[str]


@contextlib.contextmanager
def _page(host: Host, url_file: Path, *args: str) -> Iterator[str]:
    process = host.popen("web", "--url-file", str(url_file), *args)
    try:
        assert wait_for(lambda: url_file.exists() or process.poll() is not None, 30)
        assert process.poll() is None, process.communicate()
        yield url_file.read_text().strip()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


@pytest.fixture
def site(hosts: dict[str, Host], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    a, b, c = hosts["a"], hosts["b"], hosts["c"]
    # Short paths, as a lab's are: the screenshot is the README's picture of the page.
    lab = Path(tempfile.mkdtemp(prefix="lab-"))
    request.addfinalizer(lambda: shutil.rmtree(lab, ignore_errors=True))
    held, orphaned = lab / "ribosome-2026", lab / "spliceosome"
    for path in (held, orphaned):
        path.mkdir(parents=True)
        assert a.run("init", str(path)).returncode == 0
    acquire(a, held)
    script(
        a,
        f"""
        import dbguard, numpy
        with dbguard.open({str(held)!r}, "particles", "w") as db:
            db.extend(numpy.ones((64, 128, 128), "float32"))
        """,
    )
    assert a.run("flush", str(held)).returncode == 0
    waiting = c.popen("acquire", str(held), "--wait", "120", "--json")
    assert wait_for(lambda: len(project_state(a, held)["queue"]) == 1, 10)
    acquire(b, orphaned)
    project_id = json.loads((orphaned / ".dbguard" / "project.json").read_text())["id"]
    with CacheStore(b.cache, project_id) as store:  # what a writer on b left unflushed
        store.put("particles", 0, np.ones((256, 256), dtype=np.float32))
    assert wait_for(lambda: project_state(a, orphaned)["writer"]["unflushed"] > 0, TTL * 3)
    b.signal_agent(signal.SIGSTOP)  # b hangs: its lease orphans the project
    try:
        assert wait_for(lambda: project_state(a, orphaned)["state"] == "orphaned", TTL * 4)
        with _page(a, tmp_path / "web.url", "--address", "127.0.0.1:0") as url:
            yield Site(url, held, orphaned, hosts, waiting)
    finally:
        b.signal_agent(signal.SIGCONT)
        if waiting.poll() is None:
            waiting.kill()
        waiting.communicate()


def test_the_page_shows_held_orphaned_and_queued_projects_and_follows_a_hand_over(site: Site) -> None:
    if not Path(CHROMIUM).exists():
        fail_or_skip("Debian's chromium is not installed (tools/test installs it as root)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            # As root in a container Chromium's sandbox cannot start; the machine's network is
            # closed, so its background services only make noise.
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 700})
            outside: list[str] = []
            page.on(
                "request",
                lambda r: outside.append(r.url) if not r.url.startswith(site.url.rstrip("/")) else None,
            )
            page.goto(site.url)
            held_row = page.locator(f'tr[data-project="{_id(site.held)}"]')
            orphan_row = page.locator(f'tr[data-project="{_id(site.orphaned)}"]')
            expect(held_row).to_have_attribute("data-state", "held")
            expect(held_row).to_contain_text("root@host-a")
            expect(held_row).to_contain_text("root@host-c")  # the queue
            expect(held_row).to_contain_text(str(site.held))
            expect(orphan_row).to_have_attribute("data-state", "orphaned")
            expect(orphan_row).to_contain_text("host-b")
            expect(page.locator('[data-card="orphaned"] .value')).to_have_text("1")
            expect(page.locator('[data-card="held"] .value')).to_have_text("1")
            expect(page.locator('[data-card="waiting"] .value')).to_have_text("1")
            expect(page.locator('[data-card="stranded"] .value')).not_to_have_text("0 B")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)

            # A lease changes hands: the page follows without a reload.
            generated = page.locator("body").get_attribute("data-generated")
            assert site.hosts["a"].run("release", str(site.held)).returncode == 0
            _, err = site.waiting.communicate(timeout=30)
            assert site.waiting.returncode == 0, err
            expect(held_row).to_contain_text("root@host-c", timeout=10_000)
            expect(held_row).not_to_contain_text("root@host-a", timeout=10_000)
            expect(page.locator('[data-card="waiting"] .value')).to_have_text("0")
            assert page.locator("body").get_attribute("data-generated") != generated

            # The orphaned project's own page: its state, where the data is stranded, its history.
            orphan_row.locator("a").click()
            page.wait_for_url(f"**/project/{_id(site.orphaned)}")
            expect(page.locator('dd[data-detail="state"]')).to_have_text("orphaned")
            expect(page.locator('dd[data-detail="stranded"]')).to_contain_text("host-b")
            expect(page.locator('#history tr[data-event="orphaned"]')).to_have_count(1)
            expect(page.locator('#history tr[data-event="granted"]')).to_contain_text("host-b")
            page.screenshot(path=str(ARTIFACTS / "status-page-project.png"), full_page=True)
            assert outside == [], f"the page fetched from elsewhere: {outside}"
        finally:
            browser.close()


def test_metrics_parse_with_the_prometheus_parser_and_match_the_site(site: Site) -> None:
    families = {}

    # The watcher polls every second: the first scrape may come before it saw everything.
    def scrape() -> bool:
        text = urllib.request.urlopen(site.url + "metrics", timeout=10).read().decode()
        families.clear()
        families.update({f.name: f for f in text_string_to_metric_families(text)})
        projects = {s.labels.get("state"): s.value for s in families["dbguard_projects"].samples}
        return projects.get("orphaned") == 1 and projects.get("held") == 1

    assert wait_for(scrape, 10)
    value = {f: [s for s in families[f].samples] for f in families}
    assert value["dbguard_lease_service_up"][0].value == 1
    assert value["dbguard_orphaned_projects"][0].value == 1
    assert value["dbguard_stranded_bytes"][0].value > 0
    assert value["dbguard_waiting"][0].value == 1
    assert {s.labels["host"]: s.value for s in value["dbguard_unflushed_bytes"]}["host-b"] > 0
    grants = next(s.value for s in value["dbguard_grants"] if s.name == "dbguard_grants_total")
    assert grants == 2
    flushes = next(s.value for s in value["dbguard_flush_bytes"] if s.name == "dbguard_flush_bytes_count")
    assert flushes == 1
    events = {s.labels["event"]: s.value for s in value["dbguard_events"] if s.name.endswith("_total")}
    assert events["orphaned"] == 1 and events["granted"] == 2
    for name in ("dbguard_grant_seconds", "dbguard_renew_seconds"):
        assert families[name].type == "histogram"
        count = next(s.value for s in value[name] if s.name == f"{name}_count")
        inf = next(s.value for s in value[name] if s.labels.get("le") == "+Inf")
        assert count == inf and count >= (2 if name == "dbguard_grant_seconds" else 1)
    assert families["dbguard_flush_bytes"].type == "histogram"


def test_beyond_loopback_the_page_asks_for_its_token(hosts: dict[str, Host], tmp_path: Path) -> None:
    with _page(hosts["a"], tmp_path / "web.url", "--address", "0.0.0.0:0") as url:
        assert "?token=" in url
        base, token = url.split("?token=")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "api/site", timeout=10)
        assert refused.value.code == 401
        assert "token" in refused.value.read().decode()
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200
            assert "dbguard_token" in page.headers.get("Set-Cookie", "")
        asked = urllib.request.Request(base + "metrics", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(asked, timeout=10) as scraped:
            assert scraped.status == 200


def test_a_page_address_that_is_not_host_and_port_is_refused(hosts: dict[str, Host]) -> None:
    refused = hosts["a"].run("web", "--address", "localhost")
    assert refused.returncode == 2 and "HOST:PORT" in refused.stderr


def _id(project: Path) -> str:
    return str(json.loads((project / ".dbguard" / "project.json").read_text())["id"])
