"""losetup: loop devices over image and scratch files."""

from __future__ import annotations

from pathlib import Path

from ..runner import run


def attach(path: Path, *, readonly: bool) -> str:
    """Attach `path` to a free loop device and return the device node."""
    argv = ["losetup", "--find", "--show"]
    if readonly:
        argv.append("--read-only")
    return run([*argv, str(path)]).stdout.strip()


def detach(device: str) -> None:
    """Detach loop `device`."""
    run(["losetup", "--detach", device])
