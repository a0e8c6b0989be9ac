"""Crypto-erase: wipe every keyslot of every layer, then prove that none is left."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptlayer.errors import CryptlayerError
from cryptlayer.fsutil import FileId
from cryptlayer.image.files import LayerFile
from cryptlayer.image.opener import Policy, keyslot_count, open_image
from cryptlayer.tools import cryptsetup


def shred_image(
    image: Path, *, expected: Sequence[FileId] | None = None, allow_shared: bool = False
) -> int:
    """Erase every layer's keyslots; returns how many layers were erased. Verifies the result.

    Every layer is opened by descriptor (never through a symlink, never a file with another
    name elsewhere), of whatever size (a damaged image is erased too); with `expected`, each
    must be the file (device, inode) recorded when a container opened the image.
    """
    policy = Policy(allow_shared=allow_shared, sizes=False, expected=expected or ())
    with open_image(image, policy) as opened:
        for layer in opened.files.layers:
            erase_layer(layer)
        return len(opened.manifest.layers)


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
