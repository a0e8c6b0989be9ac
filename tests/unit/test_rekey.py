"""image/rekey.py: rekey refuses an image directory others may write, as shred does (issue 21
C3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirunner import invoke
from copyfixtures import one_line
from luksfixtures import fake_image

from cryptlayer.errors import ExitCode

KEY = b"k" * 32  # fake_image's


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An image, its key file and a second key to add."""
    image = fake_image(tmp_path / "img", key=KEY)
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_bytes(KEY)
    other.write_bytes(b"o" * 32)
    for path in (key, other):
        path.chmod(0o600)
    return image, key, other


def test_rekey_refuses_a_directory_others_may_write(keyed: tuple[Path, Path, Path]) -> None:
    image, key, other = keyed
    image.chmod(0o777)
    before = (image / "keys.json").read_bytes()
    code, _, err = invoke("rekey", str(image), "-k", str(key), "--add-key", str(other))
    assert code == ExitCode.USAGE
    assert one_line(err) == (
        f"error: image directory {image} is writable by users other than root (mode 0777):"
        " whoever can write it can swap its files while root uses them; make it root's and not"
        " writable by others (chown root: DIR; chmod go-w DIR), or pass --allow-shared-dir"
    )
    assert (image / "keys.json").read_bytes() == before
    code, _, err = invoke("shred", str(image))  # as shred does
    assert code == ExitCode.USAGE
    assert err.startswith(f"error: image directory {image} is writable by users other than root")


def test_rekey_takes_allow_shared_dir(
    keyed: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the flag the shared directory is used: the rekey gets to the key checks (the fake
    layer has no real keyslot, so the one of cryptsetup is skipped here; the VM tier runs it)."""
    monkeypatch.setattr("cryptlayer.tools.cryptsetup.test_key", lambda *_: None)
    image, key, other = keyed
    image.chmod(0o777)
    code, out, err = invoke(
        "rekey", str(image), "-k", str(key), "--add-key", str(other), "--allow-shared-dir"
    )
    assert code == 0, err
    assert out.startswith("added ")
    assert len(json.loads((image / "keys.json").read_text())["entries"]) == 2
