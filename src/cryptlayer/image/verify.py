"""`cryptlayer verify`: check a copy of an image without its key and without device-mapper, as
a mirror or a CI job would: the statement's signatures (against a trust file, if given), and
each layer file against the statement (present, its size, a LUKS2 header carrying exactly the
recorded cipher, sizes, offset and UUID, and every block against its dm-verity hash tree, which
`veritysetup verify` checks in userspace)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptlayer.errors import DamagedImageError, TamperedImageError
from cryptlayer.image.opener import Policy, changed_layer, open_image
from cryptlayer.tools import veritysetup
from cryptlayer.tools.system import require_tools


@dataclass(frozen=True)
class Report:
    """What was checked and found good."""

    digest: str
    signers: tuple[str, ...]  # trusted principals, or key fingerprints without a trust file
    layers: int
    warnings: tuple[str, ...]  # signatures that did not verify, beside a trusted one


def verify_image(image: Path, trust: Path | None) -> Report:
    """TamperedImageError naming the first check that failed: any damage to the copy (a
    statement that does not parse, a layer cut short or missing...) as much as a changed byte,
    so that a mirror or CI job has one exit status (8) to check for."""
    try:
        return _verify(image, trust)
    except DamagedImageError as err:
        raise TamperedImageError(err.message, err.hint) from err


def _verify(image: Path, trust: Path | None) -> Report:
    # Without a trust file every signature present must still verify (all_signatures).
    policy = Policy(trust=trust, all_signatures=True, allow_shared=True)  # (it changes nothing)
    with open_image(image, policy) as opened:
        require_tools("veritysetup")
        opened.headers()
        opened.require_intact()
        manifest, files = opened.manifest, opened.files
        for layer, file, tree in zip(manifest.layers, files.layers, files.trees, strict=True):
            if not veritysetup.verify(file.path, tree.path, layer.root_hash, layer.salt,
                                      layer.blocks):  # fmt: skip
                raise changed_layer(
                    file.shown, against=f" ({tree.shown}) and the statement's root hash"
                )
        return Report(manifest.digest, opened.signers, len(manifest.layers), opened.rejected)
