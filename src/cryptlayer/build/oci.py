"""OCI image layouts, OCI archives and docker archives, named as skopeo names them.

`oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]`, `docker-archive:PATH`. Reads the manifest and config,
checks every blob against its sha256, and yields the layers bottom first. Archives are read in
place (tar members), never unpacked to disk.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, cast

from cryptlayer import oci
from cryptlayer.build import ocicrypt
from cryptlayer.errors import UsageError
from cryptlayer.fsutil import MAX_IMAGE_JSON, NotRegularError
from cryptlayer.image.manifest import ImageConfig, image_config

TRANSPORTS = ("oci", "oci-archive", "docker-archive")
MAX_JSON = 16 << 20  # an image's config and manifest (an index: fsutil.MAX_IMAGE_JSON)


class Blobs(Protocol):
    """Where the files of a layout live: a directory, or members of a tar."""

    def open(self, name: str) -> IO[bytes]: ...

    def describe(self, name: str) -> str: ...


def _clean(name: str) -> str:
    norm = posixpath.normpath(name.lstrip("/"))
    if norm.startswith("..") or norm == ".":
        raise UsageError(f"image refers to {name!r}, outside the image", "the image is malformed")
    return norm


@dataclass(frozen=True)
class DirBlobs:
    root: Path

    def open(self, name: str) -> IO[bytes]:
        """A regular file inside the layout, reached through no symlink at all: a layout's
        blobs are files, and a link could lead anywhere on the host."""
        try:
            fd = oci.LayoutReader(self.root).open(_clean(name))
        except FileNotFoundError:
            raise UsageError(
                f"{self.describe(name)} is missing", "the image is incomplete"
            ) from None
        except NotRegularError:
            raise UsageError(
                f"{self.describe(name)} is not a regular file", "the image is damaged"
            ) from None
        except OSError as err:
            why = "a symbolic link" if err.errno == errno.ELOOP else err.strerror
            raise UsageError(
                f"{self.describe(name)} is {why}; refusing to read it",
                "an OCI layout holds regular files only; copy the image again",
            ) from None
        return os.fdopen(fd, "rb")

    def describe(self, name: str) -> str:
        return str(self.root / _clean(name))


@dataclass(frozen=True)
class TarBlobs:
    archive: Path
    tar: tarfile.TarFile

    def open(self, name: str) -> IO[bytes]:
        try:
            f = self.tar.extractfile(_clean(name))
        except KeyError:
            f = None
        if f is None:
            raise UsageError(f"{self.describe(name)} is missing", "the archive is incomplete")
        return f

    def describe(self, name: str) -> str:
        return f"{self.archive}:{_clean(name)}"


@dataclass(frozen=True)
class OciLayer:
    """One layer: where its blob is, its blob digest (if known) and its diff_id."""

    blobs: Blobs
    path: str
    digest: str | None  # sha256:... of the blob as stored; None where the format has none
    diff_id: str  # sha256:... of the uncompressed tar, from the image config
    size: int | None
    cipher: ocicrypt.LayerCipher | None = None  # an ocicrypt-encrypted blob's, unwrapped

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """The layer's blob as its tar (compressed or not): an encrypted blob decrypted while
        it is read, and checked to its end (ocicrypt.decrypting)."""
        with self.blobs.open(self.path) as raw:
            if self.cipher is None or self.digest is None:
                yield raw
                return
            where = f"layer {self.blobs.describe(self.path)}"
            with ocicrypt.decrypting(raw, self.cipher, self.digest, self.size, where) as plain:
                yield cast(IO[bytes], plain)  # a RawIOBase, read as one


@dataclass(frozen=True)
class OciImage:
    reference: str
    layers: tuple[OciLayer, ...]
    config: ImageConfig


def split_reference(text: str) -> tuple[str, str, str] | None:
    """(transport, path, tag) for `oci:PATH[:TAG]` and friends; None for a plain path."""
    transport, sep, rest = text.partition(":")
    if not sep or transport not in TRANSPORTS:
        return None
    path, tag = rest, ""
    if transport != "docker-archive" and ":" in rest:
        path, _, tag = rest.rpartition(":")
    if not path:
        raise UsageError(f"{text!r} names no path", f"use {transport}:PATH")
    return transport, path, tag


def _read(blobs: Blobs, name: str, digest: str | None, limit: int) -> bytes:
    """At most `limit` bytes of `name`, checked against `digest` if given."""
    with blobs.open(name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{blobs.describe(name)} is too large for image metadata")
    if digest is not None:
        _check_digest(blobs, name, digest, oci.digest_of(data))
    return data


def _json(blobs: Blobs, name: str, digest: str | None = None) -> Any:
    data = _read(blobs, name, digest, MAX_JSON)
    try:
        return json.loads(data)
    except ValueError as err:
        raise UsageError(
            f"{blobs.describe(name)} is not valid JSON", "the image is damaged"
        ) from err


def _index(blobs: Blobs, name: str, digest: str | None = None) -> list[oci.IndexEntry]:
    """An index (index.json, or an image index blob): its manifests, every field checked."""
    shown = blobs.describe(name)
    data = _read(blobs, name, digest, MAX_IMAGE_JSON)
    return oci.index_entries(oci.parse_index(data, shown, "the image is damaged"), shown)


def _check_digest(blobs: Blobs, name: str, expected: str, actual: str) -> None:
    if expected != actual:
        raise UsageError(
            f"{blobs.describe(name)} does not match its digest {expected} (it is {actual})",
            "the image is corrupted; fetch it again",
        )


def _blob_path(digest: Any) -> str:
    oci.check_digest(digest, lambda: UsageError(f"unsupported or malformed digest {digest!r}",
                                                "only sha256 is supported"))  # fmt: skip
    return oci.blob_path(digest)


def verify_blob(layer: OciLayer) -> None:
    """Check the stored blob against its digest (and size), reading it once."""
    if layer.digest is None:
        return
    if layer.cipher is not None:  # the ciphertext's digest, size and HMAC
        with layer.blobs.open(layer.path) as raw:
            where = f"layer {layer.blobs.describe(layer.path)}"
            ocicrypt.verify(raw, layer.cipher, layer.digest, layer.size, where)
        return
    h = oci.hasher()
    n = 0
    with layer.blobs.open(layer.path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    _check_digest(layer.blobs, layer.path, layer.digest, oci.digest_of(h))
    if layer.size is not None and n != layer.size:
        raise UsageError(f"{layer.blobs.describe(layer.path)} has {n} bytes, expected {layer.size}")


def _image_config(raw: dict[str, Any]) -> ImageConfig:
    cfg = raw.get("config") or {}
    ports = cfg.get("ExposedPorts") or {}
    if not isinstance(ports, dict):
        raise TypeError("ExposedPorts is not an object")
    try:
        return image_config(
            entrypoint=cfg.get("Entrypoint"),
            cmd=cfg.get("Cmd"),
            env=cfg.get("Env"),
            workdir=cfg.get("WorkingDir"),
            user=cfg.get("User"),
            exposed_ports=sorted(ports),
            labels=cfg.get("Labels"),
        )
    except ValueError as err:
        raise TypeError(f"the image config: {err}") from err


def _diff_ids(raw: dict[str, Any], count: int, where: str) -> list[str]:
    diff_ids = list((raw.get("rootfs") or {}).get("diff_ids") or [])
    if len(diff_ids) != count:
        raise UsageError(
            f"{where}: the config lists {len(diff_ids)} diff_ids for {count} layers",
            "the image is malformed",
        )
    return diff_ids


def _select(blobs: Blobs, tag: str, where: str) -> oci.IndexEntry:
    """The manifest descriptor for `tag` (or the only one), descending into image indexes."""
    listed = _index(blobs, oci.INDEX)
    manifests = listed
    if tag:
        manifests = [m for m in listed if m.tag == tag]
        if not manifests:
            raise UsageError(
                f"{where} has no image tagged {tag!r}", "see its index.json for the tags"
            )
    if len(manifests) != 1:
        tags = sorted({m.tag or "?" for m in listed})
        raise UsageError(
            f"{where} holds {len(manifests)} images",
            f"name one with :TAG (tags: {', '.join(tags)})",
        )
    chosen = manifests[0]
    while chosen.media_type in oci.INDEX_TYPES:
        candidates = [
            m for m in _index(blobs, _blob_path(chosen.digest), chosen.digest)
            if m.platform.get("os", "linux") == "linux"
            and m.platform.get("architecture", "amd64") == "amd64"
        ]  # fmt: skip
        if not candidates:
            raise UsageError(f"{where} has no linux/amd64 image")
        chosen = candidates[0]
    return chosen


def _layer(
    blobs: Blobs, desc: dict[str, Any], diff_id: str, keys: tuple[ocicrypt.DecryptionKey, ...]
) -> OciLayer:
    path = _blob_path(desc["digest"])
    cipher = None
    if ocicrypt.is_encrypted(desc.get("mediaType")):
        where = f"layer {blobs.describe(path)}"
        cipher = ocicrypt.layer_cipher(desc.get("annotations"), keys, where)
    return OciLayer(blobs, path, desc["digest"], diff_id, desc.get("size"), cipher)


def _read_oci(
    reference: str,
    blobs: Blobs,
    tag: str,
    where: str,
    keys: tuple[ocicrypt.DecryptionKey, ...] = (),
) -> OciImage:
    layout = _json(blobs, oci.LAYOUT_FILE)
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise UsageError(f"{where} is not an OCI image layout (no imageLayoutVersion)")
    descriptor = _select(blobs, tag, where)
    manifest = _json(blobs, _blob_path(descriptor.digest), descriptor.digest)
    config_desc = manifest["config"]
    config = _json(blobs, _blob_path(config_desc["digest"]), config_desc["digest"])
    layer_descs = manifest.get("layers") or []
    diff_ids = _diff_ids(config, len(layer_descs), where)
    layers = tuple(
        _layer(blobs, d, diff_id, keys) for d, diff_id in zip(layer_descs, diff_ids, strict=True)
    )
    return OciImage(reference, layers, _image_config(config))


def _read_docker(reference: str, blobs: Blobs, where: str) -> OciImage:
    entries = _json(blobs, "manifest.json")
    if not isinstance(entries, list) or len(entries) != 1:
        count = len(entries) if isinstance(entries, list) else 0
        raise UsageError(f"{where} holds {count} images", "save exactly one image into the archive")
    entry = entries[0]
    config = _json(blobs, entry["Config"])
    config_name = posixpath.basename(entry["Config"]).removesuffix(".json")
    if len(config_name) == 64:  # named by its digest: check it
        with blobs.open(entry["Config"]) as f:
            actual = oci.digest_of(f.read())
        _check_digest(blobs, entry["Config"], f"sha256:{config_name}", actual)
    paths = list(entry.get("Layers") or [])
    diff_ids = _diff_ids(config, len(paths), where)
    layers = []
    for path, diff_id in zip(paths, diff_ids, strict=True):
        # Newer docker/podman archives store layers as blobs/sha256/<digest>: check those too.
        parts = path.split("/")
        digest = (
            f"sha256:{parts[-1]}" if len(parts) == 3 and parts[:2] == ["blobs", "sha256"] else None
        )
        layers.append(OciLayer(blobs, path, digest, diff_id, None))
    return OciImage(reference, tuple(layers), _image_config(config))


@contextmanager
def open_image(reference: str, keys: tuple[ocicrypt.DecryptionKey, ...] = ()) -> Iterator[OciImage]:
    """Read an image named by a transport reference; archives stay open while in use. `keys`
    unwrap the layers ocicrypt encrypted (--decryption-key)."""
    parsed = split_reference(reference)
    if parsed is None:
        raise UsageError(
            f"{reference!r} is not an image reference", f"use one of {', '.join(TRANSPORTS)}"
        )
    transport, path_text, tag = parsed
    path = Path(path_text)
    if not path.exists():
        raise UsageError(f"{path} does not exist", f"check the path in {reference!r}")
    try:
        if transport == "oci":
            if not path.is_dir():
                raise UsageError(f"{path} is not a directory", "oci: takes an OCI layout directory")
            yield _read_oci(reference, DirBlobs(path), tag, str(path), keys)
            return
        try:
            tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by `with tar` below)
        except (tarfile.TarError, OSError) as err:
            raise UsageError(
                f"{path} is not a tar archive ({err})", f"{transport}: takes an archive"
            ) from err
        with tar:
            blobs = TarBlobs(path, tar)
            if transport == "oci-archive":
                yield _read_oci(reference, blobs, tag, str(path), keys)
            else:
                yield _read_docker(reference, blobs, str(path))
    except (KeyError, TypeError, AttributeError) as err:
        raise UsageError(
            f"{reference}: malformed image metadata ({err!r})", "the image is damaged"
        ) from err


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.sha256 = oci.hasher()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        return n

    def drain(self) -> str:
        """Read to the end; return 'sha256:<hex>' of everything read."""
        while self.read(1 << 20):
            pass
        return oci.digest_of(self.sha256)
