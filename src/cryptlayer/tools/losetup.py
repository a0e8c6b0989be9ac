"""losetup: loop devices over image and scratch files."""

from __future__ import annotations

from pathlib import Path

from ..runner import run
from . import udev


def attach(path: Path, *, readonly: bool) -> str:
    """Attach `path` to a free loop device and return the device node."""
    argv = ["losetup", "--find", "--show"]
    if readonly:
        argv.append("--read-only")
    device = run([*argv, str(path)]).stdout.strip()
    udev.wait_for_node(device)
    return device


def detach(device: str) -> None:
    """Detach loop `device`."""
    run(["losetup", "--detach", device])
