"""Preconditions on the host: root, the programs cryptlayer drives, and the kernel features."""

from __future__ import annotations

import os
from pathlib import Path

from cryptlayer.errors import MissingToolError, NotRootError

# runner and modprobe are imported where programs are looked for or run: `require_root`, all a
# teardown asks of this module, needs neither.

KERNEL_MODULES = ("loop", "dm_crypt", "dm_verity", "overlay")


def require_root(action: str) -> None:
    """NotRootError unless we run as root (loop devices, dm-crypt and mounts need it)."""
    if os.geteuid() != 0:
        raise NotRootError(f"must be root to {action}", "run it with sudo")


def require_tools(*programs: str) -> None:
    """MissingToolError naming the first program that is not installed."""
    from cryptlayer.tools.runner import which

    for program in programs:
        which(program)


def require_kernel() -> None:
    """Load loop, dm_crypt, dm_verity and overlay; MissingToolError when the kernel cannot
    provide them."""
    from cryptlayer.tools import modprobe

    if (not _has_dm_crypt() or not _has_verity() or not _has_overlay()) and modprobe.available():
        for module in KERNEL_MODULES:
            modprobe.load(module)
    if not _has_dm_crypt():
        raise MissingToolError(
            "this kernel has no dm-crypt (device-mapper crypt target)",
            "load the dm_crypt module, or run cryptlayer in a VM with a stock kernel (see README)",
        )
    if not _has_verity():
        raise MissingToolError(
            "this kernel has no dm-verity (device-mapper verity target)",
            "load the dm_verity module",
        )
    if not _has_overlay():
        raise MissingToolError("this kernel has no overlayfs", "load the overlay module")


def _has_verity() -> bool:
    return Path("/sys/module/dm_verity").exists()


def _has_dm_crypt() -> bool:
    if not Path("/dev/mapper/control").exists():
        return False
    return Path("/sys/module/dm_crypt").exists()


def _has_overlay() -> bool:
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())
