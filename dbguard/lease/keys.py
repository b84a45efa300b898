"""CURVE keys: who may talk to the broker, and who may break leases.

A site that sets ``keys`` (``DBGUARD_KEYS``) to a directory gets an authenticated, encrypted
broker. The directory holds, on each machine, what that machine needs::

    broker.key            the broker's public key            (every machine)
    broker.key_secret     the broker's secret key            (the broker's machine only)
    client.key            this host's (or user's) public key  (each client machine)
    client.key_secret     this host's secret key              (each client machine)
    authorized/*.key      public keys the broker accepts     (the broker's machine)
    operators/*.key       public keys that may `break --force` (the broker's machine)

Keys are ZeroMQ certificate files (zmq.auth's format). The broker learns each client's key
from the CURVE handshake, never from the message, and binds every lease to it: only the key
that was granted a lease may renew or release it.

The files of authorized/ and operators/ are edited by hand and read at every handshake, so each
is read on its own: a damaged one is logged (once) and skipped, and every other key still works.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq.auth
from zmq.utils import z85

from dbguard.errors import UsageError
from dbguard.names import PLAIN_NAME_RULE, OutsideRoot, child

log = logging.getLogger("dbguard.lease.keys")

BROKER = "broker"
CLIENT = "client"
AUTHORIZED = "authorized"
OPERATORS = "operators"

# A certificate is a few hundred bytes; anything far larger is not one, and is not read whole.
_MAX_KEY_FILE = 64 * 1024
_Z85_KEY_LENGTH = 40  # a 32-byte CURVE key in Z85


class KeyFileError(ValueError):
    """A key file that cannot be used, and why (without the path: the caller names it)."""


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    broker_public: bytes


@dataclass(frozen=True)
class BrokerKeys:
    public: bytes
    secret: bytes
    directory: Path
    # Damaged key files already logged, by (path, mtime, size): a file is reported once per
    # version, not at every handshake.
    _reported: dict[Path, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    def authorized(self) -> set[bytes]:
        """The z85 public keys of every client and operator the broker accepts (read each time,
        so that authorising a host needs no broker restart). Never raises: a file that cannot
        be used is logged and skipped."""
        return self._public_keys(AUTHORIZED) | self.operators()

    def operators(self) -> set[bytes]:
        return self._public_keys(OPERATORS)

    def _public_keys(self, kind: str) -> set[bytes]:
        directory = self.directory / kind
        try:
            paths = sorted(directory.glob("*.key"))
        except OSError as exc:
            self._report(directory, f"cannot list it ({exc.strerror or exc})")
            return set()
        keys = set()
        for path in paths:
            try:
                public, secret = read_certificate(path)
            except KeyFileError as exc:
                self._report(path, str(exc))
                continue
            if secret is not None:
                self._report(
                    path,
                    "it holds a secret key, which belongs only on its owner's machine (its public key "
                    "is accepted meanwhile); replace it with the public .key file and make a new key "
                    "pair if others could read this one",
                    skipped=False,
                )
            keys.add(public)
        return keys

    def _report(self, path: Path, why: str, *, skipped: bool = True) -> None:
        try:
            info = path.lstat()
            version = (info.st_mtime_ns, info.st_size)
        except OSError:
            version = (0, 0)
        if self._reported.get(path) == version:
            return
        self._reported[path] = version
        if skipped:
            log.error(
                "skipped the key file %s: %s. Fix it (put a public key from `dbguard keys init-client` "
                "there with `dbguard keys authorize`) or remove it; every other key is still accepted",
                path,
                why,
            )
        else:
            log.warning("key file %s: %s", path, why)


class AcceptKnownKeys:
    """ZAP credentials callback (pyzmq's ThreadAuthenticator): accept the keys in authorized/
    and operators/, read afresh for each handshake so that authorising a host needs no restart.
    ``who`` names the peers in the log (clients of the broker, workers of a served project)."""

    def __init__(self, keys: BrokerKeys, who: str) -> None:
        self.keys = keys
        self.who = who

    def callback(self, domain: str, key: bytes) -> bool:
        # This runs in the ZAP thread: an exception would end that thread, and with it every
        # handshake. Damaged key files are skipped by BrokerKeys; anything else refuses this
        # one peer and is logged.
        try:
            allowed = key in self.keys.authorized()
        except Exception:
            log.exception("could not check a %s's key; refused it", self.who)
            return False
        if not allowed:
            log.warning("refused a %s with an unknown key %s", self.who, key.decode(errors="replace"))
        return allowed


def read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    """The (public, secret or None) Z85 keys of a ZeroMQ certificate file, checked: a regular
    file of sensible size whose keys are well-formed CURVE keys; otherwise `KeyFileError`."""
    try:
        info = path.stat()
    except OSError as exc:
        raise KeyFileError(f"cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader forever
        raise KeyFileError("it is not a regular file")
    if info.st_size > _MAX_KEY_FILE:
        raise KeyFileError(f"it is {info.st_size} bytes, far too large for a key file")
    try:
        with open(path, "rb") as handle:
            text = handle.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read it ({exc.strerror or exc})") from None
    found: dict[str, bytes] = {}
    for raw in text.splitlines():
        line = raw.strip()
        for name in ("public-key", "secret-key"):
            if line.startswith(name.encode()):
                _, equals, value = line.partition(b"=")
                if not equals:
                    raise KeyFileError(f"its {name} line has no '='")
                found.setdefault(name, value.strip(b" \t'\""))
    if "public-key" not in found:
        raise KeyFileError("it holds no public key (not a ZeroMQ certificate)")
    for name, value in found.items():
        if not _is_curve_key(value):
            raise KeyFileError(f"its {name} is not a {_Z85_KEY_LENGTH}-character Z85 CURVE key")
    return found["public-key"], found.get("secret-key")


def _is_curve_key(value: bytes) -> bool:
    if len(value) != _Z85_KEY_LENGTH:
        return False
    try:
        return bool(z85.encode(z85.decode(value)) == value)
    except (ValueError, KeyError, OverflowError, TypeError):  # characters outside Z85, overflow
        return False


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        return read_certificate(path)
    except KeyFileError as exc:
        what = "secret" if secret else "public"
        raise UsageError(
            f"cannot read the {what} key {path}: {exc}; create keys with `dbguard keys init-broker` "
            "or `dbguard keys init-client`, or unset DBGUARD_KEYS to run without authentication"
        ) from None


def broker_keys(directory: Path) -> BrokerKeys:
    public, secret = _load(directory / f"{BROKER}.key_secret", secret=True)
    if secret is None:
        raise UsageError(f"{directory / (BROKER + '.key_secret')} holds no secret key")
    return BrokerKeys(public, secret, directory)


def client_keys(directory: Path) -> ClientKeys:
    public, secret = _load(directory / f"{CLIENT}.key_secret", secret=True)
    broker_public, _ = _load(directory / f"{BROKER}.key", secret=False)
    if secret is None:
        raise UsageError(f"{directory / (CLIENT + '.key_secret')} holds no secret key")
    return ClientKeys(public, secret, broker_public)


def init_broker(directory: Path) -> Path:
    """Create the broker's key pair and the authorized/ and operators/ directories."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / AUTHORIZED).mkdir(exist_ok=True)
    (directory / OPERATORS).mkdir(exist_ok=True)
    return _create(directory, BROKER)


def init_client(directory: Path) -> Path:
    """Create this machine's client key pair; returns the public key file to give the operator."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return _create(directory, CLIENT)


def _create(directory: Path, name: str) -> Path:
    public = directory / f"{name}.key"
    if public.exists():
        raise UsageError(f"{public} exists already; remove it first to make a new key")
    public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    Path(secret_file).chmod(0o600)
    return Path(public_file)


def authorize(directory: Path, public_key: Path, name: str, *, operator: bool = False) -> Path:
    """Let the holder of ``public_key`` use the broker (and break leases, with ``operator``).

    Only a public key is copied, under a plain name inside authorized/ (or operators/): a secret
    key would be readable there by whoever reads the directory."""
    _, secret = _load(public_key, secret=False)  # refuse anything that is not a key
    if secret is not None:
        raise UsageError(
            f"{public_key} holds a secret key, which must never leave its owner's machine; pass the "
            f"public key file instead ({public_key.name.removesuffix('_secret')}, without _secret), "
            "and make a new key pair if this secret was copied around"
        )
    parent = directory / (OPERATORS if operator else AUTHORIZED)
    parent.mkdir(parents=True, exist_ok=True)
    try:
        target = child(parent, name, ".key")
    except OutsideRoot as exc:
        raise UsageError(
            f"--name {name!r} cannot name a key file in {parent}: {exc}. Use a plain name such as the "
            f"host's ({PLAIN_NAME_RULE})"
        ) from None
    shutil.copyfile(public_key, target)
    target.chmod(0o644)
    return target


def exposure_warning(address: str) -> str | None:
    """Why a broker without keys on ``address`` is open to others, or None on loopback only."""
    if is_loopback(address):
        return None
    return (
        f"the broker listens on {address} without keys: anyone who can reach that port can take, "
        "renew or break any lease. Set up CURVE keys (`dbguard keys init-broker`, `dbguard keys "
        "init-client`, `dbguard keys authorize`) and set DBGUARD_KEYS, or listen on 127.0.0.1 only"
    )


def is_loopback(address: str) -> bool:
    """Whether a tcp:// address reaches this machine only (ipc:// always does)."""
    if address.startswith("ipc://"):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host in ("lo", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # unresolvable, or a network interface's name (eth0)
        return False
    addresses = {info[4][0] for info in found}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)
