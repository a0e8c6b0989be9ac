"""manifest.json: what an image is made of (layers bottom first, and its default process).

Its exact bytes are the image's *statement* (statement.py): authenticated by the image key,
signed by publishers, and hashed into the image digest. So `load` keeps the bytes it parsed, and
everything `run` uses from an image comes from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptlayer import oci
from cryptlayer.errors import DamagedImageError, TamperedImageError, UsageError
from cryptlayer.fsutil import json_bytes, read_image_document, write_atomic
from cryptlayer.tools import BLOCK

MANIFEST = "manifest.json"
LAYER_SUFFIX = ".luks"  # layerN.luks: a layer (LUKS2 over ext4)
TREE_SUFFIX = ".verity"  # layerN.verity: its dm-verity hash tree
FORMAT = "cryptlayer.image.v2"
OLD_FORMATS = ("cryptlayer.image.v1",)  # before image authentication
MAX_LAYERS = 128  # each is a loop device, a mapping and a mount
MAX_SIZE = 1 << 50  # bytes of one layer file


def text(value: Any, what: str) -> str:
    """`value` if it is a string without NUL; ValueError naming `what` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not a string")
    if "\0" in value:
        raise ValueError(f"{what} holds a NUL character")
    return value


def texts(value: Any, what: str) -> tuple[str, ...]:
    """A list of strings (None or absent: empty); ValueError otherwise."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{what} is {type(value).__name__}, not a list of strings")
    return tuple(text(v, f"an item of {what}") for v in value)


def number(value: Any, what: str, high: int, low: int = 0) -> int:
    """An integer (not a bool) from `low` to `high`; ValueError otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} is {value!r}, not a whole number from {low} to {high}")
    return value


def image_config(
    entrypoint: Any = None,
    cmd: Any = None,
    env: Any = None,
    workdir: Any = None,
    user: Any = None,
    exposed_ports: Any = None,
    labels: Any = None,
) -> ImageConfig:
    """An ImageConfig from untrusted values (manifest.json or an OCI config), each checked."""
    if labels is None:
        pairs: list[Any] = []
    elif isinstance(labels, dict):
        pairs = list(labels.items())
    elif isinstance(labels, list):
        pairs = labels
    else:
        raise ValueError(f"labels is {type(labels).__name__}, not an object")
    checked = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError("a label is not a name and a value")
        checked.append((text(pair[0], "a label name"), text(pair[1], "a label value")))
    return ImageConfig(
        entrypoint=texts(entrypoint, "entrypoint"),
        cmd=texts(cmd, "cmd"),
        env=texts(env, "env"),
        workdir=text("/" if workdir in (None, "") else workdir, "workdir"),
        user=text("" if user is None else user, "user"),
        exposed_ports=texts(exposed_ports, "exposed_ports"),
        labels=tuple(sorted(checked)),
    )


