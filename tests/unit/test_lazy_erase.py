"""Crypto-erase of a lazy start's image (docs/lazy.md, "Erase at start"): the node's copy of each
layer's LUKS header is the block cache's chunks holding it and the fetched copy in /run. A start
that erases drops those chunks (overwritten, then gone), fetches the header past the cache, and
its server never stores them again (a read of the file system's first blocks, in the same chunk,
or a read-ahead); a start with --keep caches them, so that the next start fetches nothing. The
NBD device and the container are the VM tier's (tests/vm/test_lazy.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
from clirunner import invoke
from luksfixtures import fake_image
from registryfixtures import RunningRegistry

from cryptlayer.distribution import blockcache, lazy, nbdserver
from cryptlayer.distribution.blockcache import CHUNK, BlockCache, CachedBlob, drop
from cryptlayer.image.manifest import load

DATA = os.urandom(5 * CHUNK + 777)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
HEADER = 2 * CHUNK + 4096  # a header spanning three chunks


class Counting:
    """A blob source that counts what it is asked for."""

    def __init__(self, data: bytes = DATA, digest: str = DIGEST) -> None:
        self.data, self.digest, self.size = data, digest, len(data)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


def _chunks(root: Path, digest: str = DIGEST) -> list[str]:
    where = root / "sha256" / digest.removeprefix("sha256:")
    return sorted(p.name for p in where.iterdir()) if where.is_dir() else []


def _filled(root: Path) -> BlockCache:
    cache = BlockCache(root, 64 * CHUNK)
    blob = CachedBlob(cache, Counting())
    assert blob.pread(0, len(DATA)) == DATA
    blob.close()
    assert _chunks(root) == [f"{i:08x}" for i in range(6)]
    return cache


def test_drop_removes_every_chunk_overlapping_the_range_and_overwrites_it(
    tmp_path: Path,
) -> None:
    cache = _filled(tmp_path / "c")
    used = cache.used
    # A reader that opened chunk 1 before the drop: its bytes are overwritten in place, not
    # only unlinked (the file system's free blocks would keep them otherwise).
    held = os.open(cache.path(DIGEST, 1), os.O_RDONLY)
    try:
        assert drop(cache, DIGEST, 0, HEADER) == 3
        assert os.pread(held, CHUNK, 0) == bytes(CHUNK)
    finally:
        os.close(held)
    assert _chunks(tmp_path / "c") == ["00000003", "00000004", "00000005"]
    assert cache.used == used - 3 * CHUNK
    assert drop(cache, DIGEST, 0, HEADER) == 0  # nothing left there: no error
    assert drop(cache, "sha256:" + "0" * 64, 0, HEADER) == 0  # a blob never cached
    # The range's ends: [CHUNK*4 - 1, CHUNK*4) overlaps chunk 3 only; an empty range nothing.
    assert drop(cache, DIGEST, 4 * CHUNK - 1, 4 * CHUNK) == 1
    assert drop(cache, DIGEST, 5 * CHUNK, 5 * CHUNK) == 0
    assert _chunks(tmp_path / "c") == ["00000004", "00000005"]


def test_a_reader_never_serves_a_chunk_dropped_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drop lands between a reader's open and its read (another process's erase while a
    server of a --keep start reads): the reader sees the chunk was unlinked and fetches it."""
    cache = _filled(tmp_path / "c")
    real = os.pread
    dropped: list[int] = []

    def pread_after_drop(fd: int, length: int, offset: int) -> bytes:
        if not dropped:
            dropped.append(drop(cache, DIGEST, 0, 1))
        return real(fd, length, offset)

    monkeypatch.setattr(blockcache.os, "pread", pread_after_drop)
    source = Counting()
    blob = CachedBlob(cache, source)
    assert blob.pread(10, 100) == DATA[10:110]
    blob.close()
    assert dropped == [1]
    assert source.reads == [(0, CHUNK)]  # fetched again, not the zeros


def test_drop_takes_a_dead_writers_temporary_chunk_and_leaves_a_live_ones(tmp_path: Path) -> None:
    cache = _filled(tmp_path / "c")
    where = cache.path(DIGEST, 0).parent
    dead = where / f"{blockcache.TEMP_PREFIX}00000000-999999999-1"  # no such process
    live = where / f"{blockcache.TEMP_PREFIX}00000001-{os.getpid()}-1"
    other = where / f"{blockcache.TEMP_PREFIX}00000004-999999999-1"  # outside the range
    cut = where / f"{blockcache.TEMP_PREFIX}drop-999999999-1"  # a drop killed halfway
    for path in (dead, live, other, cut):
        path.write_bytes(DATA[:CHUNK])
    assert drop(cache, DIGEST, 0, HEADER) == 3
    assert not dead.exists() and not cut.exists()
    assert live.exists() and other.exists()


