"""The image statement: manifest.json's exact bytes, everything `run` takes from an image.

Three parties can vouch for it:
- the image key: an HMAC-SHA256 of the bytes (its key derived from the image key with HKDF under
  a label of its own) kept in keys.json, checked right after the image key is unwrapped and before
  any layer is opened or anything erased (opener.OpenedImage.unlock, the only place an image
  key is unwrapped);
- the user: the image digest, sha256 of the bytes (`require_digest`, `run --digest`);
- publishers: signatures over the bytes (signatures.py), checkable without any key.

keys.json and the signatures sit outside the statement, so rekeying and signing never change it
or the digest. Each entry of keys.json authenticates itself through its key wrap; the statement
MAC then binds the layers, their headers and the config to whoever holds the image key.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptlayer import oci
from cryptlayer.errors import TamperedImageError, UsageError
from cryptlayer.image import envelope
from cryptlayer.image.manifest import MANIFEST, Manifest
from cryptlayer.secret import Secret

LABEL = b"cryptlayer.statement.v1"
REFUSED = "do not run it; copy the image again from a source you trust"


def mac(image_key: Secret, statement: bytes) -> str:
    """The statement's MAC under `image_key`, base64."""
    from cryptography.hazmat.primitives import hashes, hmac
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    with image_key.view() as data:
        mac_key = HKDF(hashes.SHA256(), 32, salt=None, info=LABEL + b" mac").derive(data)
    h = hmac.HMAC(mac_key, hashes.SHA256())
    h.update(LABEL + b"\0" + statement)
    return base64.b64encode(h.finalize()).decode()


def authenticate(image: Path, manifest: Manifest, recorded: str, image_key: Secret) -> None:
    """TamperedImageError unless `recorded` is the MAC of the manifest's bytes under the key."""
    from cryptography.hazmat.primitives import constant_time

    if not recorded:
        raise TamperedImageError(
            f"{image}/{envelope.FILE} carries no MAC of {MANIFEST}: nothing proves the image"
            " is the one its key holder built",
            REFUSED,
        )
    try:
        given = base64.b64decode(recorded, validate=True)
    except binascii.Error:
        given = b""
    expected = base64.b64decode(mac(image_key, manifest.raw))
    if not constant_time.bytes_eq(given, expected):
        raise TamperedImageError(
            f"{image}/{MANIFEST} was changed by someone without the image key"
            " (its MAC does not match)",
            REFUSED,
        )


def check_digest(digest: str) -> str:
    """`digest` if it reads sha256:<64 hex digits>; UsageError otherwise."""
    return oci.check_digest(digest, lambda: UsageError(
        f"--digest {digest!r} is not sha256:<64 lowercase hex digits>",
        "copy it from `cryptlayer inspect`",
    ))  # fmt: skip


def require_digest(image: Path, data: bytes, digest: str | None) -> None:
    """TamperedImageError when a digest was pinned and the statement's bytes `data` (before
    they are parsed: manifest.load's `check`) are another image's."""
    if digest is None:
        return
    found = oci.digest_of(data)
    if found != check_digest(digest):
        raise TamperedImageError(
            f"{image} is image {found}, not the {digest} that was asked for",
            "it may be an older or another image; copy the one you pinned",
        )
