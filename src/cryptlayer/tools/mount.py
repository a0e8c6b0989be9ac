"""mount(8) for ext4 layers, the scratch volume and the overlay root file system; unmounting
by the umount2 system call, which is all umount(8) does for them, without a program start (a few
tenths of a second each under emulation, four per container)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import BusyError, CryptlayerError
from ..runner import run

UMOUNT_NOFOLLOW = 8  # a mount point that is (now) a symbolic link is not followed

# Layers and the scratch volume: no device node or set-uid file on them works through these
# mounts (the overlay root is mounted nodev; the container has no_new_privs for set-uid).
LAYER_OPTIONS = ["ro", "noatime", "noload", "nodev", "nosuid"]
SCRATCH_OPTIONS = ["noatime", "noinit_itable", "nodev", "nosuid"]


@dataclass(frozen=True)
class Mounted:
    """One line of /proc/self/mountinfo."""

    target: Path
    fstype: str
    device: str  # MAJ:MIN of the file system's device (0:N for ones without a block device)


def mount(source: str, target: Path, fstype: str, options: list[str]) -> None:
    """Mount `source` on `target`."""
    run(["mount", "-t", fstype, "-o", ",".join(options), source, str(target)])


class MountBusy(BusyError):
    """A file system still in use: a process has a file or its working directory there."""


@cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def umount(target: Path) -> None:
    """Unmount `target`; MountBusy while something uses it."""
    import ctypes

    if _libc().umount2(os.fsencode(target), UMOUNT_NOFOLLOW) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EBUSY:
        raise MountBusy(f"{target} is busy")
    raise CryptlayerError(f"cannot unmount {target}: {os.strerror(code)}")


def mounts() -> list[Mounted]:
    """Every mount on this host, in mount order, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
            fields = line.split()
            target = Path(fields[4].encode().decode("unicode_escape"))  # spaces come as \\040
            fstype = fields[fields.index("-") + 1]
            found.append(Mounted(target, fstype, fields[2]))
    return found


def mounted_paths() -> set[Path]:
    """Every mount point on this host."""
    return {m.target for m in mounts()}


def containing(path: Path) -> Mounted:
    """The mount that `path` lives on (the last one mounted on it or on its nearest parent)."""
    path = path.resolve()
    best = None
    for m in mounts():
        if (m.target == path or m.target in path.parents) and (
            best is None or len(m.target.parts) >= len(best.target.parts)
        ):
            best = m
    assert best is not None, "/ is always mounted"
    return best
