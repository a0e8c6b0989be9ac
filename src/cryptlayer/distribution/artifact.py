"""An image as one OCI artifact: a standard OCI image manifest whose config blob is the statement
(manifest.json, so the config digest is the image digest) and whose layers are the image's
other files, each with its own media type and its file name in `org.opencontainers.image.title`.

Measured: CNCF distribution 2.8.2 (Debian's docker-registry) accepts it, and skopeo 1.9 copies
it registry to registry, to an `oci:` layout and back, keeping the manifest digest.
"""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptlayer import oci
from cryptlayer.errors import TamperedImageError, UsageError, printable
from cryptlayer.fsutil import (
    DIR_FLAGS,
    MAX_IMAGE_JSON,
    NotRegularError,
    open_regular,
    read_untrusted,
)
from cryptlayer.image import envelope, signatures
from cryptlayer.image.manifest import MANIFEST, Manifest

MANIFEST_TYPE = oci.MANIFEST_TYPE
ARTIFACT_TYPE = "application/vnd.cryptlayer.image.v2"
STATEMENT_TYPE = "application/vnd.cryptlayer.statement.v2+json"
LAYER_TYPE = "application/vnd.cryptlayer.layer.v2.luks2"
TREE_TYPE = "application/vnd.cryptlayer.layer.v2.verity"
KEYS_TYPE = "application/vnd.cryptlayer.keys.v1+json"
SIGNATURE_TYPE = "application/vnd.cryptlayer.signature.v1.sshsig"
TITLE = "org.opencontainers.image.title"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """One file of the image as a blob: its name in the image directory, type, digest, size."""

    name: str
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": {TITLE: self.name}}  # fmt: skip


def write_checked(
    chunks: Iterable[bytes], out: BinaryIO, h: Any, done: int, size: int,
    progress: Callable[[int], None],
) -> int:  # fmt: skip
    """Write a blob's bytes to `out`, hashing them into `h`; stops past `size` (a source sending
    more than it promised is cut off, not trusted); returns the bytes written in all."""
    for chunk in chunks:
        h.update(chunk)
        out.write(chunk)
        done += len(chunk)
        progress(done)
        if done > size:
            break
    return done


def require_blob(h: Any, done: int, digest: str, size: int, where: str, hint: str) -> None:
    """TamperedImageError unless what was written is blob `digest` (the caller removes it)."""
    if oci.digest_of(h) != digest or done != size:
        raise TamperedImageError(f"blob {digest} {where} does not match its digest", hint)


def fd_digest(fd: int) -> tuple[str, int]:
    """The sha256 digest and the size of what the open file `fd` holds, read from its start."""
    h = oci.hasher()
    done = 0
    while chunk := os.pread(fd, CHUNK, done):
        h.update(chunk)
        done += len(chunk)
    return oci.digest_of(h), done


