"""manifest.json: what an image is made of (layers bottom first, and its default process)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .fsutil import read_image_json, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "cryptlayer.image.v1"


@dataclass(frozen=True)
class Layer:
    """One LUKS2 file of an image."""

    file: str  # file name inside the image directory
    uuid: str  # LUKS UUID
    size: int  # bytes of the LUKS2 file
    content_bytes: int  # bytes of file content it holds
    source: str  # what it was built from
    digest: str = ""  # the OCI diff_id (sha256 of the uncompressed layer tar), if it had one


@dataclass(frozen=True)
class ImageConfig:
    """The default process of an image (the OCI image config's fields)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str = "/"
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Manifest:
    """An image: its layers, bottom first, and its config."""

    layers: tuple[Layer, ...]
    config: ImageConfig = field(default_factory=ImageConfig)
    cipher: str = "aes-xts-plain64"
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


def load(image: Path) -> Manifest:
    """Read IMAGE/manifest.json; UsageError saying what is wrong if it is missing or malformed."""
    path = image / MANIFEST
    if not image.is_dir():
        raise UsageError(
            f"{image} is not an image directory", "give the --output of `cryptlayer build`"
        )
    raw = read_image_json(path, FORMAT, "this is not a cryptlayer image, or it is incomplete")
    try:
        layers = tuple(Layer(**layer) for layer in raw["layers"])
        if not layers:
            raise ValueError("it lists no layers")
        for layer in layers:
            if "/" in layer.file or layer.file.startswith("."):
                raise ValueError(f"layer file name {layer.file!r} is not a plain name")
        cfg = raw.get("config", {})
        config = ImageConfig(
            entrypoint=tuple(cfg.get("entrypoint", ())),
            cmd=tuple(cfg.get("cmd", ())),
            env=tuple(cfg.get("env", ())),
            workdir=cfg.get("workdir", "/") or "/",
            user=cfg.get("user", ""),
            exposed_ports=tuple(cfg.get("exposed_ports", ())),
            labels=tuple((str(k), str(v)) for k, v in cfg.get("labels", ())),
        )
        return Manifest(layers, config, raw.get("cipher", ""), raw.get("created", ""))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
        raise UsageError(
            f"{path} is malformed: {detail}", "the image is damaged; rebuild it"
        ) from err


def save(image: Path, manifest: Manifest) -> None:
    """Write IMAGE/manifest.json atomically."""
    write_json_atomic(image / MANIFEST, manifest.to_json())
