"""Ray token authentication for clients.

Ray 2.60 turns token authentication on for clusters started on this machine, but a client that
joins one by address stays in mode 'disabled' unless ``RAY_AUTH_MODE=token`` is set *before Ray
is imported* (Ray reads it once). So the CLI calls :func:`use_token_if_available` first thing:
when a token is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) it
asks for token mode and Ray's client sends the token. Nothing here switches authentication off,
and a mode the user set is left alone. No Ray import in this module.
"""
from __future__ import annotations

import os
from pathlib import Path

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
