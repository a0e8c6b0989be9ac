"""Lazy start (docs/lazy.md), against Debian's docker-registry: `run docker://...` reads its
layers block by block through the kernel's NBD device, dm-verity and dm-crypt; only the blocks
read are fetched, a block changed in the registry's storage is an I/O error and the tampered
failure, and nothing is left after (no NBD device attached, no server process, no mapping)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from conftest import MARKER_LOWER, Cli, image_key_of, keyslots, leftovers
from registryfixtures import registry
from test_crash_points import crash_at
from test_tampering import _block_of, _flip

from cryptlayer.distribution.blockcache import CHUNK
from cryptlayer.errors import ExitCode
from cryptlayer.image.manifest import load
from cryptlayer.paths import block_cache_dir, lazy_run_dir

SERVER = "cryptlayer.distribution.lazy"
BIG = 40 << 20  # random bytes beside the file the job reads


def _blob(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(hex_digest: str) -> int:
    """Bytes of blob `hex_digest` in the node's block cache: what the server fetched."""
    where = block_cache_dir() / "sha256" / hex_digest
    return sum(p.stat().st_size for p in where.iterdir()) if where.is_dir() else 0


@contextmanager
def _server_logs() -> Iterator[list[str]]:
    """What the lazy servers logged meanwhile (their log goes with the fetched directory at
    teardown), and the kernel's last lines: for the failure messages."""
    found: dict[Path, str] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            for log in lazy_run_dir().glob("*/server.log"):
                with suppress(OSError):
                    found[log] = log.read_text()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    logs: list[str] = []
    try:
        yield logs
    finally:
        stop.set()
        thread.join()
        logs += found.values()
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        logs.append("\n".join(dmesg.splitlines()[-25:]))


def _servers() -> list[str]:
    servers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if SERVER.encode() in cmdline:
                servers.append(proc.name)
    return servers


