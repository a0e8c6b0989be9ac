"""Where cryptlayer keeps things: state on disk, everything secret-bearing in memory."""

from __future__ import annotations

import os
from pathlib import Path


def state_root() -> Path:
    """$CRYPTLAYER_ROOT: container records, the lock, scratch files (all encrypted or harmless)."""
    return Path(os.environ.get("CRYPTLAYER_ROOT", "/var/lib/cryptlayer"))


def run_root() -> Path:
    """Memory-backed runtime files: mount points and OCI configs (which may hold secrets)."""
    return Path(os.environ.get("CRYPTLAYER_RUNDIR", "/run/cryptlayer"))


def records_dir() -> Path:
    return state_root() / "containers"


def scratch_dir() -> Path:
    return state_root() / "scratch"
