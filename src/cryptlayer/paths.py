"""Where cryptlayer keeps things, and what it names them: state on disk, everything
secret-bearing in memory; every device-mapper name starts with `cryptlayer-`."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def state_root() -> Path:
    """$CRYPTLAYER_ROOT: container records, the lock, scratch files (all encrypted or harmless)."""
    return Path(os.environ.get("CRYPTLAYER_ROOT", "/var/lib/cryptlayer"))


def run_root() -> Path:
    """Memory-backed runtime files: mount points and OCI configs (which may hold secrets)."""
    return Path(os.environ.get("CRYPTLAYER_RUNDIR", "/run/cryptlayer"))


def private_run_root() -> Path:
    """run_root(), created if missing (after a reboot /run is empty), and private: a directory,
    not a symlink, owned by us, mode 0700, so no other user reaches a decrypted mount below it.
    UsageError if it cannot be made so."""
    from cryptlayer.errors import UsageError

    root = run_root()
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700, parents=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}"
        raise UsageError(
            f"runtime directory {root} is {what}, not a directory of ours",
            "remove it (cryptlayer creates it private); check who made it",
        )
    if st.st_mode & 0o077:
        os.chmod(root, 0o700, follow_symlinks=False)
    return root


def records_dir() -> Path:
    return state_root() / "containers"


def scratch_dir() -> Path:
    return state_root() / "scratch"


def block_cache_dir() -> Path:
    """Lazy start's cache of layer ciphertext, by blob digest (distribution/blockcache.py)."""
    return state_root() / "blockcache"


# The block cache's layout: distribution/blockcache.py writes it; the runtime drops a blob's
# chunks after a verity failure, and gc removes the temporary files of writers that died.
CACHE_TEMP_PREFIX = ".tmp-"  # a chunk being written, beside its name: .tmp-INDEX-PID-TID
CACHE_TEMP_STALE = 600.0  # seconds: a temporary chunk file this old belongs to a writer that died


def cached_blobs_dir(root: Path | None = None) -> Path:
    """The block cache's directory of blobs (`root`, or the node's cache): one directory each."""
    return (root or block_cache_dir()) / "sha256"


def cached_blob_dir(digest: str, root: Path | None = None) -> Path:
    """The directory of blob `digest`'s chunks (INDEX, 8 hex digits, each): `digest` must have
    been checked (oci.is_digest), as it is a path component."""
    return cached_blobs_dir(root) / digest.removeprefix("sha256:")


def openings_dir() -> Path:
    """The journals of images' shared layers (state.Opening)."""
    return state_root() / "images"


# Per container NAME
def scratch_file(name: str) -> Path:
    """The sparse file behind the container's writable layer."""
    return scratch_dir() / f"{name}.img"


def container_dir(name: str) -> Path:
    """/run/cryptlayer/NAME: the container's mounts and its OCI bundle."""
    return run_root() / name


def scratch_mount(name: str) -> Path:
    return container_dir(name) / "scratch"


def rootfs_mount(name: str) -> Path:
    return container_dir(name) / "rootfs"


def oci_config(name: str) -> Path:
    return container_dir(name) / "config.json"


def container_mapping_prefix(name: str) -> str:
    """The start of the names of the container's own mappings."""
    return f"cryptlayer-{name}-"


def scratch_mapping(name: str) -> str:
    return f"{container_mapping_prefix(name)}scratch"


def container_id(name: str) -> str:
    """The OCI runtime's id for the container."""
    return f"cryptlayer-{name}"


# Per image (by the hash of its path), for its shared layers
def image_mapping_prefix(image_id: str) -> str:
    """The start of the names of an image's shared mappings ('--': no container's name starts
    with '-', so no container's own mappings, `cryptlayer-NAME-...`, can match)."""
    return f"cryptlayer--{image_id}-"


def layer_mapping(image_id: str, index: int) -> str:
    """The LUKS mapping of an image's layer (on top of its verity mapping)."""
    return f"{image_mapping_prefix(image_id)}layer{index}"


def verity_mapping(image_id: str, index: int) -> str:
    """The dm-verity mapping of an image's layer file, under its LUKS mapping."""
    return f"{layer_mapping(image_id, index)}-verity"


def images_run_dir() -> Path:
    """/run/cryptlayer/.images: the shared layers' mount points and header copies."""
    return run_root() / ".images"


def image_run_dir(image_id: str) -> Path:
    return images_run_dir() / image_id


def layer_mount(image_id: str, index: int) -> Path:
    return image_run_dir(image_id) / f"layer{index}"


def header_copy(image_id: str, index: int) -> Path:
    """A layer's LUKS header, kept in memory once the disk's keyslots are erased at start."""
    return image_run_dir(image_id) / f"layer{index}.hdr"


# Build and the runtime
def build_mapping() -> str:
    """A fresh name for a layer being built."""
    import secrets

    return f"cryptlayer-build-{secrets.token_hex(6)}"


def build_mount(mapping: str) -> Path:
    """Where a layer being built is filled: a dot name, never a container's."""
    return private_run_root() / f".build-{mapping}"


def runtime_state() -> Path:
    """The OCI runtime's own state (`crun --root`): memory-backed like the rest."""
    return run_root() / ".oci"


def lazy_run_dir() -> Path:
    """Lazy start's fetched images, a private directory each (docs/lazy.md): a dot name, never a
    container's (run_root()/NAME)."""
    return run_root() / ".lazy"
