"""keys/sources.py: key files, key commands, and secrets that never show themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptlayer.errors import (
    CommandError,
    UsageError,
)
from cryptlayer.keys.sources import Secret, read_key, read_key_command


def test_secret_never_shows_itself() -> None:
    secret = Secret(bytearray(b"hunter2-hunter2"))
    assert "hunter2" not in repr(secret) + str(secret) + f"{secret}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)


def test_secret_wipe_overwrites_buffer() -> None:
    buf = bytearray(b"k" * 32)
    secret = Secret(buf)
    secret.wipe()
    assert buf == bytearray(32)
    with pytest.raises(ValueError), secret.view():
        pass


def test_read_key_refuses_big_files(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 9000)
    big.chmod(0o600)
    with pytest.raises(UsageError, match="larger than 8192 bytes"):
        read_key(str(big))
    (tmp_path / "k").write_bytes(b"\x00\x01" * 16)
    (tmp_path / "k").chmod(0o600)
    with read_key(str(tmp_path / "k")) as key, key.view() as data:
        assert bytes(data) == b"\x00\x01" * 16


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    key.chmod(0o640)
    with pytest.raises(UsageError) as err:
        read_key(str(key))
    assert str(err.value) == f"key file {key} is accessible by others (mode 0640): chmod 600 {key}"


def test_key_command_output_is_the_key(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"\x00\xff" * 16)
    with read_key_command(f"cat {key}") as secret, secret.view() as data:
        assert bytes(data) == b"\x00\xff" * 16
    with pytest.raises(CommandError, match="false failed with exit status 1"):
        read_key_command("false")
    with pytest.raises(UsageError, match="is empty"):
        read_key_command("true")
