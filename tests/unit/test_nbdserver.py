"""The NBD server (distribution/nbdserver.py) answered by a small NBD client written here from
the protocol (github.com/NetworkBlockDevice/nbd, doc/proto.md), over a socketpair as the
kernel's driver would hold it: fixed newstyle handshake, NBD_OPT_GO and NBD_OPT_EXPORT_NAME,
reads at odd offsets (several in flight), refusals, disconnect. Then the whole chain: NBD over
the block cache over ranged reads of a registry."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from registryfixtures import hostile, reply

from cryptlayer.distribution import nbdserver
from cryptlayer.distribution.blobrange import BlobRanges
from cryptlayer.distribution.blockcache import CHUNK, BlockCache, CachedBlob
from cryptlayer.distribution.registry import Registry, parse_reference

DATA = os.urandom(2 * CHUNK + 4321)
NAME = "sha256:" + hashlib.sha256(DATA).hexdigest()

# The protocol's numbers, written out again from the spec (not imported: a typo in the
# server's must not pass because the test shares it).
NBDMAGIC, IHAVEOPT, OPT_REPLY = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST, SIMPLE_REPLY = 0x25609513, 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 7, 8
REP_ACK, REP_SERVER, REP_INFO, REP_ERR_UNSUP, REP_ERR_UNKNOWN = 1, 2, 3, 2**31 + 1, 2**31 + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_TRIM = 0, 1, 2, 4
HAS_FLAGS, READ_ONLY = 1, 2


class Export:
    def __init__(self, data: bytes = DATA) -> None:
        self.data, self.size = data, len(data)
        self.fail_at: int | None = None

    def pread(self, offset: int, length: int) -> bytes:
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise OSError("registry down")
        return self.data[offset : offset + length]


class Client:
    """The client side of the protocol, as nbd-client and the kernel speak it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def greet(self, flags: int = 0b11) -> int:
        magic, opt, handshake = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        assert handshake & 1  # NBD_FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", flags))
        return int(handshake)

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def option_reply(self, option: int) -> tuple[int, bytes]:
        magic, echoed, kind, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY and echoed == option
        return kind, self.recv(length)

    def go(self, name: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> dict[int, bytes]:
        encoded = name.encode()
        data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", len(infos))
        self.option(OPT_GO, data + b"".join(struct.pack(">H", i) for i in infos))
        got: dict[int, bytes] = {}
        while True:
            kind, payload = self.option_reply(OPT_GO)
            if kind != REP_INFO:
                got[-1] = struct.pack(">I", kind)
                return got
            got[struct.unpack(">H", payload[:2])[0]] = payload[2:]

    def request(self, kind: int, cookie: int, offset: int, length: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST, 0, kind, cookie, offset, length) + data)

    def simple_reply(self, lengths: dict[int, int]) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY
        return cookie, error, self.recv(lengths.get(cookie, 0)) if error == 0 else b""


@contextmanager
def served(export: Any, name: str = NAME,
           handshake: bool = True) -> Iterator[tuple[Client, threading.Thread]]:  # fmt: skip
    ours, theirs = socket.socketpair()
    server = threading.Thread(target=nbdserver.serve, args=(theirs, export, name),
                              kwargs={"handshake": handshake}, daemon=True)  # fmt: skip
    server.start()
    try:
        yield Client(ours), server
    finally:
        ours.close()
        server.join(timeout=30)


def test_handshake_reads_at_odd_offsets_and_disconnect() -> None:
    with served(Export()) as (client, server):
        client.greet()
        info = client.go(NAME)
        assert struct.unpack(">I", info.pop(-1))[0] == REP_ACK
        size, flags = struct.unpack(">QH", info[INFO_EXPORT])
        assert size == len(DATA) and flags & HAS_FLAGS and flags & READ_ONLY
        minimum, preferred, maximum = struct.unpack(">III", info[INFO_BLOCK_SIZE])
        assert minimum == 1 and preferred == 4096 and maximum >= 1 << 25
        reads = {1: (1, 4097), 2: (CHUNK - 3, 7), 3: (len(DATA) - 1, 1), 4: (12345, 2 * CHUNK - 9999),
                 5: (0, len(DATA))}  # fmt: skip
        for cookie, (offset, length) in reads.items():  # all in flight at once
            client.request(CMD_READ, cookie, offset, length)
        lengths = {cookie: length for cookie, (_, length) in reads.items()}
        for _ in reads:
            cookie, error, data = client.simple_reply(lengths)
            offset, length = reads[cookie]
            assert error == 0 and data == DATA[offset : offset + length], cookie
        client.request(CMD_DISC, 99, 0, 0)
        server.join(timeout=30)
        assert not server.is_alive()
        assert client.sock.recv(1) == b""  # closed, no reply to DISC


def test_export_name_with_and_without_zeroes() -> None:
    for flags, padding in ((0b11, 0), (0b01, 124)):
        with served(Export()) as (client, _):
            client.greet(flags)
            client.option(OPT_EXPORT_NAME, NAME.encode())
            size, transmission = struct.unpack(">QH", client.recv(10))
            assert size == len(DATA) and transmission & READ_ONLY
            assert client.recv(padding) == bytes(padding)
            client.request(CMD_READ, 7, 3, 5)
            assert client.simple_reply({7: 5}) == (7, 0, DATA[3:8])


