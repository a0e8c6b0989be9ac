"""The placeholder: the image an engine creates a container from when the container's files come
from an encrypted image through cryptlayer-runtime (docs/engines.md).

Engines need an image of their own to create a container; this one is tiny (one empty layer),
says what it is in its labels, and carries markers instead of a default process: the runtime
(next slice) recognises them in the bundle's config.json and puts the encrypted image's own
entrypoint, command, working directory and PATH in their place, while anything the user gave the
engine replaces a marker and wins, as with any image.

Its bytes are always the same (fixed times, sorted JSON): one image ID wherever it is made.
"""

from __future__ import annotations

import io
import json
import platform
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptlayer import oci
from cryptlayer.errors import UsageError
from cryptlayer.image.markers import ENTRYPOINT, PATH, WORKDIR
from cryptlayer.tools import engines

REFERENCE = "localhost/cryptlayer/placeholder:v1"  # localhost/: never pulled from a registry
TAG = REFERENCE.rpartition(":")[2]  # not "latest": Kubernetes would try to pull that every time
# The markers (docs/engines.md, "The default process"). An engine runs Entrypoint + Cmd; a command
# given to it replaces Cmd (empty here), --entrypoint (Kubernetes' `command`) replaces both.
LABEL = "org.cryptlayer.placeholder"
CREATED = "2026-01-01T00:00:00Z"
DESCRIPTION = ("cryptlayer placeholder: a container created from it through cryptlayer-runtime"
               " runs the encrypted image named by the annotation org.cryptlayer.image or the"
               " environment variable CRYPTLAYER_IMAGE; this image has no files")  # fmt: skip
EMPTY_TAR = b"\0" * 1024  # a tar archive's end: two zero blocks, no member
ENGINES = ("podman", "docker", "containerd")

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"

# platform.machine() to the GOARCH names images use
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
                 "s390x": "s390x", "riscv64": "riscv64", "i686": "386"}  # fmt: skip


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return oci.digest_of(self.data)

    @property
    def hex(self) -> str:  # the digest's hex, as docker-archive names files
        return self.digest.removeprefix("sha256:")

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data),
                **extra}  # fmt: skip


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def architecture() -> str:
    machine = platform.machine()
    return ARCHITECTURES.get(machine, machine)


@dataclass(frozen=True)
class Image:
    config: Blob
    layer: Blob
    manifest: Blob


def image() -> Image:
    """The placeholder's config, layer and manifest."""
    layer = Blob(LAYER_TYPE, EMPTY_TAR)
    labels = {LABEL: TAG, "org.opencontainers.image.title": "cryptlayer placeholder",
              "org.opencontainers.image.description": DESCRIPTION}  # fmt: skip
    config = Blob(CONFIG_TYPE, _json({
        "created": CREATED,
        "architecture": architecture(),
        "os": "linux",
        "config": {"Entrypoint": [ENTRYPOINT], "WorkingDir": WORKDIR, "Env": [f"PATH={PATH}"],
                   "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "history": [{"created": CREATED, "created_by": "cryptlayer placeholder",
                     "comment": DESCRIPTION}],
    }))  # fmt: skip
    manifest = Blob(MANIFEST_TYPE, _json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": {"org.opencontainers.image.created": CREATED,
                        "org.opencontainers.image.description": DESCRIPTION},
    }))  # fmt: skip
    return Image(config, layer, manifest)


def _tar(path: Path, members: Iterable[tuple[str, bytes | None]]) -> None:
    """A tar of `members` (name, bytes; None for a directory), owned by root, time 0."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))


def oci_archive(path: Path) -> None:
    """An oci-archive (podman load, ctr images import): the name in index.json's annotations,
    `io.containerd.image.name` (which podman and containerd read) and the ref.name tag."""
    made = image()
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [made.manifest.descriptor(annotations={
                 "io.containerd.image.name": REFERENCE,
                 "org.opencontainers.image.ref.name": TAG})]}  # fmt: skip
    blobs = [(oci.blob_path(b.digest), b.data) for b in (made.config, made.layer, made.manifest)]
    _tar(path, [("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
                ("index.json", _json(index)), ("blobs", None), ("blobs/sha256", None),
                *blobs])  # fmt: skip


def docker_archive(path: Path) -> None:
    """A docker-archive (docker load; Docker 20.10 reads no other)."""
    made = image()
    layer = f"{made.layer.hex}/layer.tar"
    manifest = [{"Config": f"{made.config.hex}.json", "RepoTags": [REFERENCE],
                 "Layers": [layer]}]  # fmt: skip
    _tar(path, [(f"{made.config.hex}.json", made.config.data), (made.layer.hex, None),
                (layer, made.layer.data), ("manifest.json", _json(manifest))])  # fmt: skip


def load(engine: str) -> str:
    """Put the placeholder into `engine`'s image store; its reference. The archive is made in
    a private temporary directory and removed afterwards."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", f"use one of {', '.join(ENGINES)}")
    work = Path(tempfile.mkdtemp(prefix="cryptlayer-placeholder-"))  # mode 0700
    try:
        archive = work / "placeholder.tar"
        (docker_archive if engine == "docker" else oci_archive)(archive)
        engines.load(engine, archive)  # each client reads the file and streams it to its daemon
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return REFERENCE


class Store(Protocol):
    def prepare(self) -> None: ...
    def push_blob(self, source: Any, digest: str, size: int, progress: Any) -> bool: ...
    def put_manifest(self, data: bytes, digest: str) -> None: ...


def push(store: Store) -> str:
    """Push the placeholder to a registry or layout (transfer.open_store); its manifest digest."""
    made = image()
    store.prepare()
    for blob in (made.config, made.layer):
        store.push_blob(io.BytesIO(blob.data), blob.digest, len(blob.data), lambda _done: None)
    store.put_manifest(made.manifest.data, made.manifest.digest)
    return made.manifest.digest
