"""Lazy start attacked where the kernel is needed (part 14's review; docs/lazy.md, "Attacks
checked"): a registry that stalls for longer than the kernel's NBD request timer must not kill
the device for good. Straight at tools/nbd.py and nbdserver.py, no registry: an export whose
first read waits as a stalled registry's does."""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cryptlayer.distribution import nbdserver
from cryptlayer.tools import nbd

SIZE = 64 << 20
FAR = 48 << 20  # a second read, far from the first: not in the page cache, a new request


class Stalled:
    """An export whose first read waits until `release` is set (a registry that stalls), then
    serves a pattern every read can be checked against."""

    size = SIZE

    def __init__(self) -> None:
        self.release = threading.Event()
        self.first = threading.Event()
        self.reads = 0
        self.lock = threading.Lock()

    def pread(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.reads += 1
            first = self.reads == 1
        if first:
            self.first.set()
            self.release.wait(300)
        return pattern(offset, length)


def pattern(offset: int, length: int) -> bytes:
    start = offset // 8
    words = b"".join((start + i).to_bytes(8, "little") for i in range(-(-length // 8) + 1))
    return words[offset % 8 : offset % 8 + length]


@contextmanager
def device(export: Stalled, timeout: int | None) -> Iterator[str]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = threading.Thread(target=nbdserver.serve, args=(theirs, export, ""),
                              kwargs={"handshake": False}, daemon=True)  # fmt: skip
    server.start()
    if timeout is None:  # as runtime/lazy.py attaches a layer
        index = nbd.connect(ours.fileno(), SIZE, "cryptlayer-test:stall")
    else:
        index = nbd.connect(ours.fileno(), SIZE, "cryptlayer-test:stall", timeout)
    ours.close()  # the kernel holds its own reference
    try:
        yield nbd.device(index)
    finally:
        export.release.set()
        nbd.disconnect(index)
        deadline = time.monotonic() + 30
        while nbd.connected(index) and time.monotonic() < deadline:
            time.sleep(0.1)
        server.join(30)


def read(path: str, offset: int, length: int = 4096) -> bytes:
    """One request of `length` bytes (O_DIRECT: no read-ahead, no page cache)."""
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], offset)
        return bytes(buf[:got])
    finally:
        os.close(fd)
        buf.close()


def stalled_read(path: str, export: Stalled, stall: float) -> tuple[bytes | None, int | None]:
    """Read block 0 while the export stalls for `stall` seconds: (data, errno)."""
    got: list[tuple[bytes | None, int | None]] = []

    def reader() -> None:
        try:
            got.append((read(path, 0), None))
        except OSError as err:
            got.append((None, err.errno))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert export.first.wait(60), "the first read never reached the server"
    time.sleep(stall)
    export.release.set()
    thread.join(120)
    assert got, "the stalled read never returned"
    return got[0]


def test_a_read_slower_than_the_kernel_s_timer_does_not_kill_the_device() -> None:
    """Fixed: layers were attached with a 60 s request timeout. With one socket, the kernel marks
    it dead when a request outlives that, and fails every later read: a registry that stalled
    for a minute (a read queued behind the server's 4 at once, each up to 31.5 s, or one that
    spans two chunks) left the container's layer EIO for good. Now no timeout (the server
    answers every request): a read that took 65 s is answered, and the device still reads."""
    export = Stalled()
    with device(export, None) as path:
        data, error = stalled_read(path, export, 65)
        assert error is None and data == pattern(0, 4096)
        assert read(path, FAR) == pattern(FAR, 4096)
        assert nbd.connected(int(path.removeprefix("/dev/nbd")))


def test_with_a_kernel_timeout_one_slow_read_kills_the_device() -> None:
    """Why: the kernel's behaviour the fix avoids, at a 5 s timeout instead of the old 60 s. A
    request that outlives it fails, and so does every read after it, though the server answers
    again at once."""
    export = Stalled()
    with device(export, 5) as path:
        data, error = stalled_read(path, export, 12)
        assert data is None and error is not None  # the slow one
        with pytest.raises(OSError):
            read(path, FAR)  # and one the server would answer at once
