"""Ray token authentication for clients.

Ray 2.60 turns token authentication on for clusters started on this machine, but a client that
joins one by address stays in mode 'disabled' unless ``RAY_AUTH_MODE=token`` is set *before Ray
is imported* (Ray reads it once). So the CLI calls :func:`use_token_if_available` first thing:
when a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) it
asks for token mode and Ray's client sends the token. Nothing here switches authentication off,
and a mode the user set is left alone. No Ray import in this module.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

from modecotd.errors import UserError

DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or DEFAULT_TOKEN_FILE.is_file())


def use_token_if_available() -> bool:
    """Set RAY_AUTH_MODE=token when a token exists and no mode was chosen; True if token mode is on."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"] == "token"
    if token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def read_token() -> str:
    """The token itself, from wherever Ray would take it (for a node that cannot see the file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_FILE)
    return path.read_text().strip()


def make_token_file() -> bool:
    """On a machine without a token, write a new random one to ``~/.ray/auth_token``, readable by
    this user only (Ray's own first start would write it readable by every user of the machine);
    True when it was written. Nothing is written when the user chose a mode other than token."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token" or token_available():
        return False
    DEFAULT_TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(DEFAULT_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this user made it a moment ago
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return True


def ensure_token() -> Path | None:
    """A token for a cluster started here by ``ray start`` (which leaves authentication off when no
    token exists): the one at hand, or a new one (:func:`make_token_file`). None when the user chose
    a mode other than token. Called before Ray is imported: it asks for token mode."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        return None
    make_token_file()
    os.environ["RAY_AUTH_MODE"] = "token"
    return DEFAULT_TOKEN_FILE


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback interface."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def is_this_machine(host: str) -> bool:
    """Whether every address of ``host`` is this machine's own (loopback, or an interface a socket
    can bind to): traffic to it never leaves the machine (a job's driver on the head node reaches
    the cluster at the head's own address)."""
    if is_loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((sockaddr[0], 0))
        except OSError:
            return False
    return bool(infos)


def check_token_transport(url: str, allow_plain_token: bool = False) -> None:
    """Refuse to send Ray's token in clear text over the network: plain ``http://`` to a host other
    than this machine needs ``allow_plain_token`` (the CLI's ``--allow-http-token``). Without token
    mode nothing is sent, so anything goes."""
    if os.environ.get("RAY_AUTH_MODE") != "token" or allow_plain_token:
        return
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme == "http" and not is_this_machine(parts.hostname or ""):
        raise UserError(f"refusing to send Ray's auth token over plain HTTP to {parts.netloc}: reach the dashboard "
                        "through https://, an SSH tunnel or kubectl port-forward to 127.0.0.1, or pass "
                        "--allow-http-token if this network is trusted")


def check_token_over_grpc(address: str, allow_plain_token: bool = False) -> None:
    """The same rule for joining a cluster by address (``host:port`` of its GCS, or ``ray://`` for
    Ray Client): the token goes over gRPC, in clear text unless Ray's TLS is on (RAY_USE_TLS=1).
    "auto" and "local" find a cluster on this machine."""
    if address in ("auto", "local") or os.environ.get("RAY_AUTH_MODE") != "token" \
            or allow_plain_token or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host = target.rpartition(":")[0] or target
    if not is_this_machine(host):
        raise UserError(f"refusing to send Ray's auth token over plain gRPC to {target}: turn on Ray's TLS "
                        "(RAY_USE_TLS=1 with RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY and RAY_TLS_CA_CERT), reach "
                        "the cluster through an SSH tunnel to 127.0.0.1, or pass --allow-http-token if this "
                        "network is trusted")
