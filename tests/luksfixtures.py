"""LUKS2 headers written byte for byte as cryptsetup writes them (its on-disk format), so the
host tier can test the header checks without device-mapper; the VM tier checks real ones."""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

HDR = 16384
DATA_OFFSET = 294912
UUID = "0b9ad0f4-4c0b-4f63-9e43-1c0c7d2a1e55"

METADATA: dict[str, Any] = {
    "keyslots": {
        "0": {
            "type": "luks2",
            "key_size": 64,
            "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
            "area": {"type": "raw", "offset": "32768", "size": "258048",
                     "encryption": "aes-xts-plain64", "key_size": 64},
            "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                    "salt": "c2FsdA=="},
        }
    },
    "tokens": {},
    "segments": {
        "0": {"type": "crypt", "offset": str(DATA_OFFSET), "size": "dynamic", "iv_tweak": "0",
              "encryption": "aes-xts-plain64", "sector_size": 4096}
    },
    "digests": {
        "0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256",
              "iterations": 1000, "salt": "c2FsdA==", "digest": "ZGlnZXN0"}
    },
    "config": {"json_size": "12288", "keyslots_size": "262144"},
}  # fmt: skip


def metadata() -> dict[str, Any]:
    return copy.deepcopy(METADATA)


def header_copy(meta: dict[str, Any], offset: int, *, seqid: int = 1, uuid: str = UUID) -> bytes:
    """One header copy (binary header and JSON area) with a valid checksum."""
    magic = b"LUKS\xba\xbe" if offset == 0 else b"SKUL\xba\xbe"
    binary = bytearray(4096)
    binary[0:6] = magic
    struct.pack_into(">HQQ", binary, 6, 2, HDR, seqid)
    binary[72:78] = b"sha256"
    binary[168 : 168 + len(uuid)] = uuid.encode()
    struct.pack_into(">Q", binary, 256, offset)
    area = json.dumps(meta).encode().ljust(HDR - 4096, b"\0")
    whole = bytearray(binary + area)
    whole[448:480] = hashlib.sha256(bytes(whole)).digest()
    return bytes(whole)


def write_layer(path: Path, meta: dict[str, Any] | None = None, **kw: Any) -> Path:
    """A layer file whose header carries `meta` (ours by default) in both copies."""
    meta = metadata() if meta is None else meta
    data = header_copy(meta, 0, **kw) + header_copy(meta, HDR, **kw)
    path.write_bytes(data.ljust(DATA_OFFSET + 4096, b"\0"))
    return path


def fake_image(
    image: Path, key: bytes = b"k" * 32, cmd: tuple[str, ...] = ("sh",), size: int = 0
) -> Path:
    """An image directory as build leaves it, opened by `key`, whose one layer is a header
    (no file system: enough for everything that needs no device-mapper) and, with `size`,
    random bytes up to that many (for moving real amounts of data)."""
    from dataclasses import replace

    from cryptlayer.image import envelope, statement
    from cryptlayer.image import manifest as manifest_mod
    from cryptlayer.image.manifest import ImageConfig, Layer, Manifest
    from cryptlayer.secret import Secret
    from cryptlayer.tools import veritysetup

    image.mkdir(mode=0o755)
    layer = write_layer(image / "layer0.luks")
    if size > layer.stat().st_size:
        import os

        with open(layer, "ab") as f:
            left = (size - layer.stat().st_size) // 4096 * 4096
            while left:
                chunk = min(left, 1 << 20)
                f.write(os.urandom(chunk))
                left -= chunk
    salt = "5a" * 32
    root_hash = veritysetup.format_tree(layer, image / "layer0.verity", salt)  # userspace
    tree_size = (image / "layer0.verity").stat().st_size
    only = Layer("layer0.luks", UUID, layer.stat().st_size, 1, "rootfs/", DATA_OFFSET,
                 "layer0.verity", tree_size, root_hash, salt)  # fmt: skip
    built = Manifest((only,), ImageConfig(cmd=cmd), created="2026-11-26T00:00:00+00:00")
    built = replace(built, raw=built.encode())
    manifest_mod.save(image, built)
    with Secret.random() as image_key, Secret(bytearray(key)) as user_key:
        entries = [envelope.for_key(image_key, user_key)]
        envelope.save(image, entries, statement.mac(image_key, built.raw))
    return image
