"""Crypto-erase: wipe every keyslot of every layer, then prove that none is left."""

from __future__ import annotations

from pathlib import Path

from . import manifest as manifest_mod
from .errors import CryptlayerError, ErasedImageError
from .tools import cryptsetup, mount


def keyslot_count(layer_file: Path) -> int:
    """How many keyslots the LUKS2 header of `layer_file` still has."""
    return len(cryptsetup.dump(layer_file).get("keyslots", {}))


def shred_image(image: Path) -> int:
    """Erase every layer's keyslots; returns how many layers were erased. Verifies the result."""
    manifest = manifest_mod.load(image)
    for layer in manifest.layers:
        erase_layer(image / layer.file)
    return len(manifest.layers)


def erase_layer(path: Path) -> None:
    """Erase the keyslots of one layer file, then check that none is left.

    luksErase of a header with no keyslot left succeeds, so an erase that was interrupted (or
    done) is simply done again: no check first, one program run per layer fewer.
    """
    cryptsetup.erase(path)
    if keyslot_count(path):
        raise CryptlayerError(
            f"{path} still has keyslots after luksErase", "run `cryptlayer shred` again"
        )


def require_intact(
    image: Path, manifest: manifest_mod.Manifest, *, first_only: bool = False
) -> None:
    """ErasedImageError if any layer of the image (or the bottom one) has no keyslot left."""
    for layer in manifest.layers[:1] if first_only else manifest.layers:
        if keyslot_count(image / layer.file) == 0:
            raise ErasedImageError(
                f"image {image} was shredded (crypto-erased): no key can open it any more",
                "build or copy a fresh image",
            )


# File systems that write changes to new blocks: an overwritten keyslot may survive in old ones.
COPY_ON_WRITE = frozenset({"btrfs", "zfs", "bcachefs", "f2fs", "nilfs2"})


def erase_caveat(image: Path, sysfs: Path = Path("/sys")) -> str | None:
    """Why crypto-erasing `image` in place may leave old copies of its keyslots, if it may."""
    where = mount.containing(image)
    see = "keep the key off this host (docs/threat-model.md)"
    if where.fstype in COPY_ON_WRITE:
        return (
            f"{image} is on {where.fstype}, which writes changes to new blocks: old copies of"
            f" the erased keyslots may survive; {see}"
        )
    device = sysfs / "dev/block" / where.device
    for queue in (device / "queue", device / ".." / "queue"):  # a disk, or a partition's disk
        try:
            rotational = (queue / "rotational").read_text().strip()
        except OSError:
            continue
        if rotational == "0":
            return (
                f"{image} is on flash storage (device {where.device} is not rotational):"
                f" wear levelling may keep old copies of the erased keyslots; {see}"
            )
        break
    return None
