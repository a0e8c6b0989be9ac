"""Lazy start's block cache (docs/lazy.md) on a real node, against Debian's docker-registry: two
containers of one image share its chunks (the second fetches nothing the first fetched, and
stopping one leaves the other working), and the cache's bound from config.toml holds while a job
reads more than it (the evicted chunks fetched again, the content right)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Cli
from registryfixtures import RunningRegistry, registry
from test_lazy import _blob, _nothing_lazy_left, _servers

from cryptlayer.distribution.blockcache import CHUNK, RESCAN_EVERY, TEMP_PREFIX
from cryptlayer.paths import block_cache_dir

FILE = 3 << 20  # each file a container reads: a few chunks
BOUND = 64 << 20  # block-cache-size's least value (config.MIN_BLOCK_CACHE_SIZE)
BIG = BOUND + (8 << 20)  # what the bound test's job reads: more than the bound


def _fresh_cache() -> None:
    subprocess.run(["rm", "-rf", str(block_cache_dir())], check=True)


def _chunks(hex_digest: str) -> dict[str, int]:
    """Blob `hex_digest`'s chunks in the node's cache: name -> inode (a chunk fetched again is
    a new file renamed over the name, so a new inode)."""
    where = block_cache_dir() / "sha256" / hex_digest
    if not where.is_dir():
        return {}
    return {p.name: p.stat().st_ino for p in where.iterdir() if not p.name.startswith(TEMP_PREFIX)}


def _cache_bytes() -> tuple[int, list[str]]:
    """The bytes of every chunk in the cache, and the temporary files in it."""
    total, temps = 0, []
    for path in (block_cache_dir() / "sha256").glob("*/*"):
        if path.name.startswith(TEMP_PREFIX):
            temps.append(str(path))
        else:
            total += path.stat().st_size
    return total, temps


def _gets(reg: RunningRegistry, hex_digest: str) -> tuple[int, int]:
    """GETs of blob `hex_digest` in the registry's access log, and the bytes they sent (the log
    does not show the Range; each of the server's fetches is one chunk's GET)."""
    log = (reg.storage.parent / "log").read_text()
    pattern = rf'"GET /v2/[^ ]*/blobs/sha256:{hex_digest} HTTP/[0-9.]+" (\d+) (\d+)'
    found = [(int(status), int(sent)) for status, sent in re.findall(pattern, log)]
    assert all(status in (200, 206) for status, _ in found), found
    return len(found), sum(sent for _, sent in found)


def _settled(reg: RunningRegistry, hex_digest: str) -> tuple[int, int]:
    """The registry's count once the servers' read-ahead has ended (no chunk being written, and
    no new GET for a second)."""
    deadline = time.monotonic() + 60
    last = _gets(reg, hex_digest)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = _gets(reg, hex_digest)
        if now == last and not _cache_bytes()[1]:
            return now
        last = now
    raise AssertionError(f"the lazy servers kept fetching blob {hex_digest} for a minute")


def _drop_page_cache() -> None:
    """So that a read goes down to the NBD device (and its server) again."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_two_containers_share_the_cache(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    content = {name: os.urandom(FILE) for name in ("shared", "a", "b")}
    for name, data in content.items():
        (tree / f"data/{name}.bin").write_bytes(data)
    image = images / "shared"
    cli.ok("build", "--key-file", str(key_file), "--output", str(image), str(busybox_tree),
           str(tree))  # fmt: skip
    layers = {_blob(p) for p in image.glob("*.luks")}
    layer = _blob(image / "layer1.luks")  # the data layer
    _fresh_cache()
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/shared:v1")
        ref = f"docker://{reg.host}/team/shared:v1"
        # Two lazy starts at once (two processes, as two users' commands would be).
        command = [sys.executable, "-m", "cryptlayer", "start", "--tls-verify=false", "-k",
                   str(key_file), ref]  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        starts = [subprocess.Popen([*command, "--name", name], **pipes) for name in ("lzA", "lzB")]
        results = [p.communicate(timeout=600) for p in starts]
        rootfs = {}
        for name, process, (out, err) in zip(("lzA", "lzB"), starts, results, strict=True):
            assert process.returncode == 0, f"start {name}: {err}"  # no_leaks stops the other
            rootfs[name] = Path(out.strip())
        assert len(_servers()) == 2

        def read(name: str, file: str) -> None:
            assert (rootfs[name] / f"data/{file}.bin").read_bytes() == content[file], (
                f"{name} read {file}.bin wrong"
            )

        read("lzA", "shared")
        read("lzA", "a")
        gets = _settled(reg, layer)
        before = _chunks(layer)
        assert before, "container A read its files without the cache"
        # B reads what A read: each chunk it needs is the one A fetched (the same file, the same
        # inode: none fetched again), and each GET it makes is a chunk new to the cache (its
        # read-ahead past the file's end may go further than A's did).
        read("lzB", "shared")
        after_gets = _settled(reg, layer)
        after = _chunks(layer)
        assert {n: after.get(n) for n in before} == before, "a cached chunk was fetched again"
        assert after_gets[0] - gets[0] == len(after) - len(before), (gets, after_gets)
        read("lzB", "b")  # and a file of its own, through the same cache
        # one set of chunks per blob, by digest, whoever fetched it
        blobs = {p.name for p in (block_cache_dir() / "sha256").iterdir()}
        assert layer in blobs and blobs <= layers, blobs
        # A stops; B still reads, down to its device: what it read, and what A alone read
        cli.ok("stop", "lzA")
        assert len(_servers()) == 1
        _drop_page_cache()
        for file in ("shared", "b", "a"):
            read("lzB", file)
        cli.ok("stop", "lzB")
    _nothing_lazy_left()
    _fresh_cache()


