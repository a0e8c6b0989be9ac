"""`inspect docker://REF`: an image in a registry, reported as image/inspect.py reports a
copy on disk, from its manifest and small blobs only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptlayer.distribution import artifact
from cryptlayer.distribution.registry import Registry
from cryptlayer.errors import TamperedImageError
from cryptlayer.fsutil import MAX_IMAGE_JSON
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.image import signatures
from cryptlayer.image.inspect import ImageReport, LayerReport, report


def inspect_remote(registry: Registry) -> ImageReport:
    """An image in a registry, as `skopeo inspect` shows one: its manifest, then only its small
    blobs (the statement, keys.json, signatures: each size-capped and digest-checked in memory);
    no layer or hash tree is fetched. Read as untrusted as a pulled copy would be."""
    data, manifest_digest = registry.get_manifest()
    statement, others = artifact.parse(data, str(registry))
    small = {
        artifact.KEYS_TYPE: MAX_IMAGE_JSON,
        artifact.SIGNATURE_TYPE: signatures.MAX_SIGNATURE_BYTES,
    }
    # As pull refuses it, before anything is fetched: not thousands of requests and files.
    count = sum(b.name.startswith(f"{signatures.DIR}/") for b in others)
    if count > signatures.MAX_SIGNATURES:
        raise TamperedImageError(
            f"{registry} lists {count} signatures, more than {signatures.MAX_SIGNATURES}",
            "the manifest was changed; pull from the publisher",
        )
    wanted = [(statement, MAX_IMAGE_JSON)]
    wanted += [(b, small[b.media_type]) for b in others if b.media_type in small]
    with tempfile.TemporaryDirectory(prefix="cryptlayer-inspect-") as tmp:  # 0700, ours
        folder = Path(tmp)
        os.mkdir(folder / signatures.DIR, 0o700)
        for blob, limit in wanted:
            body = registry.read_small_blob(blob.digest, blob.size, limit)
            fd = os.open(folder / blob.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)  # fmt: skip
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        manifest = manifest_mod.load(folder)
        blobs = {b.name: b for b in others}
        layers = []
        for layer in manifest.layers:
            there = blobs.get(layer.file)
            if there is None:
                layers.append(LayerReport(layer, None, "missing"))
            elif there.size != layer.size:
                layers.append(LayerReport(layer, None, f"{there.size} bytes there", there.digest))
            else:
                layers.append(LayerReport(layer, None, "in the registry", there.digest))
        complete = all(r.state == "in the registry" and r.layer.tree in blobs for r in layers)
        state = "in the registry" if complete else "damaged"
        return report(folder, str(registry), manifest, tuple(layers), state, manifest_digest)
