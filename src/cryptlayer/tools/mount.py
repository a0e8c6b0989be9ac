"""Mounting ext4 layers, the scratch volume and the overlay root file system, and unmounting
them, by the mount(2) and umount2(2) system calls: all mount(8) and umount(8) do for these,
without a program start (a container has one mount per layer, its scratch volume and the
overlay).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from cryptlayer.errors import BusyError, CryptlayerError
from cryptlayer.fsutil import libc

UMOUNT_NOFOLLOW = 8  # a mount point that is (now) a symbolic link is not followed
# mount(8)'s generic options as mount(2) flags (<sys/mount.h>); any other option is the file
# system's own and goes to it in the data string, as mount(8) passes it.
FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024}
DATA_LIMIT = 4096  # the kernel copies one page of data string (overlayfs: its lowerdir list)

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


class MountError(CryptlayerError):
    """The kernel refused a mount (its errno: EIO, EUCLEAN, EINVAL, ...)."""


def mount(
    source: str, target: Path, fstype: str, options: list[str], *, cwd: Path | None = None
) -> None:
    """Mount `source` (a device, or a name for a file system without one) on `target`, as
    `mount -t FSTYPE -o OPTIONS SOURCE TARGET` would; MountError naming the kernel's reason.

    With `cwd`, relative paths in the options (overlayfs's lowerdir list) are taken from there:
    the kernel copies one page of options, and only short names let 128 layers fit. The working
    directory is the process's, so this is for callers with no other thread of theirs running.
    """
    import ctypes

    flags = 0
    data = []
    for option in options:
        if option in FLAGS:
            flags |= FLAGS[option]
        else:
            data.append(option)
    text = os.fsencode(",".join(data))
    if len(text) >= DATA_LIMIT:
        raise MountError(
            f"cannot mount {target}: its {fstype} options are {len(text)} bytes, the kernel"
            f" takes {DATA_LIMIT - 1}",
            "use an image with fewer layers",
        )
    saved = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if cwd else -1
    try:
        if cwd:
            os.chdir(cwd)
        done = libc().mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                             text or None)  # fmt: skip
        code = ctypes.get_errno()
    finally:
        if saved >= 0:
            os.fchdir(saved)
            os.close(saved)
    if done != 0:
        raise MountError(f"cannot mount {source} on {target} ({fstype}): {os.strerror(code)}")


class MountBusy(BusyError):
    """A file system still in use: a process has a file or its working directory there."""


def umount(target: Path) -> None:
    """Unmount `target`; MountBusy while something uses it."""
    import ctypes

    if libc().umount2(os.fsencode(target), UMOUNT_NOFOLLOW) == 0:
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