@dataclass(frozen=True)
class Layer:
    """One LUKS2 file of an image."""

    file: str  # file name inside the image directory
    uuid: str  # LUKS UUID
    size: int  # bytes of the LUKS2 file
    content_bytes: int  # bytes of file content it holds
    source: str  # what it was built from
    offset: int  # byte offset of the encrypted data (the LUKS2 header's size)
    tree: str  # file name of its dm-verity hash tree, beside it
    tree_size: int  # bytes of that file
    root_hash: str  # dm-verity root hash over the whole layer file (hex)
    salt: str  # dm-verity salt (hex)
    digest: str = ""  # the OCI diff_id (sha256 of the uncompressed layer tar), if it had one

    @property
    def blocks(self) -> int:
        """Data blocks under the hash tree: the whole file."""
        return self.size // BLOCK


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
    key_bits: int = 512  # of the LUKS2 volume key
    sector_size: int = BLOCK
    created: str = ""
    # The exact bytes this was parsed from (or will be saved as): the statement.
    raw: bytes = field(default=b"", compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["raw"]
        return {"format": FORMAT, **data}

    def encode(self) -> bytes:
        """The bytes of manifest.json for this manifest."""
        return json_bytes(self.to_json())

    @property
    def digest(self) -> str:
        """The image digest: sha256 of manifest.json's exact bytes, as OCI writes digests."""
        return oci.digest_of(self.raw)


def load(
    image: Path, *, dir_fd: int | None = None, check: Callable[[bytes], None] | None = None
) -> Manifest:
    """Read IMAGE/manifest.json; UsageError saying what is wrong if it is missing or malformed.

    With `dir_fd` (IMAGE, open: image/opener.py), the file is read in that directory, whatever
    the name IMAGE means by now; `check` is given its bytes before they are parsed (a pinned
    digest: another statement is that, whatever it holds)."""
    path = image / MANIFEST
    if dir_fd is None and not image.is_dir():
        raise UsageError(
            f"{image} is not an image directory", "give the --output of `cryptlayer build`"
        )
    raw, data = read_image_document(
        path,
        (FORMAT, *OLD_FORMATS),
        "this is not a cryptlayer image, or it is incomplete",
        dir_fd=dir_fd,
        check=check,
    )
    if raw["format"] in OLD_FORMATS:
        raise TamperedImageError(
            f"{image} was built by an older cryptlayer, without image authentication",
            "rebuild it with this version",
        )
    try:
        raw_layers = raw["layers"]
        if not isinstance(raw_layers, list) or not raw_layers:
            raise ValueError("it lists no layers")
        if len(raw_layers) > MAX_LAYERS:
            raise ValueError(f"it lists {len(raw_layers)} layers, more than {MAX_LAYERS}")
        layers = tuple(_layer(item, i) for i, item in enumerate(raw_layers))
        names = [name for layer in layers for name in (layer.file, layer.tree)]
        if len(set(names)) != len(names):
            raise ValueError("a layer file is listed twice")
        cfg = raw.get("config") or {}
        if not isinstance(cfg, dict):
            raise ValueError("config is not an object")
        unknown = set(cfg) - {f.name for f in fields(ImageConfig)}
        if unknown:
            raise ValueError(f"config has unknown fields {sorted(unknown)}")
        config = image_config(**cfg)
        unknown = set(raw) - ({f.name for f in fields(Manifest)} - {"raw"}) - {"format"}
        if unknown:
            raise ValueError(f"it has unknown fields {sorted(unknown)}")
        return Manifest(
            layers,
            config,
            cipher=text(raw["cipher"], "cipher"),
            key_bits=number(raw["key_bits"], "key_bits", 1024, 128),
            sector_size=number(raw["sector_size"], "sector_size", 4096, 512),
            created=text(raw.get("created", ""), "created"),
            raw=data,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
        raise DamagedImageError(
            f"{path} is malformed: {detail}", "the image is damaged; rebuild it"
        ) from err


def _layer(item: Any, index: int) -> Layer:
    where = f"layer {index}"
    if not isinstance(item, dict):
        raise ValueError(f"{where} is not an object")
    unknown = set(item) - {f.name for f in fields(Layer)}
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}")
    name = _plain(text(item["file"], f"{where}'s file"))
    size = number(item["size"], f"{where}'s size", MAX_SIZE, BLOCK)
    if size % BLOCK:
        raise ValueError(f"{where}'s size {size} is not a multiple of {BLOCK} bytes")
    return Layer(
        file=name,
        uuid=text(item["uuid"], f"{where}'s uuid"),
        size=size,
        content_bytes=number(item["content_bytes"], f"{where}'s content_bytes", MAX_SIZE),
        source=text(item["source"], f"{where}'s source"),
        offset=number(item["offset"], f"{where}'s offset", 1 << 30, BLOCK),
        tree=_plain(text(item["tree"], f"{where}'s tree")),
        tree_size=number(item["tree_size"], f"{where}'s tree_size", MAX_SIZE // 64, BLOCK),
        root_hash=_hex(item["root_hash"], f"{where}'s root_hash"),
        salt=_hex(item["salt"], f"{where}'s salt"),
        digest=_digest(item.get("digest", ""), f"{where}'s digest"),
    )


def _plain(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or not name.isprintable():
        raise ValueError(f"layer file name {name!r} is not a plain name")
    return name


def _digest(value: Any, what: str) -> str:
    """A layer's OCI diff_id: none ("") or a digest, as build takes one from its source."""
    checked = text(value, what)
    if checked and not oci.is_digest(checked):
        raise ValueError(f"{what} is not a sha256 digest")
    return checked


def _hex(value: Any, what: str) -> str:
    checked = text(value, what)
    if not oci.is_sha256_hex(checked):
        raise ValueError(f"{what} is not 64 lowercase hex digits")
    return checked


def save(image: Path, manifest: Manifest) -> None:
    """Write IMAGE/manifest.json atomically, as the bytes of `manifest.raw`."""
    write_atomic(image / MANIFEST, manifest.raw, 0o644)
