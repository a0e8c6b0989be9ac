"""tools/nbd.py's generic-netlink messages, byte by byte (include/uapi/linux/nbd-netlink.h,
linux/netlink.h, linux/genetlink.h): what the kernel's nbd family is sent and how its answers
are read. The attach itself is the VM tier's (tests/vm/test_lazy.py)."""

from __future__ import annotations

import errno
import socket
import struct
from typing import cast

import pytest

from cryptlayer.tools import nbd


def test_an_attribute_is_length_type_value_padded_to_four() -> None:
    assert nbd.attr(10, b"abc") == struct.pack("=HH", 7, 10) + b"abc" + b"\0"
    assert nbd.attr(1, b"abcd") == struct.pack("=HH", 8, 1) + b"abcd"
    assert nbd.u32(1, 5) == struct.pack("=HHI", 8, 1, 5)
    assert nbd.u64(2, 1 << 40) == struct.pack("=HHQ", 12, 2, 1 << 40)
    assert nbd.nested(7, nbd.u32(1, 3))[:4] == struct.pack("=HH", 12, 7 | (1 << 15))


def test_connect_asks_for_a_read_only_device_of_the_size_over_the_socket() -> None:
    data = nbd.connect_request(family=33, seq=9, fd=12, size=5 << 20, identifier="cl:img:0")
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", data)
    assert (length, kind, seq, pid) == (len(data), 33, 9, 0)
    assert flags == 0x1 | 0x4  # NLM_F_REQUEST | NLM_F_ACK
    assert struct.unpack_from("=BBH", data, 16) == (1, 1, 0)  # NBD_CMD_CONNECT, version 1
    attrs = nbd.parse_attrs(data[20:])
    assert struct.unpack("=Q", attrs[2]) == (5 << 20,)  # NBD_ATTR_SIZE_BYTES
    assert struct.unpack("=Q", attrs[3]) == (4096,)  # NBD_ATTR_BLOCK_SIZE_BYTES
    assert struct.unpack("=Q", attrs[4]) == (0,)  # NBD_ATTR_TIMEOUT: none (tools/nbd.py)
    assert struct.unpack("=Q", attrs[5]) == (0b11,)  # HAS_FLAGS | READ_ONLY
    assert attrs[10] == b"cl:img:0\0"  # NBD_ATTR_BACKEND_IDENTIFIER, a C string
    assert 1 not in attrs  # no NBD_ATTR_INDEX: any free device
    sockets = nbd.parse_attrs(attrs[7])  # NBD_ATTR_SOCKETS > NBD_SOCK_ITEM > NBD_SOCK_FD
    assert set(sockets) == {1}
    assert nbd.parse_attrs(sockets[1]) == {1: struct.pack("=I", 12)}
    raw_sockets_type = data[20:].find(struct.pack("=H", 7 | (1 << 15)))
    assert raw_sockets_type > 0  # sent with NLA_F_NESTED, as the kernel's policy wants


def test_disconnect_names_the_device() -> None:
    data = nbd.disconnect_request(family=33, seq=2, index=4)
    assert struct.unpack_from("=BB", data, 16) == (2, 1)  # NBD_CMD_DISCONNECT
    assert nbd.parse_attrs(data[20:]) == {1: struct.pack("=I", 4)}


def test_the_family_is_asked_of_the_controller_by_name() -> None:
    data = nbd.message(nbd.GENL_ID_CTRL, nbd.CTRL_CMD_GETFAMILY, 1,
                       nbd.attr(nbd.CTRL_ATTR_FAMILY_NAME, b"nbd\0"))  # fmt: skip
    assert struct.unpack_from("=HH", data, 4)[0] == 0x10
    assert data[16] == 3
    assert nbd.parse_attrs(data[20:]) == {2: b"nbd\0"}


def _reply(kind: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body + bytes(-len(body) % 4)


def test_answers_are_read_for_their_request_only() -> None:
    index = _reply(40, 7, struct.pack("=BBH", 1, 1, 0) + nbd.u32(1, 3))
    other = _reply(40, 6, struct.pack("=BBH", 1, 1, 0) + nbd.u32(1, 9))
    ack = _reply(2, 7, struct.pack("=i", 0) + bytes(16))
    replies = nbd.parse_replies(other + index + ack, 7)
    assert [r.attrs for r in replies] == [{1: struct.pack("=I", 3)}, None]
    assert replies[1].error == 0


def test_an_error_answer_is_its_errno() -> None:
    refused = _reply(2, 3, struct.pack("=i", -errno.EBUSY) + bytes(16))
    assert [r.error for r in nbd.parse_replies(refused, 3)] == [errno.EBUSY]


def test_a_cut_short_answer_ends_the_list() -> None:
    whole = _reply(2, 3, struct.pack("=i", 0) + bytes(16))
    assert nbd.parse_replies(whole[:-4], 3) == []
    assert nbd.parse_attrs(struct.pack("=HH", 40, 1) + b"abcd") == {}


class _FakeSock:
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def recv(self, _n: int) -> bytes:
        return self.answer


def test_a_refused_request_raises_its_errno() -> None:
    fake = _FakeSock(_reply(2, 1, struct.pack("=i", -errno.EINVAL) + bytes(16)))
    link = nbd._Netlink.__new__(nbd._Netlink)
    link.sock, link.seq = cast(socket.socket, fake), 1
    with pytest.raises(OSError) as caught:
        link.ask(nbd.disconnect_request(33, 1, 0))
    assert caught.value.errno == errno.EINVAL
    assert len(fake.sent) == 1
