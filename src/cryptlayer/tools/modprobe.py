"""modprobe: load the kernel modules cryptlayer needs."""

from __future__ import annotations

from pathlib import Path

from cryptlayer.tools.runner import run


def available() -> bool:
    """Whether modprobe is installed (it is absent in some containers and sandboxes)."""
    return Path("/sbin/modprobe").exists() or Path("/usr/sbin/modprobe").exists()


def load(module: str) -> None:
    """Load `module` quietly; a failure shows later, when the feature is looked for."""
    run(["modprobe", "-q", module], check=False)
