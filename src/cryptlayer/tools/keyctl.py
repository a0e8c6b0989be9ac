"""keyctl: user keys in the kernel keyring (--keyring)."""

from __future__ import annotations

from cryptlayer.errors import CommandError
from cryptlayer.tools.runner import run, run_for_secret


def search(ring: str, name: str) -> str | None:
    """The id of user key NAME in keyring RING (@u, @s), or None."""
    try:
        return run(["keyctl", "search", ring, "user", name]).stdout.strip()
    except CommandError:
        return None


def pipe(key_id: str, limit: int) -> bytearray:
    """The payload of key KEY_ID (at most `limit` bytes), straight into a bytearray."""
    return run_for_secret(["keyctl", "pipe", key_id], limit)
