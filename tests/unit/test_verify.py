"""A copy of an image, checked as a mirror or CI job checks it (issue 21 C6): any damage to it is
exit 8 from `verify`, whatever was damaged, and `inspect` never calls a damaged layer intact.
And `rekey` refuses an image directory others may write, as `shred` does (issue 21 C3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clirunner import invoke
from luksfixtures import fake_image

from cryptlayer.errors import ExitCode

KEY = b"k" * 32  # fake_image's


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err.rstrip("\n")


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 4096)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def write(text: str) -> object:
    return lambda path: path.write_text(text)


# What a copy may have suffered on its way (a registry, a mirror, a backup): each is damage.
DAMAGE = {
    "manifest.json not JSON": ("manifest.json", write("{not json")),
    "manifest.json cut short": ("manifest.json", lambda p: p.write_bytes(p.read_bytes()[:40])),
    "manifest.json malformed": ("manifest.json", write(json.dumps({"format": "x"}))),
    "manifest.json empty": ("manifest.json", write("")),
    "layer truncated": ("layer0.luks", truncate),
    "layer grown": ("layer0.luks", lambda p: p.open("ab").write(bytes(4096))),
    "layer missing": ("layer0.luks", Path.unlink),
    "layer a byte flipped": ("layer0.luks", flip),
    "hash tree truncated": ("layer0.verity", truncate),
    "hash tree missing": ("layer0.verity", Path.unlink),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_verify_exits_8_on_any_damage(tmp_path: Path, case: str) -> None:
    image = fake_image(tmp_path / "img")
    assert invoke("verify", str(image))[0] == 0
    name, damage = DAMAGE[case]
    damage(image / name)  # type: ignore[operator]
    code, out, err = invoke("verify", str(image))
    assert code == ExitCode.TAMPERED, err
    assert out == ""
    line = one_line(err)
    assert line.startswith("error: ") and name in line


def test_verify_of_what_is_no_image_is_bad_input(tmp_path: Path) -> None:
    """Not a damaged copy: not an image at all (a wrong path, say)."""
    code, _, err = invoke("verify", str(tmp_path))
    assert code == ExitCode.USAGE
    assert "manifest.json is missing" in one_line(err)


@pytest.mark.parametrize("case", ["manifest.json not JSON", "manifest.json malformed"])
def test_inspect_exits_8_on_a_damaged_statement(tmp_path: Path, case: str) -> None:
    image = fake_image(tmp_path / "img")
    name, damage = DAMAGE[case]
    damage(image / name)  # type: ignore[operator]
    code, _, err = invoke("inspect", str(image))
    assert code == ExitCode.TAMPERED
    assert one_line(err).startswith(f"error: {image}/manifest.json is ")


@pytest.mark.parametrize(
    ("case", "state"),
    [("layer truncated", "damaged"), ("layer grown", "damaged"), ("layer missing", "missing"),
     ("hash tree truncated", "damaged"), ("hash tree missing", "missing")],
)  # fmt: skip
def test_inspect_never_calls_a_damaged_layer_intact(tmp_path: Path, case: str, state: str) -> None:
    image = fake_image(tmp_path / "img")
    info = json.loads(invoke("inspect", "--json", str(image))[1])
    assert (info["state"], info["layers"][0]["state"]) == ("intact", "intact")
    name, damage = DAMAGE[case]
    damage(image / name)  # type: ignore[operator]
    code, out, _ = invoke("inspect", "--json", str(image))
    assert code == 0  # inspect reports; verify is the check that fails
    info = json.loads(out)
    assert (info["state"], info["layers"][0]["state"]) == ("damaged", state)
    code, out, _ = invoke("inspect", str(image))
    assert "state:   damaged" in out.splitlines()
    assert f"({state}), from" in out


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
