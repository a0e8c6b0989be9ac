"""The OCI image-spec's formats: digests, and an image layout on disk (index.json, blobs/sha256).

One home for what build/ (an `oci:` layout as a source) and distribution/ (a layout to push to
and pull from) both read. A layout is an attacker's: every file is reached below its directory
through no symlink at all, only a regular file is opened (never a device or FIFO), and index.json
is size-capped and every field of it checked before anything is taken from it. The callers turn
the errors raised here into their own messages (they say what the user was doing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptlayer.errors import UsageError
from cryptlayer.fsutil import MAX_IMAGE_JSON, NotRegularError, kind, open_in_root, read_regular

ALGORITHM = "sha256"  # the only one cryptlayer writes or accepts
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{64}")

LAYOUT_FILE = "oci-layout"
INDEX = "index.json"
BLOBS = "blobs"
REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_TAG = "latest"  # what a reference without a tag means (docker's, skopeo's)
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
# What an index entry may point at that is itself an index (docker's manifest list too).
INDEX_TYPES = frozenset({INDEX_TYPE, "application/vnd.docker.distribution.manifest.list.v2+json"})


class _Hash(Protocol):
    def hexdigest(self) -> str: ...


# ---- digests ------------------------------------------------------------------------------------


def is_digest(value: object) -> bool:
    """Whether `value` is a digest as cryptlayer takes one: `sha256:` and 64 lowercase hex
    digits (the image-spec's canonical form; nothing else names a blob or a file)."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def is_sha256_hex(value: object) -> bool:
    """Whether `value` is a SHA-256 as 64 lowercase hex digits (a digest without its prefix)."""
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


def check_digest(value: Any, error: Callable[[], Exception]) -> str:
    """`value` if it is a digest (is_digest), else raise `error()`: each caller says in its own
    words what was wrong (a usage error for --digest, a damaged layout, a hostile registry)."""
    if not is_digest(value):
        raise error()
    return str(value)


def digest_of(data: bytes | bytearray | memoryview | _Hash) -> str:
    """The digest of `data`, or of what a sha256 object (hasher()) was fed."""
    if isinstance(data, bytes | bytearray | memoryview):
        return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"
    return f"{ALGORITHM}:{data.hexdigest()}"


def hasher() -> Any:
    """A new sha256 object, for a blob hashed as it streams (digest_of(h) gives its digest)."""
    return hashlib.sha256()


def blob_path(digest: str) -> str:
    """Where blob `digest` lives in a layout, below its directory; ValueError unless it is a
    digest (so that no name from an index can lead anywhere else)."""
    if not is_digest(digest):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return f"{BLOBS}/{ALGORITHM}/{digest.removeprefix(ALGORITHM + ':')}"


# ---- an image layout on disk --------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    """One descriptor of an index: its digest (checked), tag ("" if none), media type ("" if
    none), platform ({} if none) and the entry itself, as it was read."""

    digest: str
    tag: str
    media_type: str
    platform: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


def parse_index(data: bytes, shown: str, damaged: str = "the layout is damaged") -> dict[str, Any]:
    """An index document (index.json, or an image index blob) as a JSON object; UsageError
    naming `shown` otherwise."""
    try:
        index = json.loads(data)
        if not isinstance(index, dict):
            raise ValueError("not an object")
        return index
    except RecursionError:
        raise UsageError(f"{shown} is nested too deeply") from None
    except ValueError as err:
        raise UsageError(f"{shown} is not valid ({err})", damaged) from None


def index_entries(index: dict[str, Any], shown: str) -> list[IndexEntry]:
    """An index's manifests, every field that is used checked: a list of objects, each with a
    sha256 digest, an annotations object whose ref.name (if any) is a string, a string media
    type and an object platform (if any); UsageError naming `shown` otherwise."""
    listed = index.get("manifests", [])
    bad = f"{shown} is not valid"
    if not isinstance(listed, list):
        raise UsageError(f"{bad} (manifests is not a list)", "the layout is damaged")
    found = []
    for i, entry in enumerate(listed):
        annotations = entry.get("annotations", {}) if isinstance(entry, dict) else None
        digest = entry.get("digest") if isinstance(entry, dict) else None
        if not isinstance(annotations, dict) or not isinstance(digest, str):
            raise UsageError(f"{bad} (manifests[{i}] has no digest or annotations object)",
                             "the layout is damaged")  # fmt: skip
        assert isinstance(entry, dict)
        tag = annotations.get(REF_NAME, "")
        if not isinstance(tag, str):
            raise UsageError(f"{bad} (manifests[{i}]'s {REF_NAME} is not a string)",
                             "the layout is damaged")  # fmt: skip
        if not is_digest(digest):
            raise UsageError(f"{digest!r} is not a sha256 digest", "the layout is damaged")
        media_type, platform = entry.get("mediaType", ""), entry.get("platform", {})
        if not isinstance(media_type, str) or not isinstance(platform, dict):
            raise UsageError(f"{bad} (manifests[{i}]'s mediaType or platform is malformed)",
                             "the layout is damaged")  # fmt: skip
        found.append(IndexEntry(digest, tag, media_type, platform, entry))
    return found


class NotALayoutError(OSError):
    """The layout's own directory could not be opened (errno and strerror as open(2) said)."""


class LayoutReader:
    """An OCI image layout directory, read as an attacker's (the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, relative: str) -> int:
        """Regular file `relative` below the layout, open for reading, reached through no
        symlink (OSError ELOOP) and never opened if it is anything else (NotRegularError);
        OSError as open(2) gives it otherwise (FileNotFoundError...), NotALayoutError if the
        layout's directory cannot be opened. Its own path is the user's, and is followed."""
        try:
            root = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise NotALayoutError(err.errno, err.strerror, str(self.path)) from None
        try:
            fd = open_in_root(root, relative, symlinks=False)
        finally:
            os.close(root)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # (an O_PATH descriptor: nothing was opened)
            os.close(fd)
            raise NotRegularError(f"{self.path}/{relative}", kind(mode))
        return fd

    def read(self, relative: str, limit: int) -> bytes:
        """All of regular file `relative` (open), at most `limit` bytes (UntrustedFileError)."""
        return read_regular(self.open(relative), limit, f"{self.path}/{relative}")

    def open_blob(self, digest: str) -> int:
        """Blob `digest`, as open(); ValueError unless `digest` is a digest."""
        return self.open(blob_path(digest))

    def index(self, read: Callable[[str, int], bytes] | None = None) -> dict[str, Any]:
        """index.json, size-capped (MAX_IMAGE_JSON) and parsed: a JSON object. `read` is how
        the caller reads a file (its own messages); read() by default."""
        return parse_index((read or self.read)(INDEX, MAX_IMAGE_JSON), f"{self.path}/{INDEX}")
