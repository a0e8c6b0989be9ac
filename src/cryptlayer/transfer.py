"""`push` and `pull`: an image directory to and from a registry or an OCI layout (WIP, part 8).

Push: every blob by digest (skipped where the store has it), then the manifest by digest, then
the tag: a half-finished push is never visible under the tag. Pull: the manifest, then every
blob streamed into `.NAME.pull-DIGEST` beside the target and checked as it streams; an
interrupted pull resumes there (complete files are checked again, not fetched again); the
directory is renamed into place when complete. Only ciphertext moves: nothing is decrypted."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from . import artifact, signatures
from . import manifest as manifest_mod
from .errors import TamperedImageError, UsageError
from .layout import Layout
from .progress import Progress, Silent
from .registry import Registry, parse_reference


class Store(Protocol):
    def prepare(self) -> None: ...
    def push_blob(self, path: Path, digest: str, size: int,
                  progress: Callable[[int], None]) -> bool: ...  # fmt: skip
    def put_manifest(self, data: bytes, digest: str) -> None: ...
    def get_manifest(self) -> tuple[bytes, str]: ...
    def pull_blob(self, digest: str, size: int, target: Path,
                  progress: Callable[[int], None]) -> None: ...  # fmt: skip


def open_store(text: str, *, tls_verify: bool = True, cert_dir: Path | None = None,
               **auth: Any) -> Any:  # fmt: skip
    """A registry (docker://HOST/REPO[:TAG|@DIGEST], docker:// optional) or a layout
    (oci:PATH[:TAG])."""
    if text.startswith("oci:"):
        path, _, tag = text.removeprefix("oci:").partition(":")
        if not path:
            raise UsageError(f"{text!r} names no path", "use oci:PATH[:TAG]")
        return Layout(Path(path), tag)
    return Registry(parse_reference(text), tls_verify=tls_verify, cert_dir=cert_dir, **auth)


Show = Callable[[str, int], Progress]


def _quiet(_label: str, _total: int) -> Progress:
    return Silent()


@contextmanager
def _bar(show: Show, blob: artifact.Blob, phase: str) -> Iterator[Callable[[int], None]]:
    """A progress display for one blob, and the callback that feeds it bytes done."""
    bar = show(blob.name, blob.size)
    try:
        yield lambda done: bar.update(phase, done)
    finally:
        bar.close()


def push(image: Path, store: Store, show: Show = _quiet) -> tuple[str, int]:
    """Returns the manifest digest and how many blobs were sent."""
    image = image.resolve()
    loaded = manifest_mod.load(image)
    statement, others = artifact.blobs_of(image, loaded)
    store.prepare()
    sent = 0
    for blob in [statement, *others]:
        with _bar(show, blob, "push") as report:
            sent += store.push_blob(image / blob.name, blob.digest, blob.size, report)
    data = artifact.oci_manifest(statement, others, loaded.created)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    store.put_manifest(data, digest)
    return digest, sent


def pull(store: Store, target: Path, *, digest: str | None = None, trust: Path | None = None,
         show: Show = _quiet) -> tuple[str, bool]:  # fmt: skip
    """Pull into `target`; returns the manifest digest and whether anything was fetched (an
    image already there costs one manifest request)."""
    data, found = store.get_manifest()
    if digest is not None and found != digest:
        raise TamperedImageError(f"{store} is {found}, not the pinned {digest}",
                                 "it was re-tagged, or this is another image")  # fmt: skip
    statement, others = artifact.parse(data, str(store))
    if target.exists():
        if _same(target, statement, others):
            return found, False
        raise UsageError(f"{target} already exists and holds another image",
                         "choose a new directory (pull never overwrites)")  # fmt: skip
    partial = target.parent / f".{target.name}.pull-{found.removeprefix('sha256:')[:12]}"
    partial.mkdir(mode=0o755, exist_ok=True)
    if any(b.name.startswith("signatures/") for b in others):
        (partial / "signatures").mkdir(exist_ok=True)
    for blob in [statement, *others]:
        path = partial / blob.name
        if path.exists() and path.stat().st_size == blob.size and \
                artifact.file_digest(path) == blob.digest:  # fmt: skip
            continue  # complete from an interrupted pull, and checked again
        try:
            with _bar(show, blob, "pull") as report:
                store.pull_blob(blob.digest, blob.size, path, report)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            need = sum(b.size for b in [statement, *others])
            raise UsageError(
                f"no space left on the device of {target.parent} for {blob.name} (the image"
                f" takes {need} bytes)",
                f"free some space, then pull again: it resumes from {partial.name}",
            ) from None
    loaded = manifest_mod.load(partial)  # a statement we can read, before it is in place
    if trust is not None:
        signatures.require_trusted(partial, loaded.raw, trust)
    os.rename(partial, target)
    return found, True


def _same(target: Path, statement: artifact.Blob, others: list[artifact.Blob]) -> bool:
    """Whether `target` already is this image: its statement's digest and its files' sizes."""
    try:
        raw = (target / "manifest.json").read_bytes()
    except OSError:
        return False
    if f"sha256:{hashlib.sha256(raw).hexdigest()}" != statement.digest:
        return False
    files = [b for b in others if b.name != "keys.json"]  # (a local rekey changes it)
    if not all((target / b.name).is_file() and (target / b.name).stat().st_size == b.size
               for b in files):  # fmt: skip
        return False
    return not _shredded(target)


def _shredded(image: Path) -> bool:
    """Whether a local copy's layers were crypto-erased (then it is not the image any more)."""
    from .luksheader import read

    for layer in manifest_mod.load(image).layers:
        with open(image / layer.file, "rb") as f:
            if read(f.fileno(), image / layer.file).keyslots == 0:
                return True
    return False
