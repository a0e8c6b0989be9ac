"""`cryptlayer verify`: check a copy of an image without its key and without device-mapper, as
a mirror or a CI job would: the statement's signatures (against a trust file, if given), and
each layer file against the statement (present, its size, a LUKS2 header carrying exactly the
recorded cipher, sizes, offset and UUID, and every block against its dm-verity hash tree, which
`veritysetup verify` checks in userspace)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptlayer.errors import DamagedImageError, ErasedImageError, TamperedImageError
from cryptlayer.image import luksheader, signatures
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.image.files import open_image
from cryptlayer.tools import veritysetup
from cryptlayer.tools.system import require_tools


@dataclass(frozen=True)
class Report:
    """What was checked and found good."""

    digest: str
    signers: tuple[str, ...]  # trusted principals, or key fingerprints without a trust file
    layers: int
    warnings: tuple[str, ...]  # signatures that did not verify, beside a trusted one


COPY_AGAIN = "do not use this copy; copy the image again from a source you trust"


def verify_image(image: Path, trust: Path | None) -> Report:
    """TamperedImageError naming the first check that failed: any damage to the copy (a
    statement that does not parse, a layer cut short or missing...) as much as a changed byte,
    so that a mirror or CI job has one exit status (8) to check for."""
    try:
        return _verify(image.resolve(), trust)
    except DamagedImageError as err:
        raise TamperedImageError(err.message, err.hint) from err


def _verify(image: Path, trust: Path | None) -> Report:
    manifest = manifest_mod.load(image)
    if trust is not None:
        names = signatures.require_trusted(image, manifest.raw, trust)
        bad = signatures.read_all(image, manifest.raw)[1]
    else:
        good, bad = signatures.read_all(image, manifest.raw)
        if bad:
            raise TamperedImageError(
                f"a signature of {image} does not verify ({'; '.join(map(str, bad))})",
                "the image changed since it was signed, or the signature is damaged",
            )
        names = [f"{s.key.fingerprint} ({s.file})" for s in good]
        bad = []
    require_tools("veritysetup")
    with open_image(image, manifest, allow_shared=True) as files:
        for layer, file, tree in zip(manifest.layers, files.layers, files.trees, strict=True):
            if luksheader.require(file.fd, manifest, layer, file.shown).keyslots == 0:
                raise ErasedImageError(
                    f"image {image} was shredded (crypto-erased): no key can open it any more",
                    "build or copy a fresh image",
                )
            if not veritysetup.verify(file.path, tree.path, layer.root_hash, layer.salt,
                                      layer.blocks):  # fmt: skip
                raise TamperedImageError(
                    f"layer file {file.shown} does not match its dm-verity hash tree"
                    f" ({tree.shown}) and the statement's root hash: it was changed after the"
                    " build",
                    COPY_AGAIN,
                )
    return Report(manifest.digest, tuple(names), len(manifest.layers), tuple(map(str, bad)))
