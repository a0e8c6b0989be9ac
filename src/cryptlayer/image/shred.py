"""Crypto-erase: wipe every keyslot of every layer, then prove that none is left."""

from __future__ import annotations

from pathlib import Path

from cryptlayer.errors import CryptlayerError, ErasedImageError
from cryptlayer.fsutil import FileId
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.image.files import ImageFiles, LayerFile, open_image, require_same
from cryptlayer.image.luksheader import read
from cryptlayer.tools import cryptsetup


def keyslot_count(layer: LayerFile) -> int:
    """How many keyslots the LUKS2 header of the open layer file still has."""
    return read(layer.fd, layer.shown).keyslots


def shred_image(
    image: Path, *, expected: list[FileId] | None = None, allow_shared: bool = False
) -> int:
    """Erase every layer's keyslots; returns how many layers were erased. Verifies the result.

    Every layer is opened by descriptor (never through a symlink, never a file with another
    name elsewhere); with `expected`, each must be the file (device, inode) recorded when a
    container opened the image.
    """
    image = image.resolve()  # the path the user gave; below it, nothing is followed
    manifest = manifest_mod.load(image)
    with open_image(image, manifest, allow_shared=allow_shared, sizes=False) as files:
        require_same(files, expected or [], "that the container opened")
        for layer in files.layers:
            erase_layer(layer)
    return len(manifest.layers)


def erase_layer(layer: LayerFile) -> None:
    """Erase the keyslots of one open layer file, then check that none is left.

    luksErase of a header with no keyslot left succeeds, so an erase that was interrupted (or
    done) is simply done again: no check first, one program run per layer fewer.
    """
    cryptsetup.erase(layer.path, layer.shown)
    if keyslot_count(layer):
        raise CryptlayerError(
            f"{layer.shown} still has keyslots after luksErase", "run `cryptlayer shred` again"
        )


def require_intact(files: ImageFiles, *, first_only: bool = False) -> None:
    """ErasedImageError if any layer of the image (or the bottom one) has no keyslot left."""
    for layer in files.layers[:1] if first_only else files.layers:
        if keyslot_count(layer) == 0:
            raise ErasedImageError(
                f"image {files.image} was shredded (crypto-erased): no key can open it any more",
                "build or copy a fresh image",
            )
