"""push and pull of an image directory to and from a registry (WIP, part 8).

Push: every blob by digest (skipped when the registry has it), then the manifest by digest, then
the tag: a half-finished push is never visible under the tag. Pull: the manifest, then every blob
streamed into `.NAME.pull-DIGEST` beside the target, checked as it streams; an interrupted pull
resumes there; the directory is renamed into place when complete. Ciphertext only: nothing is
decrypted."""

from __future__ import annotations

import os
from pathlib import Path

from . import artifact
from . import manifest as manifest_mod
from .errors import UsageError
from .registry import Reference, Registry


def push(image: Path, ref: Reference, *, tls_verify: bool = True) -> tuple[str, int]:
    """Returns the manifest digest and how many blobs were uploaded."""
    image = image.resolve()
    loaded = manifest_mod.load(image)
    statement, others = artifact.blobs_of(image, loaded)
    registry = Registry(ref, tls_verify=tls_verify)
    sent = 0
    for blob in [statement, *others]:
        sent += registry.push_blob(image / blob.name, blob.digest, blob.size)
    data = artifact.oci_manifest(statement, others, loaded.created)
    import hashlib

    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    registry.put_manifest(data, digest)
    if ref.tag or not ref.digest:
        registry.put_manifest(data, ref.tag or "latest")
    return digest, sent


def pull(ref: Reference, target: Path, *, tls_verify: bool = True) -> str:
    """Pull into the new directory `target`; returns the manifest digest."""
    if target.exists():
        raise UsageError(
            f"{target} already exists", "choose a new directory (pull never overwrites)"
        )
    registry = Registry(ref, tls_verify=tls_verify)
    data, digest = registry.get_manifest(ref.ref)
    statement, others = artifact.parse(data, str(ref))
    partial = target.parent / f".{target.name}.pull-{digest[7:19]}"
    partial.mkdir(mode=0o755, exist_ok=True)
    (partial / "signatures").mkdir(exist_ok=True)
    for blob in [statement, *others]:
        registry.pull_blob(blob.digest, blob.size, partial / blob.name)
    manifest_mod.load(partial)  # a statement we can read, before it is in place
    if not any((partial / "signatures").iterdir()):
        (partial / "signatures").rmdir()
    os.rename(partial, target)
    return digest
