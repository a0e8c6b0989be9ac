"""Loop devices over image and scratch files.

Attached from an open descriptor through the kernel's loop ioctls (LOOP_CONFIGURE), not by
`losetup FILE`: losetup(8) canonicalizes the path it is given and opens it again by name, so a
file swapped in between would be attached instead of the one that was checked. The kernel keeps
its own reference to the descriptor's file. Detached the same way (LOOP_CLR_FD), which is all
`losetup --detach` does, without a program start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from cryptlayer.errors import CryptlayerError
from cryptlayer.fsutil import FileId
from cryptlayer.tools import udev

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_READ_ONLY = 1
# struct loop_info64: 5 x u64, 4 x u32, name[64], crypt_name[64], key[32], init[2] x u64
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")
# struct loop_config: u32 fd, u32 block_size, loop_info64, u64 reserved[8]
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s64x")
ATTEMPTS = 20  # another process may take the free device between asking and configuring


def attach_fd(fd: int, *, readonly: bool, name: str) -> str:
    """Attach the file open at `fd` to a free loop device; returns the device node. `name` is
    what `losetup --list` shows as its file (the kernel tracks the file itself)."""
    flags = LO_FLAGS_READ_ONLY if readonly else 0
    label = name.encode(errors="replace")[:63]
    info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, label, b"", b"", 0, 0)
    config = LOOP_CONFIG.pack(fd, 0, info)
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(ATTEMPTS):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            loop = os.open(device, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
            try:
                fcntl.ioctl(loop, LOOP_CONFIGURE, config)
            except OSError as err:
                if err.errno == errno.EBUSY:
                    continue  # taken meanwhile: ask for another
                raise CryptlayerError(
                    f"cannot attach a loop device to {name}: {err.strerror}"
                ) from err
            finally:
                os.close(loop)
            udev.wait_for_node(device)
            return device
    finally:
        os.close(control)
    raise CryptlayerError(f"no free loop device for {name}", "detach unused ones (losetup -D)")


def attach(path: Path, *, readonly: bool) -> str:
    """Attach `path` (a file of ours, never a symlink) to a free loop device."""
    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return attach_fd(fd, readonly=readonly, name=str(path))
    finally:
        os.close(fd)


def backing_identity(device: str) -> FileId | None:
    """The file behind loop `device`; None if it has none (or is gone)."""
    try:
        loop = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = fcntl.ioctl(loop, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError:
        return None  # ENXIO: nothing attached
    finally:
        os.close(loop)
    fields = LOOP_INFO64.unpack(raw)
    return FileId(fields[0], fields[1])


def detach(device: str) -> None:
    """Detach loop `device` (LOOP_CLR_FD, as `losetup --detach` does; one still held open, by a
    mapping on it say, is detached by the kernel when the last holder lets go). Nothing attached
    is no error."""
    try:
        loop = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(loop, LOOP_CLR_FD)
    except OSError as err:
        if err.errno != errno.ENXIO:
            raise CryptlayerError(f"cannot detach loop device {device}: {err.strerror}") from err
    finally:
        os.close(loop)