def test_the_cache_bound_holds_while_a_job_reads_more(
    cli: Cli,
    images: Path,
    key_file: Path,
    busybox_tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """block-cache-size = 64M and a job that reads 72 MiB, twice: each run's output is right (the
    second run's chunks, evicted by the first's end, fetched again), and after each the cache's
    bytes are within the documented bound: the limit, plus up to RESCAN_EVERY chunks for each
    other server storing meanwhile (here none: one server at a time)."""
    config = tmp_path / "config.toml"
    config.write_text('block-cache-size = "64M"\n')
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(config))  # the CLI's and the server's
    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    (tree / "bin").mkdir()
    (tree / "bin/sha256sum").symlink_to("busybox")  # the lower layer's
    data = os.urandom(BIG)
    (tree / "data/big.bin").write_bytes(data)
    image = images / "bounded"
    cli.ok("build", "--key-file", str(key_file), "--output", str(image), "--cmd",
           "sha256sum /data/big.bin", str(busybox_tree), str(tree))  # fmt: skip
    layer = _blob(image / "layer1.luks")
    expected = f"{hashlib.sha256(data).hexdigest()}  /data/big.bin\n"
    _fresh_cache()
    other_servers = 0
    slack = other_servers * RESCAN_EVERY * CHUNK
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/bounded:v1")
        ref = f"docker://{reg.host}/team/bounded:v1"
        fetched = 0
        for attempt in (1, 2):
            code, out, err = cli("run", "--tls-verify=false", "-k", str(key_file), ref)
            assert (code, out) == (0, expected), f"run {attempt}: {err}"
            _nothing_lazy_left()
            cached, temps = _cache_bytes()
            assert temps == []
            assert cached <= BOUND + slack, f"run {attempt}: {cached} bytes cached"
            _, sent = _gets(reg, layer)
            # the job read more than the bound through the cache (the first run fetched more
            # than the cache may hold), and the second run fetched again what was evicted
            least = BOUND if attempt == 1 else BIG - BOUND  # what the cache cannot have kept
            assert sent - fetched > least, f"run {attempt} fetched {sent - fetched} bytes"
            fetched = sent
    _fresh_cache()