def _nothing_lazy_left() -> None:
    attached = [p.parent.name for p in Path("/sys/block").glob("nbd*/pid")]
    assert attached == [], f"NBD devices still attached: {attached}"
    deadline = time.monotonic() + 30  # one whose device was never attached ends by itself
    while (servers := _servers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert servers == [], f"lazy servers still running: {servers}"
    lazy_dir = lazy_run_dir()
    assert not lazy_dir.is_dir() or list(lazy_dir.iterdir()) == []


def test_lazy_run_reads_the_file_and_fetches_part_of_the_blob(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "big"
    (tree / "data").mkdir(parents=True)
    (tree / "data/hello.txt").write_text(f"{MARKER_LOWER}\n")
    (tree / "data/unread.bin").write_bytes(os.urandom(BIG))
    image = images / "big"
    cli.ok("build", "--key-file", str(key_file), "--output", str(image),
           "--cmd", "cat /data/hello.txt", str(busybox_tree), str(tree))  # fmt: skip
    layer = _blob(image / "layer1.luks")
    size = (image / "layer1.luks").stat().st_size
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/big:v1")
        ref = f"docker://{reg.host}/team/big:v1"
        with _server_logs() as logs:  # --keep: the node keeps the headers' chunks too
            code, out, err = cli("run", "--tls-verify=false", "--keep", "-k", str(key_file), ref)
        assert (code, out) == (0, f"{MARKER_LOWER}\n"), (err, logs)
        fetched = _cached(layer)
        assert 0 < fetched < size // 2, f"fetched {fetched} of {size} bytes"
        _nothing_lazy_left()
        # a second start fetches no layer byte it already has: the same output from the cache
        assert cli("run", "--tls-verify=false", "--keep", "-k", str(key_file), ref)[1] == out
        assert _cached(layer) == fetched
        _nothing_lazy_left()


def test_lazy_start_and_stop_leave_nothing(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        rootfs = Path(cli.ok("start", "--tls-verify=false", "--name", "lz", "-k",
                             str(key_file), ref).strip())  # fmt: skip
        try:
            assert (rootfs / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
            assert list(Path("/sys/block").glob("nbd*/pid"))  # attached while it runs
        finally:
            cli.ok("stop", "lz")
        _nothing_lazy_left()


def test_a_block_changed_in_the_registry_is_an_io_error_and_tampered(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    offset = _block_of(image, key_file, 1, "/data/hello.txt") + 100
    layer = _blob(image / "layer1.luks")
    shutil.rmtree(block_cache_dir(), ignore_errors=True)  # no good copy of the block cached
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        stored = reg.storage / "docker/registry/v2/blobs/sha256" / layer[:2] / layer / "data"
        _flip(stored, offset)
        code, out, err = cli("run", "--tls-verify=false", "-k", str(key_file),
                             f"docker://{reg.host}/team/app:v1")  # fmt: skip
    assert code == ExitCode.RUN_FAILED  # TAMPERED for the other commands
    assert out == ""  # not one garbled byte reached the container's output
    assert "I/O error" in err  # cat's own complaint, from inside the container
    last = err.splitlines()[-1]
    assert last.startswith("error: layer 1 of ") and "failed dm-verity's check" in last, err
    _nothing_lazy_left()
    shutil.rmtree(block_cache_dir(), ignore_errors=True)  # the changed chunk is not kept


def test_a_crash_at_each_new_step_is_cleaned_up_by_gc(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """SIGKILL (journal.crash_point) around the fetched directory's, the server's and the NBD
    devices' steps of a lazy run's opening; then `gc` detaches the devices, kills the server (a
    process of another, dead, parent by then) and removes the directory. Points 7 to 14 of a run
    are those steps (1: the image fetched, 2-3: the container's directory, 4: the image, 5-6:
    the opening's directory; the layers' steps run in threads after them)."""
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        for point in range(7, 15):
            assert crash_at(point, "run", "--tls-verify=false", "-k", str(key_file), ref), point
            code, _, err = cli("gc")
            assert code == 0, f"point {point}: gc failed: {err}"
            assert leftovers() == [], f"point {point}: left after gc: {leftovers()}"
            _nothing_lazy_left()


def test_the_registry_gone_mid_run_is_an_io_error_and_stop_leaves_nothing(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    """The registry stops while the container runs: a read of blocks not cached fails (EIO,
    after the server's attempts: never a hang), and `stop` still leaves nothing."""
    tree = tmp_path / "big"
    (tree / "data").mkdir(parents=True)
    (tree / "data/unread.bin").write_bytes(os.urandom(16 << 20))
    image = images / "gone"
    cli.ok("build", "--key-file", str(key_file), "--output", str(image), str(busybox_tree),
           str(tree))  # fmt: skip
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/gone:v1")
        rootfs = Path(cli.ok("start", "--tls-verify=false", "--name", "gone", "-k",
                             str(key_file), f"docker://{reg.host}/team/gone:v1").strip())  # fmt: skip
    try:
        with pytest.raises(OSError) as caught:
            (rootfs / "data/unread.bin").read_bytes()
        assert caught.value.errno == errno.EIO
    finally:
        code, _, err = cli("stop", "gone")
    assert code == 0, err
    _nothing_lazy_left()
    shutil.rmtree(block_cache_dir(), ignore_errors=True)


# Crypto-erase (docs/lazy.md, "Erase at start"): without --keep, the node's copy of each layer's
# LUKS header (the block cache's chunks holding it, the fetched copy in /run) is erased at start,
# and nothing left on the node opens the image; the registry's copy is the publisher's.


def _header_chunks(image: Path) -> list[list[str]]:
    """For each layer of `image`: the block cache's chunks of its blob that overlap its header."""
    found = []
    for layer in load(image).layers:
        where = block_cache_dir() / "sha256" / _blob(image / layer.file)
        names = [p.name for p in where.iterdir() if p.name[0] != "."] if where.is_dir() else []
        found.append(sorted(n for n in names if int(n, 16) * CHUNK < layer.offset))
    return found


def _opens_from_cache(image: Path, key_file: Path, work: Path) -> list[bool]:
    """For each layer: whether what the block cache holds of its blob, each chunk put back at
    its place in a sparse file of the blob's size, opens with the image key (cryptsetup's own
    test of the key against the header's keyslots)."""
    image_key = image_key_of(image, key_file.read_bytes())
    opens = []
    for layer in load(image).layers:
        where = block_cache_dir() / "sha256" / _blob(image / layer.file)
        blob = work / f"{layer.file}.from-cache"
        with open(blob, "wb") as out:
            out.truncate(layer.size)
            for chunk in where.glob("[0-9a-f]" * 8):  # not a temporary file
                out.seek(int(chunk.name, 16) * CHUNK)
                out.write(chunk.read_bytes())
        test = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-",
                               str(blob)], input=image_key, capture_output=True)  # fmt: skip
        opens.append(test.returncode == 0)
        blob.unlink()
    return opens


def test_a_lazy_run_without_keep_leaves_nothing_on_the_node_that_opens_the_image(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """With --keep the headers' chunks stay in the cache (a second start fetches nothing), and
    put together they open the image; a run without it drops them (those --keep left too),
    stores none again, and what is left opens nothing."""
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
    layers = len(load(image).layers)
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        code, out, err = cli("run", "--tls-verify=false", "--keep", "-k", str(key_file), ref)
        assert (code, out) == (0, f"{MARKER_LOWER}\n"), err
        assert all(_header_chunks(image)), _header_chunks(image)
        assert _opens_from_cache(image, key_file, tmp_path) == [True] * layers
        code, out, err = cli("run", "--tls-verify=false", "-k", str(key_file), ref)
        assert (code, out) == (0, f"{MARKER_LOWER}\n"), err
    assert _header_chunks(image) == [[]] * layers
    assert _opens_from_cache(image, key_file, tmp_path) == [False] * layers
    assert any(_cached(_blob(image / layer.file)) for layer in load(image).layers)  # the rest
    _nothing_lazy_left()  # and the fetched copy in /run is gone
    shutil.rmtree(block_cache_dir(), ignore_errors=True)


def _read_everything(rootfs: Path) -> None:
    """Every file of the container's tree read through the layers, none from the page cache:
    the file systems' first blocks lie in the chunks that hold the headers."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    for path in rootfs.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.read_bytes()


def _fetched_keyslots() -> dict[str, list[int]]:
    """The keyslots of each fetched copy's layer files in /run, by container directory."""
    return {
        work.name: [keyslots(p) for p in sorted((work / "image").glob("*.luks"))]
        for work in lazy_run_dir().iterdir()
    }


def test_an_erasing_lazy_start_beside_a_kept_one_keeps_the_header_off_the_disk(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """Two containers of one image at once: a --keep one, then one that erases at start. The
    second's start drops the headers' chunks under the first's server and wipes its own fetched
    copy's keyslots; while it runs, its reads (all of its tree, the chunks holding the headers
    included) store none again; the first goes on reading (its server fetches again what was
    dropped under it); both stop and leave nothing."""
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
    layers = len(load(image).layers)
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        kept = Path(cli.ok("start", "--tls-verify=false", "--keep", "--name", "lzk", "-k",
                           str(key_file), ref).strip())  # fmt: skip
        try:
            before = set(_fetched_keyslots())
            assert all(_header_chunks(image))
            erased = Path(cli.ok("start", "--tls-verify=false", "--name", "lze", "-k",
                                 str(key_file), ref).strip())  # fmt: skip
            try:
                assert _header_chunks(image) == [[]] * layers
                slots = _fetched_keyslots()
                assert [slots[w] for w in slots if w in before] == [[1] * layers]  # --keep's
                assert [slots[w] for w in slots if w not in before] == [[0] * layers]
                _read_everything(erased)
                assert (erased / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
                assert _header_chunks(image) == [[]] * layers  # never stored again
                _read_everything(kept)
                assert (kept / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
            finally:
                cli.ok("stop", "lze")
        finally:
            cli.ok("stop", "lzk")
    _nothing_lazy_left()
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
