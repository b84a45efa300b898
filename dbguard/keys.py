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
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from dbguard.errors import UsageError

BROKER = "broker"
CLIENT = "client"
AUTHORIZED = "authorized"
OPERATORS = "operators"


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

    def authorized(self) -> set[bytes]:
        """The z85 public keys of every client and operator the broker accepts (read each time,
        so that authorising a host needs no broker restart)."""
        return _public_keys(self.directory / AUTHORIZED) | self.operators()

    def operators(self) -> set[bytes]:
        return _public_keys(self.directory / OPERATORS)


def _public_keys(directory: Path) -> set[bytes]:
    if not directory.is_dir():
        return set()
    keys = set()
    for path in sorted(directory.glob("*.key")):
        public, _ = zmq.auth.load_certificate(str(path))
        keys.add(public)
    return keys


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        what = "secret" if secret else "public"
        raise UsageError(
            f"cannot read the {what} key {path} ({exc}); create keys with `dbguard keys init-broker` "
            "or `dbguard keys init-client`, or unset DBGUARD_KEYS to run without authentication"
        ) from exc


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
    """Let the holder of ``public_key`` use the broker (and break leases, with ``operator``)."""
    _load(public_key, secret=False)  # refuse anything that is not a key
    target = directory / (OPERATORS if operator else AUTHORIZED) / f"{name}.key"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public_key, target)
    return target
