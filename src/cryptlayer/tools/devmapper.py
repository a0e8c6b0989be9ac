"""device-mapper's own interface (/dev/mapper/control): a mapping's creation, status and
removal, without a process.

- Creation makes a layer's dm-verity mapping (tools/veritysetup.py) without a veritysetup
  process.
- Status is dm-verity's verdict on a layer (`V` verified so far, `C` a block failed its check),
  read at every stop: an ioctl, where `veritysetup status` costs a program start.
- Removal is what `cryptsetup close` and `dmsetup remove` do in the end (DM_DEV_REMOVE; the
  kernel wipes a dm-crypt key as it destroys the table), without what `cryptsetup close` does
  first: read the header of the device below. Below a layer's LUKS mapping is its dm-verity
  mapping, whose header blocks fail verification once the image was erased at start; that
  read, and the udev probe it sets off, made each stop wait for udev (docs/benchmarks: "Programs
  replaced by system calls").

Structures from linux/dm-ioctl.h.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from cryptlayer.errors import BusyError, CryptlayerError

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


DM_DEV_CREATE = _iowr(3, HEADER.size)
DM_DEV_REMOVE = _iowr(4, HEADER.size)
DM_DEV_SUSPEND = _iowr(6, HEADER.size)  # with no flag: resume, making a loaded table live
DM_TABLE_LOAD = _iowr(9, HEADER.size)
DM_TABLE_STATUS = _iowr(12, HEADER.size)
DM_READONLY_FLAG = 1 << 0
SECTOR = 512  # the unit of a table's length


def _call(
    request: int, name: str, *, uuid: str = "", flags: int = 0, targets: int = 0,
    payload: bytes = b"",
) -> bytearray:  # fmt: skip
    """Issue one ioctl about mapping NAME; the buffer it filled in (OSError as the kernel said)."""
    buf = bytearray(BUFFER)
    HEADER.pack_into(buf, 0, *VERSION, BUFFER, HEADER.size, targets, 0, flags, 0, 0, 0,
                     name.encode(), uuid.encode(), b"")  # fmt: skip
    buf[HEADER.size : HEADER.size + len(payload)] = payload
    fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, buf)
    finally:
        os.close(fd)
    return buf


def create(name: str, uuid: str, target: str, sectors: int, params: str) -> None:
    """Create read-only mapping NAME of one `target` over `sectors` sectors, and make it live:
    DM_DEV_CREATE, DM_TABLE_LOAD, resume (what `dmsetup create --readonly` does). Removed
    again if a later step fails. The kernel sends udev the events it sends for any mapping."""
    spec = TARGET.pack(0, sectors, 0, 0, target.encode())
    text = params.encode() + b"\0"
    text += b"\0" * (-(TARGET.size + len(text)) % 8)  # the next spec would start 8-aligned
    try:
        _call(DM_DEV_CREATE, name, uuid=uuid)
    except OSError as err:
        if err.errno in (errno.EBUSY, errno.EEXIST):
            raise BusyError(f"mapping {name} exists already", "run `cryptlayer gc`") from err
        raise CryptlayerError(f"could not create mapping {name}: {err.strerror}") from err
    try:
        _call(DM_TABLE_LOAD, name, flags=DM_READONLY_FLAG, targets=1, payload=spec + text)
        _call(DM_DEV_SUSPEND, name)
    except OSError as err:
        remove(name)
        raise CryptlayerError(
            f"the kernel refused the {target} table of mapping {name}: {err.strerror}",
            "its log (dmesg) says why",
        ) from err
    except BaseException:
        remove(name)
        raise


# udev's probe of a new or changed device (blkid) holds it open for a moment: a mapping busy
# only for that is removed on a later try, as cryptsetup and dmsetup retry theirs.
RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5)  # 3 s in all


def remove(name: str) -> None:
    """Remove mapping NAME (gone already is no error); BusyError while something holds it."""
    for delay in (*RETRY_DELAYS, None):
        try:
            _call(DM_DEV_REMOVE, name)
            return
        except OSError as err:
            if err.errno == errno.ENXIO:
                return
            if err.errno != errno.EBUSY:
                raise CryptlayerError(f"could not remove mapping {name}: {err.strerror}") from err
            if delay is None:
                raise BusyError(
                    f"mapping {name} is still in use",
                    "stop what holds it (a mount, a mapping above it, a process) and try again",
                ) from err
            time.sleep(delay)


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
