"""An image as one OCI artifact: a standard OCI image manifest whose config blob is the statement
(manifest.json, so the config digest is the image digest) and whose layers are the image's
other files, each with its own media type and its file name in `org.opencontainers.image.title`.

Measured: CNCF distribution 2.8.2 (Debian's docker-registry) accepts it, and skopeo 1.9 copies
it registry to registry, to an `oci:` layout and back, keeping the manifest digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import TamperedImageError, UsageError
from .manifest import MANIFEST, Manifest

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.cryptlayer.image.v2"
STATEMENT_TYPE = "application/vnd.cryptlayer.statement.v2+json"
LAYER_TYPE = "application/vnd.cryptlayer.layer.v2.luks2"
TREE_TYPE = "application/vnd.cryptlayer.layer.v2.verity"
KEYS_TYPE = "application/vnd.cryptlayer.keys.v1+json"
SIGNATURE_TYPE = "application/vnd.cryptlayer.signature.v1.sshsig"
TITLE = "org.opencontainers.image.title"
MAX_MANIFEST = 4 << 20  # as distribution's own limit
CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """One file of the image as a blob: its name in the image directory, type, digest, size."""

    name: str
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": {TITLE: self.name}}  # fmt: skip


def write_checked(
    chunks: Iterable[bytes], out: BinaryIO, h: Any, done: int, size: int,
    progress: Callable[[int], None],
) -> int:  # fmt: skip
    """Write a blob's bytes to `out`, hashing them into `h`; stops past `size` (a source sending
    more than it promised is cut off, not trusted); returns the bytes written in all."""
    for chunk in chunks:
        h.update(chunk)
        out.write(chunk)
        done += len(chunk)
        progress(done)
        if done > size:
            break
    return done


def require_blob(h: Any, done: int, digest: str, size: int, target: Path, where: str,
                 hint: str) -> None:  # fmt: skip
    """TamperedImageError (and `target` removed) unless what was written is blob `digest`."""
    if f"sha256:{h.hexdigest()}" != digest or done != size:
        target.unlink(missing_ok=True)
        raise TamperedImageError(f"blob {digest} {where} does not match its digest", hint)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def blobs_of(image: Path, manifest: Manifest) -> tuple[Blob, list[Blob]]:
    """The statement blob and the other blobs of an image directory (layers, trees, keys.json,
    signatures), in a fixed order."""
    statement = Blob(MANIFEST, STATEMENT_TYPE, manifest.digest, len(manifest.raw))
    named = []
    for layer in manifest.layers:
        named += [(layer.file, LAYER_TYPE), (layer.tree, TREE_TYPE)]
    named.append(("keys.json", KEYS_TYPE))
    sigdir = image / "signatures"
    if sigdir.is_dir():
        named += [(f"signatures/{p.name}", SIGNATURE_TYPE) for p in sorted(sigdir.glob("*.sig"))]
    others = [
        Blob(name, kind, file_digest(image / name), (image / name).stat().st_size)
        for name, kind in named
    ]
    return statement, others


def oci_manifest(statement: Blob, others: list[Blob], created: str) -> bytes:
    """The OCI image manifest (bytes as pushed: its digest is the manifest digest)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": STATEMENT_TYPE,
            "digest": statement.digest,
            "size": statement.size,
        },
        "layers": [b.descriptor() for b in others],
        "annotations": {"org.opencontainers.image.created": created} if created else {},
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def parse(data: bytes, where: str) -> tuple[Blob, list[Blob]]:
    """The blobs a pulled manifest names; UsageError unless it is a cryptlayer image whose every
    file name is a plain name (or signatures/NAME.sig) of a known type."""
    try:
        doc = json.loads(data)
        if doc.get("artifactType") != ARTIFACT_TYPE and (
            doc.get("config", {}).get("mediaType") != STATEMENT_TYPE
        ):
            raise ValueError("neither its artifactType nor its config's media type is cryptlayer's")
        config = doc["config"]
        statement = Blob(MANIFEST, STATEMENT_TYPE, _digest(config["digest"]), _size(config["size"]))
        others = []
        for item in doc["layers"]:
            name = item["annotations"][TITLE]
            kind = item["mediaType"]
            _check_name(name, kind)
            others.append(Blob(name, kind, _digest(item["digest"]), _size(item["size"])))
        names = [b.name for b in others]
        if len(set(names)) != len(names) or "keys.json" not in names:
            raise ValueError("its files repeat, or it has no keys.json")
        return statement, others
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{where} is not a cryptlayer image ({err})",
                         "push one with `cryptlayer push`") from None  # fmt: skip


def _digest(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("sha256:") or len(value) != 71:
        raise ValueError(f"digest {value!r} is not a sha256 digest")
    int(value[7:], 16)
    return value


def _size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 50:
        raise ValueError(f"size {value!r} is out of range")
    return value


def _check_name(name: Any, kind: str) -> None:
    if not isinstance(name, str) or not name.isprintable():
        raise ValueError(f"file name {name!r} is not printable")
    base = name.removeprefix("signatures/") if kind == SIGNATURE_TYPE else name
    if not base or "/" in base or base.startswith(".") or base != os.path.basename(base):
        raise ValueError(f"file name {name!r} is not a plain name")
    if kind not in (LAYER_TYPE, TREE_TYPE, KEYS_TYPE, SIGNATURE_TYPE):
        raise ValueError(f"media type {kind!r} is not one of cryptlayer's")
