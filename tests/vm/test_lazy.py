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
from conftest import MARKER_LOWER, Cli, leftovers
from registryfixtures import registry
from test_crash_points import crash_at
from test_tampering import _block_of, _flip

from cryptlayer.errors import ExitCode
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
        with _server_logs() as logs:
            code, out, err = cli("run", "--tls-verify=false", "-k", str(key_file), ref)
        assert (code, out) == (0, f"{MARKER_LOWER}\n"), (err, logs)
        fetched = _cached(layer)
        assert 0 < fetched < size // 2, f"fetched {fetched} of {size} bytes"
        _nothing_lazy_left()
        # a second start fetches no layer byte it already has: the same output from the cache
        assert cli("run", "--tls-verify=false", "-k", str(key_file), ref)[1] == out
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
    process of another, dead, parent by then) and removes the directory. Points 6 to 13 of a run
    are those steps (1-2: the container's directory, 3: the image, 4-5: the opening's
    directory; the layers' steps run in threads after them)."""
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        for point in range(6, 14):
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
