"""What `inspect` reports: read from the manifest and the live LUKS headers, never the key."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import envelope, signatures
from . import manifest as manifest_mod
from .errors import CryptlayerError, DamagedImageError, TamperedImageError, UsageError
from .imagefiles import open_dir, open_layer
from .manifest import ImageConfig, Layer
from .shred import keyslot_count

if TYPE_CHECKING:
    from .registry import Registry


@dataclass(frozen=True)
class LayerReport:
    """A layer as its manifest entry says, and its header's state now (or, of an image in a
    registry, its blob there: keyslots None, since no layer is fetched)."""

    layer: Layer
    keyslots: int | None
    state: str  # intact, erased, missing or damaged; in a registry: "in the registry", missing
    digest: str = ""  # in a registry: the blob's


@dataclass(frozen=True)
class SignatureReport:
    file: str  # under IMAGE/signatures/
    key: str  # the signer's key fingerprint ("?" when the file is unreadable)
    status: str  # "valid", or why not


@dataclass(frozen=True)
class ImageReport:
    """Everything `inspect` shows of an image."""

    image: str
    digest: str
    cipher: str
    created: str
    state: str  # intact, erased, or damaged (layers disagree, or one is missing)
    layers: tuple[LayerReport, ...]
    signatures: tuple[SignatureReport, ...]
    access: tuple[dict[str, Any], ...]  # keys.json entries without their wrapped keys and salts
    config: ImageConfig
    manifest_digest: str = ""  # of an image in a registry: its OCI manifest's (REF@DIGEST)

    def to_json(self) -> dict[str, Any]:
        """The `inspect --json` document."""
        doc = {
            "image": self.image,
            "signatures": [asdict(s) for s in self.signatures],
            "digest": self.digest,
            "cipher": self.cipher,
            "created": self.created,
            "state": self.state,
            "layers": [
                {**asdict(r.layer), "keyslots": r.keyslots, "state": r.state}
                | ({"digest": r.digest} if r.digest else {})
                for r in self.layers
            ],
            "access": [dict(entry) for entry in self.access],
            "config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()
            },
        }
        if self.manifest_digest:
            doc["manifest_digest"] = self.manifest_digest
        return doc


def inspect_image(image: Path) -> ImageReport:
    """Layers with sizes and keyslot state, who can open it, cipher, and the image config."""
    image = image.resolve()  # the path the user gave; below it, nothing is followed
    try:
        manifest = manifest_mod.load(image)
    except DamagedImageError as err:  # nothing to show: a damaged copy, as `verify` says
        raise TamperedImageError(err.message, err.hint) from err
    layers = []
    with open_dir(image) as files:
        for layer in manifest.layers:
            try:
                # Both files, each of the size the statement records (a layer cut short still
                # has its header: its keyslots say nothing of the rest).
                open_layer(files, layer.tree, layer.tree_size)
                slots = keyslot_count(open_layer(files, layer.file, layer.size))
                state = "intact" if slots else "erased"
            except CryptlayerError as err:
                slots, state = 0, "missing" if "missing" in err.message else "damaged"
            layers.append(LayerReport(layer, slots, state))
    states = {layer.state for layer in layers}
    overall = (
        "intact" if states == {"intact"} else ("erased" if states == {"erased"} else "damaged")
    )
    return _report(image, str(image), manifest, tuple(layers), overall)


def _report(
    folder: Path, name: str, manifest: manifest_mod.Manifest, layers: tuple[LayerReport, ...],
    state: str, manifest_digest: str = "",
) -> ImageReport:  # fmt: skip
    """The report of the image whose statement, keys.json and signatures are in `folder`."""
    try:
        access = [entry.to_json() for entry in envelope.load(folder).entries]
    except UsageError as err:
        access = [{"type": "unknown", "id": f"(none: {err})"}]
    for entry in access:
        entry.pop("wrapped", None)
        entry.pop("salt", None)
    good, bad = signatures.read_all(folder, manifest.raw)
    signed = [SignatureReport(s.file, s.key.fingerprint, "valid") for s in good]
    signed += [SignatureReport(b.file, "?", b.reason) for b in bad]
    return ImageReport(
        image=name,
        digest=manifest.digest,
        cipher=manifest.cipher,
        created=manifest.created,
        state=state,
        layers=layers,
        signatures=tuple(signed),
        access=tuple(access),
        config=manifest.config,
        manifest_digest=manifest_digest,
    )


def inspect_remote(registry: Registry) -> ImageReport:
    """An image in a registry, as `skopeo inspect` shows one: its manifest, then only its small
    blobs (the statement, keys.json, signatures: each size-capped and digest-checked in memory);
    no layer or hash tree is fetched. Read as untrusted as a pulled copy would be."""
    from . import artifact
    from .fsutil import MAX_IMAGE_JSON

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
        return _report(folder, str(registry), manifest, tuple(layers), state, manifest_digest)
