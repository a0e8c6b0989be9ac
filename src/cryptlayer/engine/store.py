"""The node's store of images cryptlayer-runtime pulls at `create` (docs/engines.md, "Registry
images"): a directory of root's, mode 0700 (`[pull] store`, else $CRYPTLAYER_ROOT/engine/images),
holding one copy per container, named after it (`engine-ID`), pulled by distribution/transfer.py
under the node's trust and registry settings, and removed again at `delete` or when the `create`
that pulled it fails.

One copy per container, not one per digest shared with a count: two containers of one image
never touch each other's copy (one's delete cannot shred what the other runs; a count that a
killed `create` leaves wrong cannot keep or lose a copy), and the image's layers are opened per
copy (runtime/layers.py names its mappings by the image's path). The price is a pull and the
disk space per container.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptlayer.errors import CryptlayerError, UsageError
from cryptlayer.fsutil import DIR_FLAGS, make_dir

WIPE_BYTES = 2 * (4 << 20) + (128 << 20)  # LUKS2's two largest headers and keyslots area
CHUNK = 1 << 20


def store_dir() -> Path:
    """Where pulled copies go: `[pull] store`, else $CRYPTLAYER_ROOT/engine/images."""
    from cryptlayer import config, paths

    return config.pull_settings().store or paths.state_root() / "engine" / "images"


def open_store() -> int:
    """The store, made (with its missing parents, 0700) if absent, opened by descriptor;
    UsageError unless it is a directory of ours (root's) that no one else may use."""
    store = store_dir()
    for parent in reversed(store.parents):
        if not parent.exists():
            make_dir(parent, 0o700)
    make_dir(store, 0o700)
    try:
        fd = os.open(store, DIR_FLAGS)
    except OSError as err:
        raise UsageError(
            f"the pull store {store} is not a directory ({err.strerror}; a symlink is not"
            " followed)",
            "remove it, or set [pull] store",
        ) from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise UsageError(
            f"the pull store {store} is not root's own private directory (owner uid {st.st_uid},"
            f" mode {stat.S_IMODE(st.st_mode):04o}): others could read or replace the copies",
            f"chown root {store}; chmod 700 {store}",
        )
    return fd


def target(name: str) -> Path:
    """Where the copy for the container `name` goes, in a store checked as open_store does."""
    os.close(open_store())
    return store_dir() / name


@dataclass(frozen=True)
class Pulled:
    """A copy in the store: its path, and whether this create made it (False: a kept copy of
    an earlier run of the container, checked file by file and reused)."""

    path: Path
    new: bool


def pull(reference: str, name: str, digest: str | None, trust: Path | None) -> Pulled:
    """Pull `reference` (docker://...) into the store as `name`, `digest` pinning the image and
    `trust` (None: the node allows unsigned images) vouching for it. A copy of that name kept
    from an earlier run is reused if it is this image, else replaced. On any failure nothing of
    this pull is left (a reused copy stays as it was)."""
    from cryptlayer import config
    from cryptlayer.distribution import transfer
    from cryptlayer.distribution.registry import parse_reference
    from cryptlayer.errors import TamperedImageError

    ref = parse_reference(reference)
    registry = config.registry_settings(ref.host)
    settings = config.pull_settings()
    fd = open_store()
    try:
        target = store_dir() / name
        existed = os.path.lexists(target)
        try:
            store = transfer.open_store(reference, tls_verify=registry.tls_verify,
                                        cert_dir=registry.cert_dir,
                                        authfile=settings.auth_file)  # fmt: skip
            try:
                pulled = transfer.pull(store, target, digest=digest, trust=trust)
            except (TamperedImageError, UsageError):
                if not existed:
                    raise
                discard(name)  # a kept copy of another image, or shredded: pull it anew
                existed = False
                pulled = transfer.pull(store, target, digest=digest, trust=trust)
        except BaseException:
            if not existed:
                discard_quietly(name)
            raise
        return Pulled(target, pulled.fetched or not existed)
    finally:
        os.close(fd)


def holds(image: str | Path) -> str | None:
    """The name of the store's copy `image` is (a path the store's records name), else None."""
    path = Path(image)
    try:
        store = store_dir().resolve()
    except (CryptlayerError, OSError):
        return None
    if path.parent.resolve() != store or not path.name or path.name.startswith("."):
        return None
    return path.name


def discard(name: str, *, wipe: bool = True) -> None:
    """Remove the copy `name` and any pull work directory of it (`.NAME.pull-` and 12 hex
    digits) from the store, each file's first bytes (up to LUKS2's largest header and keyslots
    area: every key slot) overwritten with zeros first unless `wipe` is off (a copy whose
    keyslots were erased)."""
    import re

    # exactly transfer.py's `.NAME.pull-` and 12 hex digits: `.engine-a.pull-x.pull-...` is the
    # work of the container `a.pull-x`, not of `a`
    work = re.compile(rf"\.{re.escape(name)}\.pull-[0-9a-f]{{12}}")
    fd = open_store()
    try:
        for entry in os.listdir(fd):
            if entry == name or work.fullmatch(entry):
                _remove(fd, entry, wipe)
    finally:
        os.close(fd)


def discard_quietly(name: str) -> None:
    """discard after a failure, whose error is the one to show: its own only as a warning."""
    import sys

    try:
        discard(name)
    except (CryptlayerError, OSError) as err:
        print(f"warning: cryptlayer-runtime: removing the pulled copy of {name}: {err}",
              file=sys.stderr)  # fmt: skip


def _remove(dir_fd: int, entry: str, wipe: bool) -> None:
    """Remove `entry` of `dir_fd` (a directory: what is in it first), by descriptor, never
    following a symlink."""
    st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(entry, DIR_FLAGS, dir_fd=dir_fd)
        try:
            for inner in os.listdir(sub):
                _remove(sub, inner, wipe)
        finally:
            os.close(sub)
        os.rmdir(entry, dir_fd=dir_fd)
        return
    if wipe and stat.S_ISREG(st.st_mode):
        _zero_head(dir_fd, entry)
    os.unlink(entry, dir_fd=dir_fd)


def _zero_head(dir_fd: int, entry: str) -> None:
    """Overwrite the first WIPE_BYTES of file `entry` (or all of it) with zeros, on the disk."""
    fd = os.open(entry, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        left = min(os.fstat(fd).st_size, WIPE_BYTES)
        zeros = bytes(CHUNK)
        offset = 0
        while offset < left:
            offset += os.pwrite(fd, zeros[: min(CHUNK, left - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
