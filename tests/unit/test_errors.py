"""errors.py: what is printed of untrusted strings."""

from __future__ import annotations

from cryptlayer.errors import printable


def test_printable() -> None:
    assert printable("a\x1b[31mb\0\n\tc") == "a\\x1b[31mb\\x00\\n\\tc"
    assert printable("ünïcödé ok") == "ünïcödé ok"
