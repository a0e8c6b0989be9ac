"""A minimal NBD server (the protocol: github.com/NetworkBlockDevice/nbd, doc/proto.md): fixed
newstyle handshake, NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_EXPORT_NAME (and LIST, ABORT), then
NBD_CMD_READ and NBD_CMD_DISC on a read-only export; every write-like command is refused
(EPERM). It speaks on one connected stream socket: a Unix socket's, or one end of a socketpair
whose other end the kernel's nbd driver takes (nbd-client, or the netlink interface), so no
port is ever open. What it serves is a blob read through the node's cache (blockcache); it
checks nothing of the content: dm-verity above the device does (docs/lazy.md)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
FLAG_HAS_FLAGS = 1 << 0  # transmission flags
FLAG_READ_ONLY = 1 << 1
FLAG_CAN_MULTI_CONN = 1 << 8  # reads only, one cache: any connection sees the same bytes

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = (
    (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3, (1 << 31) + 6)  # fmt: skip
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
EPERM, EIO, EINVAL = 1, 5, 22

MAX_OPTION = 4096 + 64  # an option's data: an export name (at most 4096 bytes) and a little
MAX_OPTIONS = 64  # a client that haggles longer is not the kernel's
MAX_PAYLOAD = 32 << 20  # the spec's default maximum payload (2^25)
PREFERRED_BLOCK = 4096  # the verity and LUKS2 sector size
WORKERS = 4  # reads served at once on one connection (the kernel sends several)


class Export(Protocol):
    """What is served: blockcache.CachedBlob, or a test's."""

    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


class _Closed(Exception):
    """The client went away, or broke the protocol: the connection ends."""


@dataclass
class _Conn:
    sock: socket.socket
    send_lock: threading.Lock

    def recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except OSError:
                chunk = b""
            if not chunk:
                raise _Closed
            data += chunk
        return bytes(data)

    def send(self, *parts: bytes) -> None:
        with self.send_lock:
            try:
                for part in parts:
                    self.sock.sendall(part)
            except OSError:
                raise _Closed from None


def serve(sock: socket.socket, export: Export, name: str = "",
          log: Callable[[str], None] | None = None, *, handshake: bool = True) -> None:  # fmt: skip
    """Serve `export` under `name` (the default export, "", too) on the connected `sock` until
    the client disconnects; `sock` is closed then. `log` hears of reads that failed. Without
    `handshake`, transmission from the first byte: a socket handed to the kernel through nbd's
    netlink interface (NBD_CMD_CONNECT), which takes the size and flags from netlink and sends
    requests at once, as a socket is after nbd-client's handshake and NBD_SET_SOCK."""
    conn = _Conn(sock, threading.Lock())
    try:
        if not handshake or _handshake(conn, export, name):
            _transmission(conn, export, log or (lambda _: None))
    except _Closed:
        pass
    finally:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _handshake(conn: _Conn, export: Export, name: str) -> bool:
    """The fixed newstyle handshake; True when transmission begins."""
    conn.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (client_flags,) = struct.unpack(">I", conn.recv(4))
    if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        return False  # the spec: drop a client that sets a flag we did not offer
    no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
    flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN
    for _ in range(MAX_OPTIONS):
        magic, option, length = struct.unpack(">QII", conn.recv(16))
        if magic != IHAVEOPT or length > MAX_OPTION:
            return False
        data = conn.recv(length)

        def reply(kind: int, payload: bytes = b"", option: int = option) -> None:
            conn.send(struct.pack(">QIII", REPLY_MAGIC, option, kind, len(payload)), payload)

        if option == OPT_EXPORT_NAME:
            if data.decode("utf-8", "replace") not in ("", name):
                return False  # no way to say why: the spec has the server end the session
            conn.send(struct.pack(">QH", export.size, flags), b"" if no_zeroes else bytes(124))
            return True
        if option == OPT_ABORT:
            reply(REP_ACK)
            return False
        if option == OPT_LIST:
            if data:
                reply(REP_ERR_INVALID)
                continue
            encoded = name.encode()
            reply(REP_SERVER, struct.pack(">I", len(encoded)) + encoded)
            reply(REP_ACK)
            continue
        if option in (OPT_INFO, OPT_GO):
            asked = _info_request(data)
            if asked is None:
                reply(REP_ERR_INVALID)
                continue
            wanted, infos = asked
            if wanted not in ("", name):
                reply(REP_ERR_UNKNOWN)
                continue
            reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, export.size, flags))
            if INFO_BLOCK_SIZE in infos:
                reply(REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK,
                                            MAX_PAYLOAD))  # fmt: skip
            reply(REP_ACK)
            if option == OPT_GO:
                return True
            continue
        reply(REP_ERR_UNSUP)  # STARTTLS (a socket on this node only), structured replies, ...
    return False