def test_private_chunks_never_reach_the_cache_even_by_read_ahead(tmp_path: Path) -> None:
    """What an erasing start's server does with the header's chunks: fetched and kept in its
    memory, never stored, whether read by the kernel (the file system's first blocks share the
    header's last chunk) or fetched ahead of a sequential reader."""
    cache = BlockCache(tmp_path / "c", 64 * CHUNK)
    source = Counting()
    blob = CachedBlob(cache, source, private=HEADER)
    for offset in range(0, len(DATA), 64 << 10):  # sequential: read-ahead runs
        length = min(64 << 10, len(DATA) - offset)
        assert blob.pread(offset, length) == DATA[offset : offset + length]
    assert blob.pread(HEADER - 10, 20) == DATA[HEADER - 10 : HEADER + 10]
    blob.close()
    assert _chunks(tmp_path / "c") == ["00000003", "00000004", "00000005"]
    spans = sorted(source.reads)  # each chunk once: the header's kept in memory; read-ahead
    assert [s for s in spans if s[0] < HEADER] == [(i * CHUNK, CHUNK)  # asks for the others
                                                   for i in range(-(-HEADER // CHUNK))]  # fmt: skip
    assert sum(n for _, n in spans) == len(DATA)  # in runs, the header's chunks one by one
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    return tmp_path / "state"


def _pushed(registry: RunningRegistry, tmp_path: Path, repo: str) -> tuple[Path, str]:
    image = fake_image(tmp_path / "img", size=3 << 20)
    ref = f"docker://{registry.host}/{repo}:v1"
    code, _, err = invoke("push", "--no-tls-verify", str(image), ref)
    assert code == 0, err
    return image, ref


def _fetch(ref: str, where: Path, erase: bool) -> lazy.Fetched:
    where.mkdir(mode=0o700)
    return lazy.fetch(lazy.Remote(ref, tls_verify=False), where / "image", erase=erase)


def test_an_erasing_fetch_drops_the_cached_header_and_stores_none(
    plain: RunningRegistry, tmp_path: Path, state: Path
) -> None:
    image, ref = _pushed(plain, tmp_path, "erase/fetch")
    layer = load(image).layers[0]
    kept = _fetch(ref, tmp_path / "kept", erase=False)  # --keep: the header's chunk cached
    digest = kept.blobs[0][0]
    assert kept.headers == [layer.offset]
    assert _chunks(state / "blockcache", digest) == ["00000000"]
    erased = _fetch(ref, tmp_path / "erased", erase=True)
    assert _chunks(state / "blockcache", digest) == []  # dropped, and not stored again
    original = (image / layer.file).read_bytes()
    copy = (erased.image / layer.file).read_bytes()
    assert copy[: layer.offset] == original[: layer.offset]  # the header, past the cache
    assert copy[layer.offset :] == bytes(layer.size - layer.offset)


def test_the_server_of_an_erasing_start_never_stores_the_header(
    plain: RunningRegistry, tmp_path: Path, state: Path
) -> None:
    """The server process as runtime/lazy.py starts it, told the header's extent: reads of the
    header and of the blocks after it in the same chunk, and the read-ahead that follows, are
    served, and the header's chunk is never in the cache."""
    from cryptlayer.runtime import lazy as runtime_lazy

    image, ref = _pushed(plain, tmp_path, "erase/serve")
    fetched = _fetch(ref, tmp_path / "work", erase=True)
    remote = lazy.Remote(ref, tls_verify=False)
    blob = (image / load(image).layers[0].file).read_bytes()
    config = json.loads(lazy.server_config(remote, fetched.blobs, [5], private=fetched.headers))
    assert config["blobs"][0]["private"] == fetched.headers[0] > 0
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    layers = runtime_lazy.LazyLayers(
        tmp_path / "work", fetched.blobs, [sys.executable, "-m", "cryptlayer.distribution.lazy"],
        lambda fds: lazy.server_config(remote, fetched.blobs, fds, private=fetched.headers),
    )  # fmt: skip
    identity = runtime_lazy._spawn(layers, [server])
    server.close()
    pid = int(identity.split(":")[0])
    try:
        for cookie, offset in enumerate(range(0, 3 * CHUNK, 128 << 10)):  # sequential
            kernel.sendall(struct.pack(">IHHQQI", nbdserver.REQUEST_MAGIC, 0,
                                       nbdserver.CMD_READ, cookie, offset, 128 << 10))  # fmt: skip
            magic, error, got = struct.unpack(">IIQ", _recv(kernel, 16))
            assert (magic, error, got) == (nbdserver.SIMPLE_REPLY_MAGIC, 0, cookie)
            assert _recv(kernel, 128 << 10) == blob[offset : offset + (128 << 10)]
        kernel.close()
        deadline = time.monotonic() + 30
        while runtime_lazy.start_time(pid) and time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
            time.sleep(0.05)
    finally:
        runtime_lazy.kill_server(identity)
    assert _chunks(state / "blockcache", fetched.blobs[0][0]) == ["00000001", "00000002"]


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def test_a_lazy_copy_gone_with_its_opening_owes_no_more_erase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc after a crash: the record of an erasing lazy start names its fetched copy in /run,
    removed with the opening; the erase it owed is then complete (shred_image would fail on
    the missing directory, and gc with it). A local image that is missing still fails."""
    from cryptlayer.runtime import layers

    monkeypatch.setenv("CRYPTLAYER_RUNDIR", str(tmp_path / "run"))
    fetched = tmp_path / "run/lazy/0123456789abcdef/image"
    fetched.mkdir(parents=True)
    assert not layers.fetched_copy_gone(fetched)
    fetched.rmdir()
    assert layers.fetched_copy_gone(fetched)
    assert not layers.fetched_copy_gone(tmp_path / "images/app")


def test_the_erase_warning_of_a_lazy_start_is_about_the_block_cache(
    tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptlayer import cli
    from cryptlayer.runtime import hostcheck

    asked: list[Path] = []
    monkeypatch.setattr(hostcheck, "erase_caveat", lambda p: asked.append(p))
    (state / "blockcache").mkdir(parents=True)
    (tmp_path / "fetched").mkdir()
    cli._warn_if_erase_may_not_hold(tmp_path / "fetched", lazy=True)
    assert asked == [state / "blockcache"]
