"""A hostile image must not reach past its container: attacks from inside it, with real crun.

Each test is an attack that worked before part 7 (device nodes, the host's keyring, the host's
network, core dumps, decrypted memory through swap), now expected to fail.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli, leftovers, loop_device, slots

from cryptlayer.build import sources
from cryptlayer.errors import ExitCode
from cryptlayer.paths import run_root
from cryptlayer.runtime.ocispec import CAPABILITIES

SECRET = "cryptlayer-keyring-secret-0b7d"
# Capability numbers of podman's default set, for CapEff in /proc/PID/status
CAP_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4,
               "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
               "CAP_NET_BIND_SERVICE": 10, "CAP_SYS_CHROOT": 18, "CAP_SETFCAP": 31}  # fmt: skip


def _with_binary(root: Path, program: str) -> None:
    """Copy a host program and the libraries ldd names into the tree (same paths)."""
    path = shutil.which(program)
    assert path is not None, f"{program} is not installed"
    wanted = [path]
    for line in subprocess.run(["ldd", path], capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        wanted += [p for p in parts if p.startswith("/")]
    for item in wanted:
        target = root / item.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(item), target)


@pytest.fixture(scope="module")
def tools_image(
    images_root: Path, busybox_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """Busybox plus the host's keyctl: one image for the module, copied per test."""
    cli = Cli.new()
    tmp = tmp_path_factory.mktemp("confine")
    tree = tmp / "tree"
    shutil.copytree(busybox_tree, tree, symlinks=True)
    _with_binary(tree, "keyctl")
    key = tmp / "image.key"
    cli.ok("keygen", str(key))
    image = images_root / "confine-base"
    cli.ok("build", "--key-file", str(key), "--output", str(image), str(tree))
    yield image, key
    shutil.rmtree(image, ignore_errors=True)


@pytest.fixture
def tools(tools_image: tuple[Path, Path], images: Path) -> tuple[Path, Path]:
    image, key = tools_image
    copy = images / "tools"
    shutil.copytree(image, copy)
    return copy, key


def test_process_is_confined_as_podman_confines(cli: Cli, tools: tuple[Path, Path]) -> None:
    image, key = tools
    out = cli.ok("run", "--keep", "-k", str(key), str(image), "--", "sh", "-c",
                 "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status;"
                 " readlink /proc/self/ns/net")  # fmt: skip
    fields = dict(line.split(":\t") for line in out.splitlines()[:-1])
    expected = sum(1 << CAP_NUMBERS[c] for c in CAPABILITIES)
    assert int(fields["CapEff"], 16) == expected
    assert int(fields["CapBnd"], 16) == expected
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # a filter
    assert out.splitlines()[-1] != os.readlink("/proc/self/ns/net")  # a network of its own
    out = cli.ok("run", "--keep", "--network", "host", "-k", str(key), str(image), "--",
                 "readlink", "/proc/self/ns/net")  # fmt: skip
    assert out.strip() == os.readlink("/proc/self/ns/net")
    out = cli.ok("run", "--keep", "-u", "1000", "-k", str(key), str(image), "--",
                 "grep", "^CapEff:", "/proc/self/status")  # fmt: skip
    assert int(out.split()[1], 16) == 0


def test_host_keyring_is_out_of_reach(cli: Cli, tools: tuple[Path, Path]) -> None:
    """README's --keyring workflow keeps the image key in root's user keyring. crun gives the
    container a fresh session keyring, so reading the key takes linking `@u` into it first:
    that worked (it is the container's own uid's keyring) until keyctl was refused."""
    image, key = tools
    subprocess.run(["keyctl", "padd", "user", "cltest-secret", "@u"], input=SECRET.encode(),
                   check=True, capture_output=True)  # fmt: skip
    try:
        code, out, err = cli("run", "--keep", "-k", str(key), str(image), "--", "sh", "-c",
                             "keyctl link @u @s; keyctl pipe $(keyctl search @u user"
                             " cltest-secret)")  # fmt: skip
    finally:
        subprocess.run(["keyctl", "purge", "user", "cltest-secret"], capture_output=True)
    assert SECRET not in out
    assert code != 0
    assert "Operation not permitted" in err


