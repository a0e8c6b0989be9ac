"""An OCI image layout on disk (`oci:PATH[:TAG]`, as skopeo writes one), as a place to push an
image to and pull it from: blobs/sha256/HEX, index.json naming each manifest by the annotation
org.opencontainers.image.ref.name, oci-layout. For air-gapped transfer. (WIP, part 8.)

A layout to pull from is an attacker's: every file is opened below the layout without following
symlinks (openat2 RESOLVE_NO_SYMLINKS), must be regular, and is size-capped or streamed and
checked against its digest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifact import require_blob, write_checked
from .errors import TamperedImageError, UsageError
from .fsutil import UntrustedFileError, open_in_root, read_regular, write_atomic

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MAX_JSON = 4 << 20
CHUNK = 1 << 20


class Layout:
    """One OCI layout directory, and the tag to push or pull."""

    def __init__(self, path: Path, tag: str) -> None:
        self.path, self.tag = path, tag or "latest"

    def __str__(self) -> str:
        return f"oci:{self.path}:{self.tag}"

    # pushing
    def prepare(self) -> None:
        (self.path / "blobs/sha256").mkdir(parents=True, exist_ok=True)
        marker = self.path / "oci-layout"
        if not marker.exists():
            write_atomic(marker, b'{"imageLayoutVersion": "1.0.0"}\n')

    def _blob(self, digest: str) -> Path:
        return self.path / "blobs/sha256" / digest.removeprefix("sha256:")

    def has_blob(self, digest: str) -> bool:
        return self._blob(digest).is_file()

    def push_blob(self, source: Path, digest: str, size: int,
                  progress: Callable[[int], None]) -> bool:  # fmt: skip
        if self.has_blob(digest):
            return False
        target = self._blob(digest)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        os.rename(partial, target)
        progress(size)
        return True

    def put_manifest(self, data: bytes, digest: str) -> None:
        target = self._blob(digest)
        if not target.exists():
            write_atomic(target, data)
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}
        if (self.path / "index.json").exists():
            index = self._index()
        listed: list[Any] = index.get("manifests") or []
        kept = [m for m in listed if m.get("annotations", {}).get(REF_NAME) != self.tag]
        kept.append({"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(data),
                     "annotations": {REF_NAME: self.tag}})  # fmt: skip
        index["manifests"] = kept
        write_atomic(self.path / "index.json", json.dumps(index, indent=2).encode() + b"\n")

    # pulling
    def _read(self, relative: str, limit: int) -> bytes:
        try:
            root = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"{self.path} is not an OCI layout ({err.strerror})") from None
        try:
            fd = open_in_root(root, relative, symlinks=False)
            return read_regular(fd, limit, f"{self.path}/{relative}")
        except FileNotFoundError:
            raise UsageError(f"{self.path}/{relative} is missing", "is it an OCI layout?") from None
        except (OSError, UntrustedFileError) as err:
            raise UsageError(f"{self.path}/{relative}: {err}") from None
        finally:
            os.close(root)

    def _index(self) -> dict[str, Any]:
        try:
            index = json.loads(self._read("index.json", MAX_JSON))
            if not isinstance(index, dict):
                raise ValueError("not an object")
            return index
        except ValueError as err:
            raise UsageError(f"{self.path}/index.json is not valid ({err})") from None

    def get_manifest(self) -> tuple[bytes, str]:
        for entry in self._index().get("manifests", []):
            if isinstance(entry, dict) and entry.get("annotations", {}).get(REF_NAME) == self.tag:
                digest = str(entry.get("digest", ""))
                break
        else:
            raise UsageError(f"{self} names no image", "list the layout's tags in index.json")
        data = self._read(f"blobs/sha256/{digest.removeprefix('sha256:')}", MAX_JSON)
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise TamperedImageError(f"manifest {digest} in {self.path} does not match its digest")
        return data, digest

    def pull_blob(self, digest: str, size: int, target: Path,
                  progress: Callable[[int], None]) -> None:  # fmt: skip
        root = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_in_root(root, f"blobs/sha256/{digest.removeprefix('sha256:')}",
                              symlinks=False)  # fmt: skip
        except OSError as err:
            raise UsageError(f"blob {digest} of {self.path}: {err.strerror}") from None
        finally:
            os.close(root)
        h = hashlib.sha256()
        with os.fdopen(fd, "rb") as src, open(target, "wb") as out:
            done = write_checked(iter(lambda: src.read(CHUNK), b""), out, h, 0, size, progress)
        require_blob(h, done, digest, size, target, f"of {self.path}",
                     "the layout was changed; copy it again")  # fmt: skip
