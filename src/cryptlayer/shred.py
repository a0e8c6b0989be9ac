"""Crypto-erase: wipe every keyslot of every layer, then prove that none is left."""

from __future__ import annotations

from pathlib import Path

from . import manifest as manifest_mod
from .errors import CryptlayerError, ErasedImageError
from .tools import cryptsetup


def keyslot_count(layer_file: Path) -> int:
    """How many keyslots the LUKS2 header of `layer_file` still has."""
    return len(cryptsetup.dump(layer_file).get("keyslots", {}))


def shred_image(image: Path) -> int:
    """Erase every layer's keyslots; returns how many layers were erased. Verifies the result."""
    manifest = manifest_mod.load(image)
    for layer in manifest.layers:
        path = image / layer.file
        if keyslot_count(path):
            cryptsetup.erase(path)
        if keyslot_count(path):
            raise CryptlayerError(
                f"{path} still has keyslots after luksErase", "run `cryptlayer shred` again"
            )
    return len(manifest.layers)


def require_intact(image: Path, manifest: manifest_mod.Manifest) -> None:
    """ErasedImageError if any layer of the image has no keyslot left."""
    for layer in manifest.layers:
        if keyslot_count(image / layer.file) == 0:
            raise ErasedImageError(
                f"image {image} was shredded (crypto-erased): no key can open it any more",
                "build or copy a fresh image",
            )
