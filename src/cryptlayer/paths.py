"""Where cryptlayer keeps things: state on disk, everything secret-bearing in memory."""

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
    from .errors import UsageError

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