def test_device_nodes_are_refused_at_build(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(busybox_tree, tree, symlinks=True)
    os.mknod(tree / "disk", 0o666 | 0o060000, os.makedev(7, 0))  # a block node: loop0
    code, _, err = cli("build", "-k", str(key_file), "-o", str(images / "dev"), str(tree))
    assert code == ExitCode.USAGE
    assert err == (f"error: {tree}/disk is a block device node (7:0): an image may carry device"
                   " nodes only in /dev, which build leaves out (the container gets /dev from the"
                   " runtime); remove it, or pass --drop-devices to leave it out\n")  # fmt: skip
    assert not (images / "dev").exists()


VICTIM = b"HOST-DISK-CONTENT-5e1d77"


@pytest.fixture
def victim(images: Path) -> Iterator[tuple[str, Path]]:
    """A block device of the host holding a marker (a loop device over a file). Its own marker:
    the file is plain on the scratch disk, whose freed blocks test_forensics scans for the image's
    markers."""
    backing = images / "victim.img"
    backing.write_bytes(VICTIM + bytes(1 << 20))
    with loop_device(backing) as device:
        yield device, backing


def test_device_node_of_an_old_image_opens_nothing(
    cli: Cli,
    images: Path,
    key_file: Path,
    busybox_tree: Path,
    tmp_path: Path,
    victim: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An image made before build refused devices (or by hand) carries a node of a host disk."""
    device, backing = victim
    rdev = os.stat(device).st_rdev
    tree = tmp_path / "tree"
    shutil.copytree(busybox_tree, tree, symlinks=True)
    os.mknod(tree / "disk", 0o666 | 0o060000, rdev)
    # as a cryptlayer from before builds refused devices
    monkeypatch.setattr(sources, "device_node", lambda *_, **__: sources.Device.KEEP)
    image = images / "old"
    cli.ok("build", "-k", str(key_file), "-o", str(image), str(tree))
    monkeypatch.undo()
    for user in ("0", "1000"):
        code, out, err = cli("run", "--keep", "-u", user, "-k", str(key_file), str(image), "--",
                             "sh", "-c", "head -c 64 /disk; echo pwned > /disk")  # fmt: skip
        assert VICTIM.decode() not in out
        assert code != 0
        assert "Permission denied" in err or "Operation not permitted" in err
    assert backing.read_bytes().startswith(VICTIM)  # nothing was written


@pytest.fixture
def file_core_pattern() -> Iterator[None]:
    """A core_pattern that writes files, and core dumps allowed (as on many hosts)."""
    path = Path("/proc/sys/kernel/core_pattern")
    old_pattern = path.read_text()
    old_limit = resource.getrlimit(resource.RLIMIT_CORE)
    path.write_text("/core.%p")
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, old_limit)
        path.write_text(old_pattern)


def test_crash_in_the_container_writes_no_core(
    cli: Cli, tools: tuple[Path, Path], file_core_pattern: None
) -> None:
    image, key = tools
    code, out, err = cli("run", "--keep", "-k", str(key), str(image), "--", "sh", "-c",
                         "sh -c 'kill -SEGV $$'; ls /")  # fmt: skip
    assert code == 0, err
    assert "core" not in out  # /core.PID would be in the container's root
    assert err.startswith("warning: core_pattern '/core.%p' writes core dumps to files:"
                          " decrypted memory may reach the disk [core-pattern]\n")  # fmt: skip
    assert "core dumped" not in err
    code, _, err = cli("run", "--strict", "-k", str(key), str(image), "--", "true")
    assert code == ExitCode.RUN_FAILED  # USAGE for the other commands
    assert err.startswith("error: this host may write decrypted memory to disk: core_pattern")
    assert slots(image) == [1]  # refused before anything was opened or erased


def test_unencrypted_swap_is_reported(cli: Cli, tools: tuple[Path, Path], images: Path) -> None:
    image, key = tools
    backing = images / "swap.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    with loop_device(backing) as device:
        subprocess.run(["mkswap", device], check=True, capture_output=True)
        subprocess.run(["swapon", device], check=True)
        try:
            code, _, err = cli("start", "--strict", "--name", "sw", "-k", str(key), str(image))
            assert code == ExitCode.USAGE
            assert err == (f"error: this host may write decrypted memory to disk: swap {device}"
                           " is not on dm-crypt: encrypt swap (or swapoff), pipe core dumps to a"
                           " handler that drops them, or leave out --strict"
                           " (docs/threat-model.md)\n")  # fmt: skip
            assert slots(image) == [1]  # refused before anything was opened
            assert [x for x in leftovers() if x != f"loop {device}"] == []
            code, out, err = cli("run", "-k", str(key), str(image), "--", "echo", "ran")
            assert (code, out) == (0, "ran\n")
            assert err == (f"warning: swap {device} is not on dm-crypt: decrypted memory may"
                           " reach the disk [swap]\n")  # fmt: skip
        finally:
            subprocess.run(["swapoff", device], check=True)


def test_runtime_directory_is_private_and_comes_back(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/run/cryptlayer: made again after a reboot empties /run, 0700, and the plaintext of a
    layer being built is out of reach of other users."""
    shutil.rmtree(run_root())  # as after a reboot (no test leaves anything in it)
    seen: list[subprocess.CompletedProcess[str]] = []
    populate = sources.DirectorySource.populate

    def populate_and_peek(self: sources.DirectorySource, target: Path, **kw: bool) -> None:
        populate(self, target, **kw)
        seen.append(subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534",
                                    "--clear-groups", "ls", str(target / "bin")],
                                   capture_output=True, text=True))  # fmt: skip

    monkeypatch.setattr(sources.DirectorySource, "populate", populate_and_peek)
    image = images / "img"
    cli.ok("build", "-k", str(key_file), "-o", str(image), str(busybox_tree))
    assert seen[0].returncode != 0 and "Permission denied" in seen[0].stderr
    assert "busybox" not in seen[0].stdout
    assert run_root().stat().st_mode & 0o777 == 0o700
    run_root().chmod(0o755)
    assert cli.ok("run", "-k", str(key_file), str(image), "--", "echo", "ok") == "ok\n"
    assert run_root().stat().st_mode & 0o777 == 0o700
