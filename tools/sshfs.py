"""A private sshd on loopback and sshfs mounts of it: real network-filesystem mounts for tests.

    with SshServer(workdir) as server:
        with server.mount(remote_dir, mount_point) as mounted:
            ...  # mount_point is a fuse.sshfs mount of remote_dir

Each mount is its own sshfs process with its own client cache, as each NFS client has: two
mounts of one directory behave like two hosts sharing a project (the multi-host test bed uses
them that way).

Nothing of the system's ssh set-up is read or changed: the server runs with a config, host key
and authorized_keys of its own in ``workdir``, and the client is given ``-F /dev/null`` and its
own key. The only thing outside ``workdir`` it may create is ``/run/sshd``, the privilege
separation directory that sshd needs when started as root and that is normally made by the
service manager. Every process started here is ended by its id, and every mount unmounted,
also when start-up fails half-way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["Mount", "SshServer", "SshfsError", "mounted_fstype", "sshfs_unavailable"]

# sshd must be started by an absolute path (it re-executes itself), and /usr/sbin is often not
# on a non-root PATH.
_SBIN_PATH = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin", os.environ.get("PATH", "")])
_PRIVSEP_DIR = Path("/run/sshd")
_START_TIMEOUT = 20.0
_MOUNT_TIMEOUT = 30.0


class SshfsError(RuntimeError):
    """The loopback server or a mount could not be set up or torn down; the message has the logs."""


def _which_sshd() -> str | None:
    return shutil.which("sshd", path=_SBIN_PATH)


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def sshfs_unavailable() -> str | None:
    """Why loopback sshfs mounts cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return (
            "mounting sshfs over a private loopback sshd needs root (FUSE mounts, sshd privilege separation)"
        )
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    missing = [
        name
        for name, found in (
            ("sshd (openssh-server)", _which_sshd()),
            ("ssh-keygen (openssh-client)", shutil.which("ssh-keygen")),
            ("ssh (openssh-client)", shutil.which("ssh")),
            ("sshfs", shutil.which("sshfs")),
            ("fusermount3 or fusermount (fuse3)", _fusermount()),
        )
        if found is None
    ]
    if missing:
        packages = "openssh-server, openssh-client and sshfs"
        return f"missing programs: {', '.join(missing)}; install the packages {packages}"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as 3-digit octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_of(mount_point: Path, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount at ``mount_point``, read from mountinfo (no stat(2),
    which could hang on a dead FUSE server). ``mountinfo`` of another process reads the mount
    table of its mount namespace."""
    target = os.path.realpath(mount_point)
    found: tuple[str, str] | None = None
    try:
        with open(mountinfo) as handle:
            lines = handle.readlines()
    except OSError as exc:
        # The namespace's last process is gone (ENOENT), or is exiting (a zombie's mountinfo
        # reads EINVAL): its mounts go with it.
        if exc.errno in (errno.ENOENT, errno.EINVAL, errno.ESRCH):
            return None
        raise
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or _unescape_mountinfo(fields[4]) != target:
            continue
        fstype, source, *_ = [*right.split(), "", ""]
        found = (fstype, _unescape_mountinfo(source))  # later lines are mounted on top
    return found


def mounted_fstype(mount_point: Path) -> str | None:
    """The filesystem type mounted at ``mount_point`` (e.g. ``fuse.sshfs``), or None."""
    entry = _mount_of(mount_point)
    return entry[0] if entry else None


def _sshfs_cache_option() -> str:
    # sshfs 2.x spelled the attribute/directory cache "cache=yes"; 3.x renamed it "dir_cache=yes"
    # and refuses the old name.
    probe = subprocess.run(["sshfs", "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"SSHFS version (\d+)", probe.stdout + probe.stderr)
    major = int(match.group(1)) if match else 3
    return "dir_cache=yes" if major >= 3 else "cache=yes"


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _end(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate one process we started, by its id; kill it if it does not go."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout)


class Mount:
    """One sshfs mount of ``remote_dir`` at ``mount_point``, served by a foreground sshfs process."""

    def __init__(
        self,
        server: SshServer,
        remote_dir: Path,
        mount_point: Path,
        *,
        enter: Sequence[str] = (),
        namespace_pid: int | None = None,
        identity: Path | None = None,
    ) -> None:
        self.server = server
        # The client key as the mounting process sees it (a host with its own /tmp needs a copy).
        self.identity = identity or server.client_key
        self.remote_dir = Path(os.path.realpath(remote_dir))
        # In another mount namespace (a simulated host), the mount is made and checked there:
        # ``enter`` prefixes every command (nsenter ...) and that process's mountinfo is read.
        self.enter = list(enter)
        self.mountinfo = f"/proc/{namespace_pid}/mountinfo" if namespace_pid else "/proc/self/mountinfo"
        self.mount_point = Path(mount_point) if enter else Path(os.path.realpath(mount_point))
        self.log_path = server.workdir / f"sshfs-{self.mount_point.name}-{id(self):x}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def source(self) -> str:
        """The mount source as the mount table shows it (``user@host:/dir``)."""
        entry = _mount_of(self.mount_point, self.mountinfo)
        return entry[1] if entry else f"{self.server.user}@{self.server.host}:{self.remote_dir}"

    def command(self) -> list[str]:
        s = self.server
        options = ",".join(
            [
                f"IdentityFile={self.identity}",
                "IdentitiesOnly=yes",
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null",
                "BatchMode=yes",
                "LogLevel=ERROR",
                _sshfs_cache_option(),
            ]
        )
        return [
            *self.enter, "sshfs", "-f", "-F", "/dev/null", "-p", str(s.port), "-o", options,
            f"{s.user}@{s.host}:{self.remote_dir}", str(self.mount_point),
        ]  # fmt: skip

    def start(self) -> Mount:
        if not self.remote_dir.is_dir():
            raise SshfsError(f"cannot mount {self.remote_dir}: it is not a directory")
        if not self.enter:  # inside a namespace, the host made its mount point itself
            self.mount_point.mkdir(parents=True, exist_ok=True)
        if _mount_of(self.mount_point, self.mountinfo) is not None:
            raise SshfsError(f"{self.mount_point} is already a mount point")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            self._wait_mounted()
        except BaseException:
            self.unmount()
            raise
        return self

    def _wait_mounted(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + _MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            entry = _mount_of(self.mount_point, self.mountinfo)
            if entry is not None and entry[0] in ("fuse.sshfs", "fuse"):
                return
            if self.process.poll() is not None:
                raise SshfsError(
                    f"sshfs exited with {self.process.returncode} before mounting {self.mount_point}:\n"
                    f"{_tail(self.log_path)}\n--- sshd log ---\n{self.server.log()}"
                )
            time.sleep(0.05)
        raise SshfsError(
            f"sshfs did not mount {self.mount_point} within {_MOUNT_TIMEOUT:.0f}s:\n{_tail(self.log_path)}"
        )

    def unmount(self) -> None:
        """Unmount (lazily if it is busy) and end the sshfs process; safe to call twice."""
        errors: list[str] = []
        if _mount_of(self.mount_point, self.mountinfo) is not None:
            fusermount = _fusermount()
            attempts = [[*self.enter, fusermount, "-u", str(self.mount_point)]] if fusermount else []
            # Lazy unmount detaches a busy mount now; the kernel drops it when the last user goes.
            attempts.append([*self.enter, "umount", "-l", str(self.mount_point)])
            for command in attempts:
                result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
                if result.returncode == 0 and _mount_of(self.mount_point, self.mountinfo) is None:
                    break
                errors.append(f"{' '.join(command)}: {result.stderr.strip()}")
        if self.process is not None:
            _end(self.process)
        if _mount_of(self.mount_point, self.mountinfo) is not None:
            raise SshfsError(f"could not unmount {self.mount_point}: {'; '.join(errors)}")

    def log(self) -> str:
        return _tail(self.log_path)

    def __enter__(self) -> Mount:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()


class SshServer:
    """A private sshd on a free loopback port that accepts one freshly generated client key."""

    def __init__(self, workdir: Path, *, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.port = 0
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "client_ed25519_key"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.config = self.workdir / "sshd_config"
        self.log_path = self.workdir / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._mounts: list[Mount] = []

    # ------------------------------------------------------------ server

    def start(self) -> SshServer:
        why = sshfs_unavailable()
        if why is not None:
            raise SshfsError(why)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._make_keys()
            if os.geteuid() == 0:
                # sshd refuses to start as root without its privilege separation directory.
                _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
            # A free port can be taken by someone else before sshd binds it: try a few.
            for _ in range(5):
                self.port = _free_port()
                self._write_config()
                if self._launch():
                    return self
            raise SshfsError(f"sshd could not bind a loopback port:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def _make_keys(self) -> None:
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dbguard-test", "-f", str(key)],
                    check=True,
                    capture_output=True,
                    stdin=subprocess.DEVNULL,
                )
        shutil.copyfile(f"{self.client_key}.pub", self.authorized_keys)
        for path in (self.host_key, self.client_key, self.authorized_keys):
            path.chmod(0o600)

    def _write_config(self) -> None:
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    # Keys and files live in a test's temp directory, whose parents sshd's
                    # ownership checks would not accept.
                    "StrictModes no",
                    "UsePAM no",
                    "Subsystem sftp internal-sftp",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )

    def _launch(self) -> bool:
        """Start sshd; True once it greets on its port, False if the port was taken."""
        sshd = _which_sshd()
        assert sshd is not None
        self.log_path.write_bytes(b"")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "Address already in use" in self.log():
                    return False
                raise SshfsError(f"sshd exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1.0) as conn:
                conn.settimeout(2.0)
                if conn.recv(64).startswith(b"SSH-"):
                    return True
            time.sleep(0.05)
        raise SshfsError(f"sshd did not answer on {self.host}:{self.port} within {_START_TIMEOUT:.0f}s")

    def stop(self) -> None:
        """Unmount every mount made through this server, then end sshd."""
        problems: list[str] = []
        for mount in reversed(self._mounts):
            try:
                mount.unmount()
            except SshfsError as exc:
                problems.append(str(exc))
        self._mounts.clear()
        if self.process is not None:
            _end(self.process)
        if problems:
            raise SshfsError("; ".join(problems))

    def log(self) -> str:
        return _tail(self.log_path)

    # ------------------------------------------------------------ mounts

    def mount(
        self,
        remote_dir: Path,
        mount_point: Path,
        *,
        enter: Sequence[str] = (),
        namespace_pid: int | None = None,
        identity: Path | None = None,
    ) -> Mount:
        """Mount ``remote_dir`` (a directory of this machine, served over sshd) at ``mount_point``.

        Use the result as a context manager; `stop` also unmounts whatever is left.
        """
        mount = Mount(
            self, remote_dir, mount_point, enter=enter, namespace_pid=namespace_pid, identity=identity
        )
        mount.start()
        self._mounts.append(mount)
        return mount

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
