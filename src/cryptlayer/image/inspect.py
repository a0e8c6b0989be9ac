"""What `inspect` reports: read from the manifest and the live LUKS headers, never the key."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptlayer.errors import CryptlayerError, DamagedImageError, TamperedImageError, UsageError
from cryptlayer.image import envelope, signatures
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.image.files import open_layer
from cryptlayer.image.manifest import ImageConfig, Layer
from cryptlayer.image.opener import Policy, keyslot_count, open_image


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
    try:  # the statement only: each layer is opened below, tolerantly
        opened = open_image(image, Policy(allow_shared=True, layers=False))
    except DamagedImageError as err:  # nothing to show: a damaged copy, as `verify` says
        raise TamperedImageError(err.message, err.hint) from err
    layers = []
    with opened:
        manifest, files = opened.manifest, opened.files
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
        return report(
            opened.image, str(opened.image), manifest, tuple(layers), overall,
            dir_fd=files.dir_fd,
        )  # fmt: skip


def report(
    folder: Path, name: str, manifest: manifest_mod.Manifest, layers: tuple[LayerReport, ...],
    state: str, manifest_digest: str = "", *, dir_fd: int | None = None,
) -> ImageReport:  # fmt: skip
    """The report of the image whose statement, keys.json and signatures are in `folder` (with
    `dir_fd`: the folder, open)."""
    try:
        access = [entry.to_json() for entry in envelope.load(folder, dir_fd=dir_fd).entries]
    except UsageError as err:
        access = [{"type": "unknown", "id": f"(none: {err})"}]
    for entry in access:
        entry.pop("wrapped", None)
        entry.pop("salt", None)
    good, bad = signatures.read_all(folder, manifest.raw, dir_fd=dir_fd)
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
