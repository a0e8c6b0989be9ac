"""What a copy of an image may suffer on its way (a registry, a mirror, a backup): each is damage,
which verify must call so (exit 8) and inspect never call intact."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