def _info_request(data: bytes) -> tuple[str, set[int]] | None:
    """NBD_OPT_INFO/GO's data: the export name and the information asked for; None if
    malformed."""
    if len(data) < 6:
        return None
    (length,) = struct.unpack(">I", data[:4])
    if length > len(data) - 6:
        return None
    try:
        wanted = data[4 : 4 + length].decode()
    except UnicodeDecodeError:
        return None
    rest = data[4 + length :]
    (count,) = struct.unpack(">H", rest[:2])
    if len(rest) != 2 + 2 * count:
        return None
    return wanted, set(struct.unpack(f">{count}H", rest[2:]))


def _transmission(conn: _Conn, export: Export, log: Callable[[str], None]) -> None:
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="nbd-read")
    try:
        _requests(conn, export, log, pool)
    except _Closed:
        # The client is gone (the kernel let go: a detach, its timeout): nobody takes the
        # answers of the reads still queued, each of which may wait on a registry that is down
        # for ATTEMPTS x ATTEMPT_DEADLINE. Dropped; the reads running end as they end.
        pool.shutdown(wait=False, cancel_futures=True)
        log("the client closed the connection; reads not yet started are dropped")
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)  # NBD_CMD_DISC: the reads in flight are answered first


def _requests(conn: _Conn, export: Export, log: Callable[[str], None],
              pool: ThreadPoolExecutor) -> None:  # fmt: skip
    """Take requests until NBD_CMD_DISC (returns) or the client goes (_Closed)."""
    while True:
        magic, _flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", conn.recv(28))
        if magic != REQUEST_MAGIC:
            raise _Closed
        if kind == CMD_DISC:
            return
        if kind == CMD_READ:
            if length > MAX_PAYLOAD or offset + length > export.size:
                _answer(conn, cookie, EINVAL)
            else:
                pool.submit(_read, conn, export, cookie, offset, length, log)
            continue
        if kind == CMD_WRITE:
            if length > MAX_PAYLOAD:
                raise _Closed
            conn.recv(length)  # its data follows the request; dropped
        _answer(conn, cookie, EPERM if kind in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
                else EINVAL)  # fmt: skip


def _read(conn: _Conn, export: Export, cookie: int, offset: int, length: int,
          log: Callable[[str], None]) -> None:  # fmt: skip
    try:
        data = export.pread(offset, length)
        if len(data) != length:
            raise OSError(f"{len(data)} bytes read of {length}")
    except Exception as err:  # the kernel gets EIO; the reason goes to the log
        log(f"read of {length} bytes at {offset} failed: {err}")
        _answer(conn, cookie, EIO)
        return
    with suppress(_Closed):
        _answer(conn, cookie, 0, data)


def _answer(conn: _Conn, cookie: int, error: int, data: bytes = b"") -> None:
    with suppress(_Closed):
        conn.send(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie), data)


def serve_unix(path: str, export: Export, name: str = "",
               stop: threading.Event | None = None) -> None:  # fmt: skip
    """Listen on Unix socket `path` (mode 0600) and serve each connection in its own thread,
    until `stop` is set."""
    import os

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(4)
    listener.settimeout(0.5)
    try:
        while stop is None or not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            threading.Thread(target=serve, args=(sock, export, name), daemon=True).start()
    finally:
        listener.close()
