"""The kernel's NBD devices (/dev/nbdN), attached to a connected socket through the nbd driver's
generic-netlink family (include/uapi/linux/nbd-netlink.h), as nbd-client's netlink mode does:
no nbd-client, no port, no handshake on the socket (the size and flags come from netlink). The
other end of the socket is served by a process of ours (distribution/lazy.py, docs/lazy.md).

Messages are built with `struct` over an AF_NETLINK/NETLINK_GENERIC socket: nlmsghdr, genlmsghdr,
then attributes (nla_len, nla_type, the value padded to 4 bytes).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptlayer.errors import CryptlayerError, MissingToolError

NETLINK_GENERIC = 16
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 1 << 15
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2

FAMILY = "nbd"  # NBD_GENL_FAMILY_NAME
VERSION = 1  # NBD_GENL_VERSION
CMD_CONNECT, CMD_DISCONNECT = 1, 2
ATTR_INDEX, ATTR_SIZE_BYTES, ATTR_BLOCK_SIZE_BYTES, ATTR_TIMEOUT = 1, 2, 3, 4
ATTR_SERVER_FLAGS, ATTR_CLIENT_FLAGS, ATTR_SOCKETS = 5, 6, 7
ATTR_BACKEND_IDENTIFIER = 10
SOCK_ITEM, SOCK_FD = 1, 1
FLAG_HAS_FLAGS, FLAG_READ_ONLY = 1 << 0, 1 << 1  # nbd.h's NBD_FLAG_*
BLOCK = 4096  # the verity and LUKS2 sector size
# Seconds a request may take before the kernel gives up on the connection: 0, never. With a
# timeout the kernel marks the only socket dead when one request outlives it, and then fails
# every later read: the device is EIO for good, the registry back or not. A request can take
# longer than one read's ATTEMPTS x ATTEMPT_DEADLINE (31.5 s) while the registry stalls: queued
# behind the server's 4 reads at once, or spanning two chunks. With 0 the kernel warns and waits;
# the server answers every request (EIO at worst) and a detach or the server's exit ends them.
TIMEOUT = 0

NLMSGHDR = struct.Struct("=IHHII")
GENLMSGHDR = struct.Struct("=BBH")
NLATTR = struct.Struct("=HH")


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute: header, value, padding to 4 bytes."""
    length = NLATTR.size + len(value)
    return NLATTR.pack(length, kind) + value + bytes(-length % 4)


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=Q", value))


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def message(family: int, command: int, seq: int, *attrs: bytes) -> bytes:
    """A generic-netlink request asking for an acknowledgement."""
    body = GENLMSGHDR.pack(command, VERSION, 0) + b"".join(attrs)
    flags = NLM_F_REQUEST | NLM_F_ACK
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), family, flags, seq, 0) + body


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """The attributes in `data` by type (the nested flag cleared); a short one ends the list."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            break
        found[kind & ~NLA_F_NESTED] = data[offset + NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def connect_request(family: int, seq: int, fd: int, size: int, identifier: str,
                    timeout: int = TIMEOUT) -> bytes:  # fmt: skip
    """NBD_CMD_CONNECT: socket `fd` as a read-only device of `size` bytes, any free index."""
    return message(
        family, CMD_CONNECT, seq,
        u64(ATTR_SIZE_BYTES, size),
        u64(ATTR_BLOCK_SIZE_BYTES, BLOCK),
        u64(ATTR_TIMEOUT, timeout),
        u64(ATTR_SERVER_FLAGS, FLAG_HAS_FLAGS | FLAG_READ_ONLY),
        attr(ATTR_BACKEND_IDENTIFIER, identifier.encode() + b"\0"),
        nested(ATTR_SOCKETS, nested(SOCK_ITEM, u32(SOCK_FD, fd))),
    )  # fmt: skip


def disconnect_request(family: int, seq: int, index: int) -> bytes:
    return message(family, CMD_DISCONNECT, seq, u32(ATTR_INDEX, index))


@dataclass
class Reply:
    """What the kernel answered a request: its attributes (a new message), or an error."""

    error: int = 0
    attrs: dict[int, bytes] | None = None


def parse_replies(data: bytes, seq: int) -> list[Reply]:
    """The messages answering request `seq` in one datagram."""
    replies = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, got, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        body = data[offset + NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if got != seq:
            continue
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", body)
            replies.append(Reply(error=-code))
        elif kind != NLMSG_DONE:
            replies.append(Reply(attrs=parse_attrs(body[GENLMSGHDR.size :])))
    return replies


class _Netlink:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_GENERIC)  # fmt: skip
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def ask(self, request: bytes) -> dict[int, bytes]:
        """Send one request (its seq is self.seq); the attributes of the answer, or OSError."""
        self.sock.send(request)
        answer: dict[int, bytes] = {}
        while True:
            for reply in parse_replies(self.sock.recv(65536), self.seq):
                if reply.attrs is not None:
                    answer.update(reply.attrs)
                    continue
                if reply.error:
                    raise OSError(reply.error, os.strerror(reply.error))
                return answer  # the acknowledgement comes last

    def family(self) -> int:
        self.seq += 1
        name = attr(CTRL_ATTR_FAMILY_NAME, FAMILY.encode() + b"\0")
        got = self.ask(message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, self.seq, name))
        if CTRL_ATTR_FAMILY_ID not in got:
            raise OSError(errno.ENOENT, "no family id in the answer")
        (family,) = struct.unpack_from("=H", got[CTRL_ATTR_FAMILY_ID])
        return int(family)


def _family(link: _Netlink) -> int:
    try:
        return link.family()
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise
    from cryptlayer.tools import modprobe  # (runs a program: only an attach needs it)

    if modprobe.available():
        modprobe.load("nbd")
    try:
        return link.family()
    except OSError as err:
        raise MissingToolError(
            "this kernel has no NBD driver (the nbd module), which lazy start needs",
            "load the nbd module, or pull the image first (cryptlayer pull) and run the copy",
        ) from err


def connect(fd: int, size: int, identifier: str, timeout: int = TIMEOUT) -> int:
    """Attach connected stream socket `fd` (served without a handshake) as a read-only device of
    `size` bytes; returns its index N (/dev/nbdN). `identifier` is what
    /sys/block/nbdN/backend shows: how gc finds the device."""
    link = _Netlink()
    try:
        family = _family(link)
        link.seq += 1
        try:
            got = link.ask(connect_request(family, link.seq, fd, size, identifier, timeout))
        except OSError as err:
            raise CryptlayerError(f"cannot attach an NBD device for {identifier}: {err.strerror}",
                                  "see dmesg") from None  # fmt: skip
    finally:
        link.close()
    if ATTR_INDEX not in got:
        raise CryptlayerError(f"the kernel named no NBD device for {identifier}")
    return int(struct.unpack_from("=I", got[ATTR_INDEX])[0])


def device(index: int) -> str:
    return f"/dev/nbd{index}"


def connected(index: int) -> bool:
    """Whether /dev/nbdN is attached (its sysfs `pid` file exists while it is)."""
    return Path(f"/sys/block/nbd{index}/pid").exists()


def backend(index: int) -> str:
    """The backend identifier nbdN was attached with ("" if none, or not attached)."""
    try:
        return Path(f"/sys/block/nbd{index}/backend").read_text().strip()
    except OSError:
        return ""


def attached() -> dict[int, str]:
    """Every attached NBD device's index and backend identifier."""
    found = {}
    for entry in Path("/sys/block").glob("nbd*"):
        index = entry.name.removeprefix("nbd")
        if index.isdigit() and connected(int(index)):
            found[int(index)] = backend(int(index))
    return found


def disconnect(index: int) -> None:
    """Detach /dev/nbdN (NBD_CMD_DISCONNECT); one not attached is no error."""
    if not connected(index):
        return
    link = _Netlink()
    try:
        family = _family(link)
        link.seq += 1
        try:
            link.ask(disconnect_request(family, link.seq, index))
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                raise CryptlayerError(f"cannot detach {device(index)}: {err.strerror}") from None
    finally:
        link.close()
