"""What `inspect` reports: read from the manifest and the live LUKS headers, never the key."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import envelope, signatures
from . import manifest as manifest_mod
from .errors import CryptlayerError, UsageError
from .imagefiles import open_dir, open_layer
from .shred import keyslot_count


def inspect_image(image: Path) -> dict[str, Any]:
    """Layers with sizes and keyslot state, who can open it, cipher, and the image config."""
    image = image.resolve()  # the path the user gave; below it, nothing is followed
    manifest = manifest_mod.load(image)
    layers = []
    with open_dir(image) as files:
        for layer in manifest.layers:
            try:
                slots = keyslot_count(open_layer(files, layer.file, None))
                state = "intact" if slots else "erased"
            except CryptlayerError as err:
                slots, state = 0, "missing" if "missing" in err.message else "damaged"
            layers.append({**asdict(layer), "keyslots": slots, "state": state})
    states = {layer["state"] for layer in layers}
    overall = (
        "intact" if states == {"intact"} else ("erased" if states == {"erased"} else "damaged")
    )
    try:
        access = [entry.to_json() for entry in envelope.load(image).entries]
    except UsageError as err:
        access = [{"type": "unknown", "id": f"(none: {err})"}]
    for entry in access:
        entry.pop("wrapped", None)
        entry.pop("salt", None)
    good, bad = signatures.read_all(image, manifest.raw)
    signed = [{"file": s.file, "key": s.key.fingerprint, "status": "valid"} for s in good]
    signed += [{"file": b.file, "key": "?", "status": b.reason} for b in bad]
    return {
        "image": str(image),
        "signatures": signed,
        "digest": manifest.digest,
        "cipher": manifest.cipher,
        "created": manifest.created,
        "state": overall,
        "layers": layers,
        "access": access,
        "config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(manifest.config).items()
        },
    }
