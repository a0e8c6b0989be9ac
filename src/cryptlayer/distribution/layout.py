"""An OCI image layout on disk (`oci:PATH[:TAG]`, as skopeo writes one), as a place to push an
image to and pull it from: blobs/sha256/HEX, index.json naming each manifest by the annotation
org.opencontainers.image.ref.name, oci-layout. For air-gapped transfer.

A layout to pull from is an attacker's: every file is opened below the layout without following
symlinks (openat2 RESOLVE_NO_SYMLINKS), must be regular, and is size-capped or streamed and
checked against its digest; index.json's every field is checked. A layout pushed to may be
someone else's too: its directories are opened without following a symlink and every file is
created new (O_EXCL, O_NOFOLLOW) under a temporary name, then renamed into place; a blob already
there is kept only if its bytes are that blob."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from cryptlayer import oci
from cryptlayer.distribution.artifact import require_blob, write_checked
from cryptlayer.errors import TamperedImageError, UsageError
from cryptlayer.fsutil import (
    MAX_IMAGE_JSON,
    NotRegularError,
    UntrustedFileError,
    open_dir,
    open_regular,
)
from cryptlayer.oci import (
    DEFAULT_TAG,
    INDEX_TYPE,
    MANIFEST_TYPE,
    REF_NAME,
    LayoutReader,
    NotALayoutError,
)

CHUNK = 1 << 20
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Layout:
    """One OCI layout directory, and the tag to push or pull ("": pushed as `latest`; pulled:
    the layout's one image, or else `latest`)."""

    def __init__(self, path: Path, tag: str) -> None:
        self.path, self.tag = path, tag

    def __str__(self) -> str:
        return f"oci:{self.path}:{self.tag}" if self.tag else f"oci:{self.path}"

    # pushing
    def _open_dir(self, dir_fd: int | None, name: str | Path, create: bool) -> int:
        """Directory `name` (below `dir_fd`), made if `create` and absent, opened without
        following a symlink; UsageError if it is not a directory."""
        shown = self.path / name if dir_fd is not None else self.path
        try:
            return open_dir(name, dir_fd=dir_fd, mode=0o755 if create else None, shown=shown)
        except OSError as err:
            raise UsageError(
                f"{shown} is not a directory of an OCI layout ({err.strerror};"
                " a symlink is not followed)",
                "give another oci:PATH",
            ) from None

    def _blob_dir(self) -> tuple[int, int]:
        """The layout's directory and its blobs/sha256, open (both to be closed by the caller)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            below = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
            raise UsageError(
                f"cannot create {self.path}: Not a directory ({below} is not one)"
            ) from None
        except OSError as err:
            raise UsageError(f"cannot create {self.path}: {err.strerror}") from None
        root = self._open_dir(None, self.path, True)
        try:
            blobs = self._open_dir(root, "blobs", True)
            try:
                return root, self._open_dir(blobs, "sha256", True)
            finally:
                os.close(blobs)
        except BaseException:
            os.close(root)
            raise

    def prepare(self) -> None:
        root, sha = self._blob_dir()
        try:
            if not _exists(root, "oci-layout"):
                _replace(root, "oci-layout", [b'{"imageLayoutVersion": "1.0.0"}\n'])
        finally:
            os.close(sha)
            os.close(root)

    def push_blob(self, source: BinaryIO, digest: str, size: int,
                  progress: Callable[[int], None]) -> bool:  # fmt: skip
        """Copy `source` (read from where it stands) into the layout as blob `digest`, unless
        that very blob is there (a regular file of that size and digest: the layout may be
        someone else's); its sha256 checked while it is copied."""
        root, sha = self._blob_dir()
        try:
            name = _hex(digest)
            if _holds(sha, name, digest, size):
                return False
            h = oci.hasher()
            chunks = iter(lambda: source.read(CHUNK), b"")
            done = _replace(sha, name, chunks, h, size, progress)
            if oci.digest_of(h) != digest or done != size:
                os.unlink(name, dir_fd=sha)
                raise UsageError(f"{digest} changed while it was pushed", "push it again")
            return True
        finally:
            os.close(sha)
            os.close(root)

    def put_manifest(self, data: bytes, digest: str) -> None:
        root, sha = self._blob_dir()
        try:
            if not _holds(sha, _hex(digest), digest, len(data)):
                _replace(sha, _hex(digest), [data])
            index: dict[str, Any] = {"schemaVersion": 2, "mediaType": INDEX_TYPE}
            listed: list[dict[str, Any]] = []
            if _exists(root, oci.INDEX):
                index = self._reader.index(self._read)
                listed = [entry.raw for entry in self._entries(index)]
            tag = self.tag or DEFAULT_TAG
            kept = [m for m in listed if m.get("annotations", {}).get(REF_NAME) != tag]
            kept.append({"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(data),
                         "annotations": {REF_NAME: tag}})  # fmt: skip
            index["manifests"] = kept
            _replace(root, oci.INDEX, [json.dumps(index, indent=2).encode() + b"\n"])
        finally:
            os.close(sha)
            os.close(root)

    # pulling
    @property
    def _reader(self) -> LayoutReader:
        return LayoutReader(self.path)

    def _read(self, relative: str, limit: int) -> bytes:
        try:
            return self._reader.read(relative, limit)
        except NotALayoutError as err:
            raise UsageError(f"{self.path} is not an OCI layout ({err.strerror})") from None
        except FileNotFoundError:
            raise UsageError(f"{self.path}/{relative} is missing", "is it an OCI layout?") from None
        except UntrustedFileError as err:  # (it names the file)
            raise UsageError(str(err), "is it an OCI layout, as skopeo writes one?") from None
        except OSError as err:
            if err.errno == errno.ELOOP:  # (as build says it of the same reader's refusal)
                raise _symlink(f"{self.path}/{relative}") from None
            raise UsageError(f"{self.path}/{relative}: {err.strerror}") from None

    def _entries(self, index: dict[str, Any]) -> list[oci.IndexEntry]:
        return oci.index_entries(index, f"{self.path}/{oci.INDEX}")

    def get_manifest(self) -> tuple[bytes, str]:
        entries = self._entries(self._reader.index(self._read))
        chosen = [e.digest for e in entries if e.tag == (self.tag or DEFAULT_TAG)]
        if not self.tag and len(entries) == 1:
            chosen = [entries[0].digest]  # as skopeo: a layout of one image needs no tag
        if not chosen:
            tags = ", ".join(sorted({e.tag for e in entries if e.tag})) or "none"
            hint = "name one: oci:PATH:TAG" if self.tag or entries else "push one there first"
            raise UsageError(f"{self} names no image (it holds {len(entries)}; tags: {tags})",
                             hint)  # fmt: skip
        digest = chosen[-1]
        data = self._read(oci.blob_path(digest), MAX_IMAGE_JSON)
        if oci.digest_of(data) != digest:
            raise TamperedImageError(
                f"manifest digest {digest} in {self.path} does not match the manifest",
                "the layout was changed; copy it again",
            )
        return data, digest

    def pull_blob(self, digest: str, size: int, out: BinaryIO,
                  progress: Callable[[int], None]) -> None:  # fmt: skip
        """Copy blob `digest` into `out` (an open file, written from its start); its sha256
        checked (TamperedImageError: the caller removes the file)."""
        _hex(digest)
        try:
            fd = self._reader.open_blob(digest)
        except NotRegularError as err:
            raise UsageError(
                f"blob {digest} of {self.path} is not a regular file ({err.kind})",
                "an OCI layout holds regular files only; copy it again",
            ) from None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _symlink(f"{self.path}/{oci.blob_path(digest)}") from None
            raise UsageError(f"blob {digest} of {self.path}: {err.strerror}") from None
        h = oci.hasher()
        with os.fdopen(fd, "rb") as src:
            out.seek(0)
            out.truncate()
            done = write_checked(iter(lambda: src.read(CHUNK), b""), out, h, 0, size, progress)
        require_blob(h, done, digest, size, f"of {self.path}",
                     "the layout was changed; copy it again")  # fmt: skip


def _symlink(shown: str) -> UsageError:
    """The error for a symlink in a layout, where no symlink is followed."""
    return UsageError(
        f"{shown} is a symbolic link; refusing to read it",
        "an OCI layout holds regular files only; copy the image again",
    )


def _hex(digest: str) -> str:
    """The file name of blob `digest`; UsageError unless it is a sha256 digest."""
    oci.check_digest(digest, lambda: UsageError(f"{digest!r} is not a sha256 digest",
                                                "the layout is damaged"))  # fmt: skip
    return digest.removeprefix("sha256:")


def _exists(dir_fd: int, name: str, size: int | None = None) -> bool:
    """Whether `name` in `dir_fd` is a regular file (not a symlink), of `size` bytes if given."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)


def _holds(dir_fd: int, name: str, digest: str, size: int) -> bool:
    """Whether `name` in `dir_fd` is blob `digest`: a regular file (opened without following a
    symlink, never a device or FIFO) of `size` bytes whose sha256 is that digest. A wrong one is
    then replaced through a fresh .partial, never written in place."""
    try:
        fd = open_regular(name, dir_fd=dir_fd)
    except (OSError, UntrustedFileError):  # absent, a symlink, not a regular file
        return False
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size != size:
            return False
        h = oci.hasher()
        done = 0
        while chunk := f.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
    return done == size and oci.digest_of(h) == digest


def _replace(dir_fd: int, name: str, chunks: Iterable[bytes], h: Any = None, size: int = -1,
             progress: Callable[[int], None] | None = None) -> int:  # fmt: skip
    """Write `chunks` to a new file `.NAME.RANDOM.partial` of `dir_fd` (created, never opened
    through a symlink), then rename it to `name`; the bytes written."""
    partial = f".{name}.{secrets.token_hex(4)}.partial"
    fd = os.open(partial, NEW_FILE, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            if h is not None:
                done = write_checked(chunks, out, h, 0, size, progress or (lambda _: None))
            else:
                done = 0
                for chunk in chunks:
                    out.write(chunk)
                    done += len(chunk)
        os.rename(partial, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(partial, dir_fd=dir_fd)
        raise
    return done
