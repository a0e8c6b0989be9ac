"""An engine runs an encrypted image through cryptlayer-runtime (docs/engines.md): podman 4.3
(Debian's, with its conmon), `--runtime` cryptlayer-runtime, the placeholder, the image named by
annotation or environment. The layers are assembled at `create` on real dm-crypt, the image's
default process runs where podman was given none, and `--rm`'s delete tears everything down and
shreds the image unless it was kept.

podman and conmon call the runtime with environments of their own: a wrapper gives it this
test's CRYPTLAYER_* (the state root on the scratch disk, the config file), as /etc/cryptlayer
would on a node (tests/unit/test_engine.py proves that path, without dm-crypt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MARKER_LOWER, Cli, leftovers, slots

from cryptlayer.runtime.layers import mapping_prefix
from cryptlayer.tools import udev

RUNTIME = str(Path(sys.executable).with_name("cryptlayer-runtime"))
PLACEHOLDER = "localhost/cryptlayer/placeholder:v1"
PODMAN_TIMEOUT = 1800  # every runtime call starts Python, slowly under emulation


@dataclass
class Node:
    """podman's private configuration and the runtime, as a node would have them."""

    env: dict[str, str]
    runtime: Path  # the wrapper podman is given
    config: Path  # cryptlayer's config.toml
    base: Path

    def podman(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=PODMAN_TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`podman run --rm --runtime cryptlayer-runtime ... ARGS`."""
        return self.podman("run", "--rm", "--runtime", str(self.runtime), "--network", "none",
                           "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                           *args)  # fmt: skip

    def detached(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`podman run -d --name NAME --runtime cryptlayer-runtime ... ARGS`."""
        return self.podman("run", "-d", "--name", name, "--runtime", str(self.runtime),
                           "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
                           "nproc=1024:1024", *args)  # fmt: skip


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    base = tmp_path_factory.mktemp("podman")
    (base / "containers.conf").write_text(f"""[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
tmp_dir = "{base}/libpod"
runtime_supports_json = ["crun", "runc", "cryptlayer-runtime"]
runtime_supports_nocgroups = ["crun", "cryptlayer-runtime"]
""")
    (base / "storage.conf").write_text(f"""[storage]
driver = "vfs"
graphroot = "{base}/storage"
runroot = "{base}/storage-run"
""")
    config = base / "config.toml"
    passed = {k: v for k, v in os.environ.items() if k.startswith("CRYPTLAYER_") or k == "TMPDIR"}
    passed |= {"CRYPTLAYER_CONFIG": str(config), "PATH": os.environ["PATH"]}
    wrapper = base / "cryptlayer-runtime"
    exports = " ".join(f"{k}='{v}'" for k, v in sorted(passed.items()))
    wrapper.write_text(f'#!/bin/sh\nexport {exports}\nexec {RUNTIME} "$@"\n')
    wrapper.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(base), "TMPDIR": str(base),
           "CONTAINERS_CONF": str(base / "containers.conf"),
           "CONTAINERS_STORAGE_CONF": str(base / "storage.conf")}  # fmt: skip
    loaded = subprocess.run([sys.executable, "-m", "cryptlayer", "placeholder", "--engine",
                             "podman"], env=env | {"CRYPTLAYER_CONFIG": str(config)},
                            capture_output=True, text=True, timeout=PODMAN_TIMEOUT)  # fmt: skip
    assert loaded.stdout == f"{PLACEHOLDER}\n", loaded.stderr
    yield Node(env, wrapper, config, base)
    subprocess.run(["podman", "rm", "--all", "--force"], env=env, capture_output=True)


def signed(cli: Cli, image: Path, tmp_path: Path) -> Path:
    """Sign `image` with a new publisher key; the allowed_signers file that trusts it."""
    publisher = tmp_path / "publisher"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(publisher)],
                   check=True)  # fmt: skip
    trust = tmp_path / "allowed_signers"
    trust.write_text("release@example " + " ".join(Path(f"{publisher}.pub").read_text().split()[:2])
                     + "\n")  # fmt: skip
    cli.ok("sign", str(image), "--sign-key", str(publisher), "--name", "release")
    return trust


def configure(node: Node, image: Path, key: Path, trust: Path) -> None:
    node.config.write_text(f"""trust = "{trust}"
[[keys]]
image = "{image.parent}/*"
key-file = "{key}"
""")


