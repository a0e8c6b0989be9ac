"""fsutil's writes: an image's JSON (manifest.json, keys.json) and the journals are replaced
whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("how", ["write_atomic", "write_atomic_at", "write_new_file"])
def test_a_short_write_is_completed_not_renamed_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """write(2) may write fewer bytes than asked (a full disk, a signal) and says how many: the
    rest is written, never a truncated keys.json or manifest.json renamed over the whole one.
    Failed before: each wrote once and took the result as the whole file."""
    from cryptlayer import fsutil

    real = os.write
    monkeypatch.setattr(fsutil.os, "write", lambda fd, data: real(fd, bytes(data)[:3]))
    path, data = tmp_path / "keys.json", b'{"format": "whole"}\n' * 5
    if how == "write_atomic":
        fsutil.write_atomic(path, data)
    elif how == "write_atomic_at":
        folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fsutil.write_atomic_at(folder, path.name, data)
        finally:
            os.close(folder)
    else:
        fsutil.write_new_file(path, data, 0o600)
    monkeypatch.undo()
    assert path.read_bytes() == data