def open_file(dir_fd: int, name: str, shown: Path, *, size: int | None = None,
              limit: int | None = None, flags: int = os.O_RDONLY) -> int:  # fmt: skip
    """File `name` of the directory `dir_fd` (NAME or signatures/NAME), opened only if it is a
    regular file with one link (no symlink followed, no device or FIFO opened), of `size` bytes
    or at most `limit`; UsageError saying what it is otherwise. `shown` names it in messages."""
    folder, _, base = name.rpartition("/")
    inner = os.open(folder, DIR_FLAGS, dir_fd=dir_fd) if folder else dir_fd
    try:
        fd = open_regular(base, dir_fd=inner, flags=flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except NotRegularError as err:
        raise UsageError(f"{shown} is not a regular file ({err.kind})",
                         "an image holds regular files only; copy it again") from None  # fmt: skip
    except FileNotFoundError:
        raise UsageError(f"{shown} is missing", "the image is incomplete; copy it again") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(
                f"{shown} is a symbolic link; refusing to follow it",
                "an image holds regular files only; copy it again",
            ) from None
        raise UsageError(f"cannot open {shown}: {err.strerror}") from None
    finally:
        if inner != dir_fd:
            os.close(inner)
    try:
        st = os.fstat(fd)
        if st.st_nlink != 1:
            raise UsageError(
                f"{shown} has {st.st_nlink} hard links; refusing it",
                "a file of an image must be its own: copy it with cp, not cp -l or ln",
            )
        if size is not None and st.st_size != size:
            raise UsageError(f"{shown} has {st.st_size} bytes, the manifest says {size}",
                             "the image is damaged (truncated?); copy it again")  # fmt: skip
        if limit is not None and st.st_size > limit:
            raise UsageError(f"{shown} has {st.st_size} bytes, more than {limit}",
                             "the image is damaged; copy it again")  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Outgoing:
    """An image directory being pushed: its statement and every other file, each opened once
    and checked, hashed from its descriptor and sent from the same one; a context manager."""

    image: Path
    manifest: Manifest
    statement: Blob
    others: list[Blob] = field(default_factory=list)
    fds: dict[str, int] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> Outgoing:
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def source(self, blob: Blob) -> BinaryIO:
        """What to send for `blob`, from its start: the statement's bytes as read, or the open
        file that was hashed (a new descriptor of the same open file)."""
        if blob.name == MANIFEST:
            return io.BytesIO(self.manifest.raw)
        f = os.fdopen(os.dup(self.fds[blob.name]), "rb")
        f.seek(0)
        self._stack.callback(f.close)
        return f


def blobs_of(image: Path, manifest: Manifest) -> Outgoing:
    """The statement blob and the other blobs of an image directory (layers, trees, keys.json,
    signatures), in a fixed order, each file opened (under `image`, opened without following a
    symlink), checked and hashed; UsageError for any file that is not a plain one."""
    from cryptlayer.image.signatures import DIR, MAX_SIGNATURE_BYTES, MAX_SIGNATURES, SUFFIX

    statement = Blob(MANIFEST, STATEMENT_TYPE, manifest.digest, len(manifest.raw))
    out = Outgoing(image, manifest, statement)
    try:
        try:
            dir_fd = os.open(image, DIR_FLAGS)
        except OSError as err:
            raise UsageError(f"{image} is not an image directory ({err.strerror})",
                             "give the --output of `cryptlayer build`") from None  # fmt: skip
        out._stack.callback(os.close, dir_fd)
        if read_untrusted(MANIFEST, MAX_IMAGE_JSON, dir_fd=dir_fd) != manifest.raw:
            raise UsageError(f"{image}/{MANIFEST} changed while it was read", "push it again")
        named: list[tuple[str, str, int | None, int | None]] = []
        for layer in manifest.layers:
            named += [(layer.file, LAYER_TYPE, layer.size, None),
                      (layer.tree, TREE_TYPE, layer.tree_size, None)]  # fmt: skip
        named.append((envelope.FILE, KEYS_TYPE, None, MAX_IMAGE_JSON))
        try:
            sig_fd = os.open(DIR, DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            sig_fd = -1
        except OSError as err:
            raise UsageError(
                f"{image}/{DIR} is not a directory ({err.strerror}; a symlink is not followed)",
                "remove it, or sign the image again",
            ) from None
        if sig_fd >= 0:
            try:
                sigs = sorted(n for n in os.listdir(sig_fd) if n.endswith(SUFFIX))
            finally:
                os.close(sig_fd)
            if len(sigs) > MAX_SIGNATURES:
                raise UsageError(f"{image}/{DIR} holds {len(sigs)} signatures, more than"
                                 f" {MAX_SIGNATURES}", "remove the ones no one needs")  # fmt: skip
            for n in sigs:
                try:
                    _check_name(f"{DIR}/{n}", SIGNATURE_TYPE, DIR)
                except ValueError:  # what every pull would refuse
                    raise UsageError(
                        f"{image}/{DIR}/{n} is not a plain file name",
                        "rename it (NAME.sig) or remove it; pull refuses an image carrying it",
                    ) from None
            named += [(f"{DIR}/{n}", SIGNATURE_TYPE, None, MAX_SIGNATURE_BYTES) for n in sigs]
        for name, kind, size, limit in named:
            fd = open_file(dir_fd, name, image / name, size=size, limit=limit)
            out._stack.callback(os.close, fd)
            out.fds[name] = fd
            digest, done = fd_digest(fd)
            if size is not None and done != size:
                raise UsageError(f"{image / name} changed while it was read", "push it again")
            out.others.append(Blob(name, kind, digest, done))
    except BaseException:
        out.__exit__()
        raise
    return out


def oci_manifest(statement: Blob, others: list[Blob], created: str) -> bytes:
    """The OCI image manifest (bytes as pushed: its digest is the manifest digest)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": STATEMENT_TYPE,
            "digest": statement.digest,
            "size": statement.size,
        },
        "layers": [b.descriptor() for b in others],
        "annotations": {"org.opencontainers.image.created": created} if created else {},
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def parse(data: bytes, where: str) -> tuple[Blob, list[Blob]]:
    """The blobs a pulled manifest names; UsageError unless it is a cryptlayer image whose every
    file name is a plain name (or signatures/NAME.sig) of a known type. The manifest is an
    attacker's: every field's type is checked, and a message shows a bad value shortened."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("the manifest is not a JSON object")
        config = doc.get("config")
        if doc.get("artifactType") != ARTIFACT_TYPE and not (
            isinstance(config, dict) and config.get("mediaType") == STATEMENT_TYPE
        ):
            raise ValueError("neither its artifactType nor its config's media type is cryptlayer's")
        if not isinstance(config, dict):
            raise ValueError("its config is not an object")
        digest, size = _digest(config.get("digest"), "config"), _size(config.get("size"), "config")
        statement = Blob(MANIFEST, STATEMENT_TYPE, digest, size)
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ValueError("its layers are not a list")
        others = []
        for i, item in enumerate(layers):
            where_i = f"layer {i}"
            annotations = item.get("annotations") if isinstance(item, dict) else None
            if not isinstance(annotations, dict):
                raise ValueError(f"{where_i} has no annotations object")
            kind = item.get("mediaType")
            name = _check_name(annotations.get(TITLE), kind, where_i)
            digest, size = _digest(item.get("digest"), where_i), _size(item.get("size"), where_i)
            others.append(Blob(name, kind, digest, size))
        names = [b.name for b in others]
        if len(set(names)) != len(names) or envelope.FILE not in names:
            raise ValueError(f"its files repeat, or it has no {envelope.FILE}")
        return statement, others
    except RecursionError:
        raise UsageError(f"{where} is not a cryptlayer image (its manifest is nested too"
                         " deeply)", "push one with `cryptlayer push`") from None  # fmt: skip
    except ValueError as err:
        why = str(err) if not isinstance(err, json.JSONDecodeError) else "it is not JSON"
        raise UsageError(f"{where} is not a cryptlayer image ({why})",
                         "push one with `cryptlayer push`") from None  # fmt: skip


def _shown(value: Any) -> str:
    """A value of the manifest for a message: as JSON, escaped, at most 80 characters."""
    text = printable(json.dumps(value))
    return text if len(text) <= 80 else f"{text[:77]}..."


def _digest(value: Any, where: str) -> str:
    return oci.check_digest(
        value, lambda: ValueError(f"{where}'s digest {_shown(value)} is not a sha256 digest")
    )


def _size(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 50:
        raise ValueError(f"{where}'s size {_shown(value)} is out of range")
    return value


def _check_name(name: Any, kind: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isprintable():
        raise ValueError(f"{where}'s file name {_shown(name)} is not printable")
    if name == MANIFEST:  # the statement is the config blob, and only that
        raise ValueError(f"a layer is titled {MANIFEST}, the statement's name")
    base = name.removeprefix(f"{signatures.DIR}/") if kind == SIGNATURE_TYPE else name
    if not base or "/" in base or base.startswith(".") or base != os.path.basename(base):
        raise ValueError(f"file name {_shown(name)} is not a plain name")
    if kind not in (LAYER_TYPE, TREE_TYPE, KEYS_TYPE, SIGNATURE_TYPE):
        raise ValueError(f"media type {_shown(kind)} is not one of cryptlayer's")
    return name