def test_without_handshake_as_the_kernel_holds_a_socket_given_by_netlink() -> None:
    with served(Export(), handshake=False) as (client, server):
        client.request(CMD_READ, 1, 5, 3)
        client.request(CMD_READ, 2, len(DATA) - 2, 2)
        got = dict(client.simple_reply({1: 3, 2: 2})[::2] for _ in range(2))
        assert got == {1: DATA[5:8], 2: DATA[-2:]}
        client.request(CMD_DISC, 3, 0, 0)
        server.join(timeout=30)
        assert not server.is_alive()


def test_options_the_server_does_not_know_or_exports_it_does_not_have() -> None:
    with served(Export()) as (client, _):
        client.greet()
        client.option(OPT_STRUCTURED_REPLY)
        assert client.option_reply(OPT_STRUCTURED_REPLY)[0] == REP_ERR_UNSUP
        client.option(OPT_LIST)
        kind, payload = client.option_reply(OPT_LIST)
        assert kind == REP_SERVER and payload[4:] == NAME.encode()
        assert client.option_reply(OPT_LIST)[0] == REP_ACK
        assert struct.unpack(">I", client.go("sha256:other")[-1])[0] == REP_ERR_UNKNOWN
        assert struct.unpack(">I", client.go("")[-1])[0] == REP_ACK  # the default export
        client.request(CMD_READ, 1, 0, 3)
        assert client.simple_reply({1: 3}) == (1, 0, DATA[:3])


def test_writes_reads_past_the_end_and_failed_reads_are_errors() -> None:
    export = Export()
    with served(export) as (client, _):
        client.greet()
        client.go(NAME)
        client.request(CMD_WRITE, 1, 0, 4, b"evil")
        assert client.simple_reply({}) == (1, 1, b"")  # EPERM
        client.request(CMD_TRIM, 2, 0, 4096)
        assert client.simple_reply({}) == (2, 1, b"")
        client.request(CMD_READ, 3, len(DATA) - 1, 2)
        assert client.simple_reply({}) == (3, 22, b"")  # EINVAL
        export.fail_at = 100
        client.request(CMD_READ, 4, 0, 4096)
        assert client.simple_reply({}) == (4, 5, b"")  # EIO, and the connection stays
        client.request(CMD_READ, 5, 4096, 10)
        assert client.simple_reply({5: 10}) == (5, 0, DATA[4096:4106])
        assert export.data[:4] != b"evil"


@pytest.mark.parametrize("bad", ["client flags", "option magic", "request magic", "abort"])
def test_a_client_that_breaks_the_protocol_is_dropped(bad: str) -> None:
    with served(Export()) as (client, server):
        client.greet(0b100 if bad == "client flags" else 0b11)
        if bad == "option magic":
            client.sock.sendall(struct.pack(">QII", 0x1234, OPT_GO, 0))
        elif bad == "abort":
            client.option(OPT_ABORT)
            assert client.option_reply(OPT_ABORT)[0] == REP_ACK
        elif bad == "request magic":
            client.go(NAME)
            client.sock.sendall(struct.pack(">IHHQQI", 0xDEAD, 0, CMD_READ, 1, 0, 10))
        server.join(timeout=30)
        assert not server.is_alive()
        assert client.sock.recv(1) == b""


def test_a_unix_socket_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    stop = threading.Event()
    listener = threading.Thread(target=nbdserver.serve_unix, args=(path, Export(), NAME, stop))
    listener.start()
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            stop.wait(0.05)
        assert os.stat(path).st_mode & 0o077 == 0
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            client = Client(sock)
            client.greet()
            client.go(NAME)
            client.request(CMD_READ, 1, 99, 9)
            assert client.simple_reply({1: 9}) == (1, 0, DATA[99:108])
            client.request(CMD_DISC, 2, 0, 0)
    finally:
        stop.set()
        listener.join(timeout=30)


def test_nbd_over_the_cache_over_a_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain a lazy layer reads through: the kernel's requests (here the test's client)
    become closed ranges to the registry, chunk by chunk, and a second server on the same cache
    sends none."""
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ranges: list[str] = []

    def handle(request: Any) -> None:
        ranges.append(request.headers.get("Range", ""))
        a, _, b = request.headers["Range"].removeprefix("bytes=").partition("-")
        reply(request, 206, DATA[int(a) : int(b) + 1],
              {"Content-Range": f"bytes {a}-{b}/{len(DATA)}"})  # fmt: skip

    with hostile(handle) as server:
        registry = Registry(parse_reference(f"docker://{server.host}/lazy/app:v1"),
                            tls_verify=False)  # fmt: skip
        registry.conn.scheme = "http"
        for start in range(2):
            blob = CachedBlob(BlockCache(tmp_path / "cache", 64 * CHUNK),
                              BlobRanges(registry, NAME, len(DATA)))  # fmt: skip
            with served(blob) as (client, _):
                client.greet()
                client.go(NAME)
                client.request(CMD_READ, 1, CHUNK + 17, 100)
                assert client.simple_reply({1: 100}) == (1, 0, DATA[CHUNK + 17 : CHUNK + 117])
                client.request(CMD_DISC, 2, 0, 0)
            blob.close()
            assert ranges == [f"bytes={CHUNK}-{2 * CHUNK - 1}"], start
