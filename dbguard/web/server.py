"""Running the status page: in the foreground (`dbguard web`) or as the process `dbguard up`
starts beside the broker, found again through files in the broker's state directory."""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from dbguard.errors import UsageError
from dbguard.settings import Settings

URL_FILE = "web.url"
PID_FILE = "web.pid"
TOKEN_FILE = "web.token"


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (port 0: any free port), or a UsageError saying what is expected."""
    host, _, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(
            f"the status page's address must look like HOST:PORT, such as 127.0.0.1:8470 (port 0: any "
            f"free port), not {text!r}"
        )
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def page_token(settings: Settings, host: str, given: str | None) -> str | None:
    """The token a page on ``host`` asks for: none on loopback unless given; beyond loopback the
    given one, or the one kept in the state directory (made on first use, readable by its
    owner only), so that `dbguard up` and a later `dbguard web` agree."""
    if given:
        return given
    if is_loopback_host(host):
        return None
    path = settings.state / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if len(token) >= 16:
            return token
    except OSError:
        pass
    settings.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(24)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    return token


def serve(
    settings: Settings,
    address: str,
    *,
    token: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the page until SIGTERM or SIGINT; ``on_ready`` hears its URL once it listens."""
    from waitress.server import create_server

    from dbguard.lease.service import for_broker
    from dbguard.web.app import create_app
    from dbguard.web.metrics import SiteMetrics
    from dbguard.web.watch import SiteWatcher

    host, port = parse_address(address)
    token = page_token(settings, host, token)
    metrics = SiteMetrics()
    watcher = SiteWatcher(lambda: for_broker(settings), on_events=metrics.count)
    metrics.watch(watcher)
    app = create_app(watcher, metrics, token)
    try:
        server = create_server(app, host=host, port=port, threads=4, ident="dbguard")
    except OSError as exc:
        raise UsageError(
            f"cannot serve the status page on {address}: {exc.strerror}; choose another --address"
        ) from exc
    watcher.start()
    bound = server.effective_port  # type: ignore[union-attr]  # one listening socket: a TcpWSGIServer
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{bound}/" + (f"?token={token}" if token else "")
    stopping: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if not stopping:  # once: see the broker's handler
            stopping.append(signum)
            server.close()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    if on_ready is not None:
        on_ready(url)
    try:
        server.run()
    except (OSError, ValueError):
        if not stopping:  # closed by the signal handler: the loop ends with EBADF
            raise
    finally:
        watcher.stop()


def start_detached(settings: Settings, address: str) -> tuple[str, bool]:
    """The page beside the broker `up` started: its URL, and whether this call started it."""
    running = running_url(settings)
    if running is not None:
        return running, False
    settings.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    url_file = settings.state / URL_FILE
    url_file.unlink(missing_ok=True)
    log_path = settings.state / "web.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "dbguard", "web", "--address", address, "--url-file", str(url_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    (settings.state / PID_FILE).write_text(f"{process.pid}\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        if url_file.exists() and url_file.read_text().strip():
            return url_file.read_text().strip(), True
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace").splitlines()[-5:]
    raise UsageError(
        f"the status page did not start on {address}; last lines of {log_path}:\n  " + "\n  ".join(tail)
    )


def running_url(settings: Settings) -> str | None:
    """The URL of the page `up` started on this state directory, if it still runs."""
    if _page_pid(settings) is None:
        return None
    try:
        url = (settings.state / URL_FILE).read_text().strip()
    except OSError:
        return None
    return url or None


def stop(settings: Settings) -> bool:
    """Stop the page `up` started; whether one was running."""
    pid = _page_pid(settings)
    (settings.state / PID_FILE).unlink(missing_ok=True)
    (settings.state / URL_FILE).unlink(missing_ok=True)
    if pid is None:
        return False
    from dbguard.lease.servers import terminate

    return terminate(pid)


def _page_pid(settings: Settings) -> int | None:
    """The pid in the pid file while it runs our page for this state directory: pid files
    outlive their processes and pids are reused, so `down` never signals another process."""
    import psutil  # type: ignore[import-untyped, unused-ignore]

    try:
        text = (settings.state / PID_FILE).read_text(errors="replace").strip()
        if not text.isascii() or not text.isdigit():
            return None
        process = psutil.Process(int(text))
        argv = process.cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    url_file = str(settings.state / URL_FILE)
    return int(process.pid) if "web" in argv and url_file in argv else None
