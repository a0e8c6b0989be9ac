"""device-mapper's own interface (/dev/mapper/control): a mapping's status, and its removal,
without a process.

Status is dm-verity's verdict on a layer (`V` verified so far, `C` a block failed its check),
read at every stop: an ioctl costs microseconds where `veritysetup status` costs a program start
(about half a second under emulation). Removal is what `cryptsetup close` and `dmsetup remove`
do in the end (DM_DEV_REMOVE; the kernel wipes a dm-crypt key as it destroys the table), without
what `cryptsetup close` does first: read the header of the device below. Below a layer's LUKS
mapping is its dm-verity mapping, whose header blocks fail verification once the image was
erased at start; that read, and the udev probe it sets off, made each stop wait 12-28 s for udev
under emulation. Structures from linux/dm-ioctl.h.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import BusyError, CryptlayerError

CONTROL = "/dev/mapper/control"
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags, event_nr,
# padding, dev, name[128], uuid[129], data[7]
HEADER = struct.Struct("=3IIIIiIII Q128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]
TARGET = struct.Struct("=QQiI16s")
VERSION = (4, 0, 0)
BUFFER = 16384


def _iowr(number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xFD << 8) | number


DM_DEV_REMOVE = _iowr(4, HEADER.size)
DM_TABLE_STATUS = _iowr(12, HEADER.size)


def _call(request: int, name: str) -> bytearray:
    """Issue one ioctl about mapping NAME; the buffer it filled in (OSError as the kernel said)."""
    buf = bytearray(BUFFER)
    HEADER.pack_into(buf, 0, *VERSION, BUFFER, HEADER.size, 0, 0, 0, 0, 0, 0,
                     name.encode(), b"", b"")  # fmt: skip
    fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, buf)
    finally:
        os.close(fd)
    return buf


def remove(name: str) -> None:
    """Remove mapping NAME (gone already is no error); BusyError while something holds it."""
    try:
        _call(DM_DEV_REMOVE, name)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return
        if err.errno == errno.EBUSY:
            raise BusyError(
                f"mapping {name} is still in use",
                "stop what holds it (a mount, a mapping above it, a process) and try again",
            ) from err
        raise CryptlayerError(f"could not remove mapping {name}: {err.strerror}") from err


def status(name: str) -> list[tuple[str, str]]:
    """(target type, status line) of each target of mapping NAME; [] if there is no such one."""
    try:
        buf = _call(DM_TABLE_STATUS, name)
    except OSError:  # ENXIO: no such mapping
        return []
    fields = HEADER.unpack_from(buf, 0)
    data_start, count = fields[4], fields[5]
    out = []
    at = data_start
    for _ in range(count):
        _start, _length, _status, following, kind = TARGET.unpack_from(buf, at)
        text = buf[at + TARGET.size : fields[3]].split(b"\0", 1)[0]
        out.append((kind.split(b"\0", 1)[0].decode(), text.decode("ascii", "replace")))
        if not following:
            break
        at = data_start + following
    return out
