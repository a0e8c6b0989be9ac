"""podman runs a registry image through cryptlayer-runtime lazily (docs/engines.md "Registry
images", docs/lazy.md): `--annotation org.cryptlayer.image=docker://REG/REPO:TAG` against
Debian's docker-registry; at `create` only the small files and the headers are fetched, the
layers are read through NBD devices, dm-verity and dm-crypt as the container reads them (the
block cache holds only part of the layer blob), and after `podman rm` (or `--rm`) nothing is
left: no NBD device attached, no lazy server, no /run/cryptlayer/.lazy directory, no mapping,
loop or mount. podman is set up as in test_engines.py (its `node` fixture)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import test_engines
from conftest import MARKER_LOWER, Cli
from registryfixtures import RunningRegistry, registry
from test_engines import PLACEHOLDER, Node, settled, signed
from test_lazy import _blob, _cached, _nothing_lazy_left, _servers

from cryptlayer.paths import block_cache_dir, lazy_run_dir

BIG = 40 << 20  # random bytes beside the file the job reads
node = test_engines.node  # podman, set up as there (a fixture of this module too)


def _big_image(cli: Cli, images: Path, key_file: Path, busybox_tree: Path,
               tmp_path: Path) -> Path:  # fmt: skip
    tree = tmp_path / "big"
    (tree / "data").mkdir(parents=True)
    (tree / "data/hello.txt").write_text(f"{MARKER_LOWER}\n")
    (tree / "data/unread.bin").write_bytes(os.urandom(BIG))
    image = images / "big"
    cli.ok("build", "--key-file", str(key_file), "--output", str(image),
           "--cmd", "cat /data/hello.txt", str(busybox_tree), str(tree))  # fmt: skip
    return image


def _configure(node: Node, reg: RunningRegistry, key_file: Path, trust: Path,
               extra: str = "") -> None:  # fmt: skip
    """The node's keys by repository, its trust, and plain HTTP for the test's registry: the
    node's word, never the spec's."""
    node.config.write_text(f"""trust = "{trust}"
[[keys]]
repository = "{reg.host}/team/big"
key-file = "{key_file}"
{extra}
[registries."{reg.host}"]
tls-verify = false
""")


def _all_gone() -> None:
    assert settled() == []
    _nothing_lazy_left()


def test_podman_reads_a_registry_image_lazily_and_rm_leaves_nothing(
    cli: Cli, node: Node, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    """`podman run --rm` of the image's default process (`cat /data/hello.txt`): its output, the
    block cache holding less than half of the layer blob (40 MiB of random bytes never read);
    then nothing of the lazy start left."""
    image = _big_image(cli, images, key_file, busybox_tree, tmp_path)
    trust = signed(cli, image, tmp_path)
    layer = _blob(image / "layer1.luks")
    size = (image / "layer1.luks").stat().st_size
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/big:v1")
        _configure(node, reg, key_file, trust)
        ref = f"docker://{reg.host}/team/big:v1"
        result = node.run("--annotation", f"org.cryptlayer.image={ref}", PLACEHOLDER)
        assert (result.returncode, result.stdout) == (0, f"{MARKER_LOWER}\n"), result.stderr
        fetched = _cached(layer)
        assert 0 < fetched < size // 2, f"fetched {fetched} of {size} bytes"
        _all_gone()


def test_a_detached_lazy_container_runs_until_podman_rm(
    cli: Cli, node: Node, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    """`podman run -d` with the digest pinned: while it runs, its layers are NBD devices served
    by a lazy server, `podman exec` reads the image's file; `podman rm -f` (the runtime's
    delete) detaches the devices, ends the server and removes the fetched directory."""
    image = _big_image(cli, images, key_file, busybox_tree, tmp_path)
    trust = signed(cli, image, tmp_path)
    digest = cli.ok("inspect", "--format", "{{.Digest}}", str(image)).strip()
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/big:v1")
        _configure(node, reg, key_file, trust)
        ref = f"docker://{reg.host}/team/big:v1"
        started = node.detached("lz", "--annotation", f"org.cryptlayer.image={ref}",
                                "--annotation", f"org.cryptlayer.digest={digest}",
                                PLACEHOLDER, "sh", "-c", "sleep 600")  # fmt: skip
        try:
            assert started.returncode == 0, started.stderr
            assert list(Path("/sys/block").glob("nbd*/pid")), "no NBD device attached"
            assert _servers(), "no lazy server running"
            assert len(list(lazy_run_dir().iterdir())) == 1
            read = node.podman("exec", "lz", "cat", "/data/hello.txt")
            assert (read.returncode, read.stdout) == (0, f"{MARKER_LOWER}\n"), read.stderr
        finally:
            removed = node.podman("rm", "--force", "--time", "0", "lz")
        assert removed.returncode == 0, removed.stderr
        _all_gone()


def test_a_wrong_digest_fails_in_podman_and_leaves_nothing(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """A pinned digest the registry's image is not: podman shows cryptlayer's one line, and
    nothing was fetched for good (no directory, no server, no device)."""
    trust = signed(cli, image, tmp_path)
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/big:v1")
        _configure(node, reg, key_file, trust)
        ref = f"docker://{reg.host}/team/big:v1"
        result = node.run("--annotation", f"org.cryptlayer.image={ref}", "--annotation",
                          "org.cryptlayer.digest=sha256:" + "1" * 64, PLACEHOLDER)  # fmt: skip
        assert result.returncode != 0 and result.stdout == "", result.stderr
        assert "cryptlayer-runtime: " in result.stderr.splitlines()[-1], result.stderr
        _all_gone()


def test_lazy_false_pulls_the_whole_image(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """`[pull] lazy = false`: the whole image pulled into the store at create, as before: while
    the container runs its copy is there whole, and no NBD device or lazy server; `podman rm`
    removes the copy."""
    trust = signed(cli, image, tmp_path)
    store = tmp_path / "store"
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/big:v1")
        _configure(node, reg, key_file, trust, f'[pull]\nlazy = false\nstore = "{store}"')
        ref = f"docker://{reg.host}/team/big:v1"
        started = node.detached("full", "--annotation", f"org.cryptlayer.image={ref}",
                                PLACEHOLDER, "sh", "-c", "sleep 600")  # fmt: skip
        try:
            assert started.returncode == 0, started.stderr
            [copy] = list(store.iterdir())
            layer = copy / "layer1.luks"
            assert layer.stat().st_blocks * 512 >= (image / "layer1.luks").stat().st_size // 2
            assert list(Path("/sys/block").glob("nbd*/pid")) == [] and _servers() == []
            lazy = lazy_run_dir()
            assert not lazy.is_dir() or list(lazy.iterdir()) == []
        finally:
            removed = node.podman("rm", "--force", "--time", "0", "full")
        assert removed.returncode == 0, removed.stderr
        assert list(store.iterdir()) == []
        _all_gone()