def settled() -> list[str]:
    """What is left of cryptlayer's, once podman's removal has run (podman run --rm removes the
    container before it returns; its conmon's cleanup may still be on the way)."""
    deadline = time.monotonic() + 300
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(2)
    return left


def test_podman_runs_the_images_default_process_then_shreds(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """No command given to podman: the image's own (`cat /data/hello.txt`), from its encrypted
    layers; podman's exit status is the container's; `--rm` leaves nothing, the image shredded."""
    configure(node, image, key_file, signed(cli, image, tmp_path))
    result = node.run("--annotation", f"org.cryptlayer.image={image}", PLACEHOLDER)
    assert (result.returncode, result.stdout) == (0, f"{MARKER_LOWER}\n"), result.stderr
    assert settled() == []
    assert slots(image) == [0, 0]


def test_a_command_given_to_podman_wins_and_keep_keeps(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """The image named in the environment (as Docker must), kept; the command given to podman
    runs, without the variables that named the image; its exit status comes back."""
    configure(node, image, key_file, signed(cli, image, tmp_path))
    script = 'cat /data/hello.txt; echo "[${CRYPTLAYER_IMAGE:-}${CRYPTLAYER_KEEP:-}]"; exit 3'
    result = node.run("-e", f"CRYPTLAYER_IMAGE={image}", "-e", "CRYPTLAYER_KEEP=true",
                      PLACEHOLDER, "sh", "-c", script)  # fmt: skip
    assert (result.returncode, result.stdout) == (3, f"{MARKER_LOWER}\n[]\n"), result.stderr
    assert settled() == []
    assert slots(image) == [1, 1]


def test_a_wrong_key_fails_in_podman_with_our_error(
    cli: Cli, node: Node, image: Path, tmp_path: Path
) -> None:
    """The node's config gives the image a key that does not open it: podman fails showing
    cryptlayer's one line, nothing is left, nothing is erased."""
    wrong = tmp_path / "wrong.key"
    cli.ok("keygen", str(wrong))
    configure(node, image, wrong, signed(cli, image, tmp_path))
    result = node.run("--annotation", f"org.cryptlayer.image={image}", PLACEHOLDER)
    assert (result.returncode, result.stdout) == (126, ""), result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("Error: OCI runtime error: "), result.stderr
    assert "cryptlayer-runtime: the key does not open this image: `cryptlayer inspect" in last
    assert settled() == []
    assert slots(image) == [1, 1]


def test_a_volume_env_and_the_exit_status_pass_through(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """One `podman run --rm`: a host directory (`-v`) written by the container is read on the
    host; `-e` reaches the process and the variables that named the image (and pinned its digest)
    do not; the container's exit status (7) is podman's; `--rm` leaves nothing of podman's nor of
    cryptlayer's, and the image shredded."""
    configure(node, image, key_file, signed(cli, image, tmp_path))
    digest = cli.ok("inspect", "--format", "{{.Digest}}", str(image)).strip()
    volume = tmp_path / "volume"
    volume.mkdir()
    script = "cat /data/hello.txt > /vol/read; env > /vol/env; exit 7"
    result = node.run("-v", f"{volume}:/vol", "-e", "GREETING=hello", "-e",
                      f"CRYPTLAYER_DIGEST={digest}", "--annotation",
                      f"org.cryptlayer.image={image}", PLACEHOLDER, "sh", "-c",
                      script)  # fmt: skip
    assert (result.returncode, result.stdout) == (7, ""), result.stderr
    assert (volume / "read").read_text() == f"{MARKER_LOWER}\n"
    env = (volume / "env").read_text().splitlines()
    assert "GREETING=hello" in env
    assert [e for e in env if e.startswith("CRYPTLAYER_")] == []
    listed = node.podman("ps", "--all", "--quiet")
    assert (listed.returncode, listed.stdout) == (0, ""), listed.stderr
    assert settled() == []
    assert slots(image) == [0, 0]


def test_two_containers_of_one_image_share_its_layers(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """Two detached containers of one image at once: one set of layer mappings; the first
    one's create erases the disk's keyslots, the second joins (its key checked against the
    header copy); `podman logs` shows the image's file the first one printed; removing the first
    leaves the second reading its files; removing the second leaves nothing."""
    configure(node, image, key_file, signed(cli, image, tmp_path))
    named = ("--annotation", f"org.cryptlayer.image={image}", PLACEHOLDER)
    serve = ("sh", "-c", "cat /data/hello.txt; exec sleep 600")
    try:
        for name in ("first", "second"):
            started = node.detached(name, *named, *serve)
            assert started.returncode == 0, started.stderr
        records = [line for line in leftovers() if line.startswith("record")]
        assert len(records) == 2, records
        assert len(udev.mappings(mapping_prefix(str(image)))) == 2 * 2  # two layers, once
        assert slots(image) == [0, 0]  # erased at the first create: the copy opens no more
        logs = node.podman("logs", "first")
        assert (logs.returncode, logs.stdout) == (0, f"{MARKER_LOWER}\n"), logs.stderr
        first_gone = node.podman("rm", "--force", "--time", "0", "first")
        assert first_gone.returncode == 0, first_gone.stderr
        assert len(udev.mappings(mapping_prefix(str(image)))) == 2 * 2  # still the second's
        read = node.podman("exec", "second", "cat", "/data/hello.txt")
        assert (read.returncode, read.stdout) == (0, f"{MARKER_LOWER}\n"), read.stderr
    finally:
        removed = node.podman("rm", "--force", "--ignore", "--time", "0", "first", "second")
    assert removed.returncode == 0, removed.stderr
    assert settled() == []
    assert slots(image) == [0, 0]


def test_a_detached_container_takes_exec_stop_and_rm(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """`podman run -d`, then `podman exec` (passed through) reads the image's files; `podman
    stop` and `podman rm` (the runtime's delete) leave nothing, the image shredded."""
    configure(node, image, key_file, signed(cli, image, tmp_path))
    started = node.podman("run", "-d", "--name", "detached", "--runtime", str(node.runtime),
                          "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
                          "nproc=1024:1024", "--annotation", f"org.cryptlayer.image={image}",
                          PLACEHOLDER, "sleep", "600")  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert [line.split()[0] for line in leftovers() if line.startswith("record")] == ["record"]
        read = node.podman("exec", "detached", "cat", "/data/hello.txt")
        assert (read.returncode, read.stdout) == (0, f"{MARKER_LOWER}\n"), read.stderr
        stopped = node.podman("stop", "--time", "2", "detached")
        assert stopped.returncode == 0, stopped.stderr
    finally:
        removed = node.podman("rm", "--force", "detached")
    assert removed.returncode == 0, removed.stderr
    assert settled() == []
    assert slots(image) == [0, 0]


def test_podman_runs_a_registry_image_pulled_at_create(
    cli: Cli, node: Node, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """`org.cryptlayer.image=docker://...` of Debian's docker-registry (plain HTTP, which only
    the node's config allows), with `[pull] lazy = false` (the default starts it lazily:
    test_engines_lazy.py): pulled at create into the node's store, run from its encrypted
    layers, and at `--rm`'s delete shredded and removed; `CRYPTLAYER_KEEP=true` keeps the copy,
    unshredded. The node's own copy (the one pushed) is never touched."""
    from registryfixtures import registry

    from cryptlayer.paths import state_root

    trust = signed(cli, image, tmp_path)
    store = state_root() / "engine/images"  # the default: on the scratch disk, as the state
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        node.config.write_text(f"""trust = "{trust}"
[[keys]]
image = "{store}/*"
key-file = "{key_file}"
[registries."{reg.host}"]
tls-verify = false
[pull]
lazy = false
""")
        result = node.run("--annotation", f"org.cryptlayer.image={ref}", PLACEHOLDER)
        assert (result.returncode, result.stdout) == (0, f"{MARKER_LOWER}\n"), result.stderr
        assert settled() == []
        assert (store.stat().st_mode & 0o777, list(store.iterdir())) == (0o700, [])
        kept = node.run("-e", f"CRYPTLAYER_IMAGE={ref}", "-e", "CRYPTLAYER_KEEP=true", PLACEHOLDER)
        assert (kept.returncode, kept.stdout) == (0, f"{MARKER_LOWER}\n"), kept.stderr
        assert settled() == []
        (copy,) = store.iterdir()
        assert copy.name.startswith("engine-") and slots(copy) == [1, 1]
    assert slots(image) == [1, 1]
    cli.ok("shred", str(copy))
    shutil.rmtree(copy)
