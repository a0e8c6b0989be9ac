"""Whoever can write an image directory must not steer root's cryptsetup at another device.

Layer files swapped for symlinks, hard links or device nodes, before a command or in the window
between its checks and its erase; an image directory others may write; hostile files inside the
image's root file system. Each was an attack that worked before part 7.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli, keyslots, leftovers, loop_device, own_status, slots
from test_crash_points import crash_at

from cryptlayer.errors import ExitCode
from cryptlayer.paths import run_root
from cryptlayer.runtime import journal, state


@pytest.fixture
def image(one_layer: tuple[Path, Path], images: Path) -> Path:
    """A copy of the single-layer image (each test may erase its own)."""
    shutil.copytree(one_layer[0], images / "img")
    return images / "img"


@pytest.fixture
def key(one_layer: tuple[Path, Path]) -> Path:
    return one_layer[1]


@pytest.fixture
def decoy(one_layer: tuple[Path, Path], images: Path) -> Iterator[tuple[str, Path]]:
    """A LUKS block device of the host (a loop device over another image's layer): what an
    attacker wants root's cryptsetup to erase."""
    backing = images / "decoy.luks"
    shutil.copyfile(one_layer[0] / "layer0.luks", backing)
    with loop_device(backing) as device:
        yield device, backing


def test_symlinked_layer_is_never_followed(
    cli: Cli, image: Path, key: Path, decoy: tuple[str, Path]
) -> None:
    device, backing = decoy
    layer = image / "layer0.luks"
    layer.unlink()
    layer.symlink_to(device)
    refused = (f"error: layer file {layer} is a symbolic link; refusing to follow it: a layer is"
               " a regular file inside the image directory; copy the image again\n")  # fmt: skip
    for args in (("run", "-k", str(key), str(image)),
                 ("start", "--name", "sym", "-k", str(key), str(image)),
                 ("shred", str(image))):  # fmt: skip
        code, _, err = cli(*args)
        assert (code, err) == (own_status(ExitCode.USAGE, args), refused), args
    assert keyslots(backing) == 1 and keyslots(Path(device)) == 1


def test_hard_linked_or_device_layer_is_refused(
    cli: Cli, image: Path, key: Path, decoy: tuple[str, Path]
) -> None:
    device, backing = decoy
    layer = image / "layer0.luks"
    layer.unlink()
    os.link(backing, layer)
    for args in (("run", "-k", str(key), str(image)), ("shred", str(image))):
        code, _, err = cli(*args)
        assert code == own_status(ExitCode.USAGE, args)
        assert err.startswith(f"error: layer file {layer} has 2 hard links; refusing to use or"
                              " erase it: ")  # fmt: skip
    layer.unlink()
    os.mknod(layer, 0o600 | stat.S_IFBLK, os.stat(device).st_rdev)
    for args in (("run", "-k", str(key), str(image)), ("shred", str(image))):
        code, _, err = cli(*args)
        assert (code, err) == (own_status(ExitCode.USAGE, args), f"error: layer file {layer} is not a regular"
                               " file (a block device node): the image is damaged; copy it"
                               " again\n")  # fmt: skip
    assert keyslots(backing) == 1


def test_swap_in_the_erase_window_erases_the_opened_file(
    cli: Cli, image: Path, key: Path, decoy: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner of the image directory swaps the layer for a symlink to a device after `run`
    checked and opened it, just before the erase at start (driven by the crash-point hook)."""
    device, backing = decoy
    layer, moved = image / "layer0.luks", image / "moved.luks"
    header_copy = run_root() / ".images" / state.image_id(str(image)) / "layer0.hdr"
    swapped: list[bool] = []

    def hook() -> None:
        if header_copy.exists() and not swapped:  # the last step before the erase
            layer.rename(moved)
            layer.symlink_to(device)
            swapped.append(True)

    monkeypatch.setattr(journal, "crash_point", hook)
    assert cli.ok("run", "-k", str(key), str(image), "--", "echo", "ran") == "ran\n"
    assert swapped
    assert keyslots(moved) == 0  # the file that was checked and opened is the one erased
    assert keyslots(backing) == 1 and keyslots(Path(device)) == 1  # the device is untouched
    # (and its loop device, attached from the renamed file, is gone: no_leaks checks)


def test_gc_erases_only_the_file_the_container_opened(
    cli: Cli, image: Path, key: Path, decoy: tuple[str, Path]
) -> None:
    """A shredding start crashed before its erase; the layer is then swapped; gc must refuse."""
    device, backing = decoy
    assert crash_at(2, "start", "--name", "crashed", "-k", str(key), str(image))
    layer, moved = image / "layer0.luks", image / "moved.luks"
    layer.rename(moved)
    layer.symlink_to(device)
    code, _, err = cli("gc")
    assert code == ExitCode.FAILURE
    assert f"crashed: layer file {layer} is a symbolic link; refusing to follow it" in err
    assert keyslots(backing) == 1 and keyslots(moved) == 1
    layer.unlink()
    moved.rename(layer)
    out = cli.ok("gc")
    assert "cleaned up container crashed" in out and f"shredded {image}" in out
    assert slots(image) == [0]


def test_image_directory_others_can_write_is_refused(
    cli: Cli, image: Path, key: Path, tmp_path: Path
) -> None:
    hint = ("whoever can write it can swap its files while root uses them; make it root's and"
            " not writable by others (chown root: DIR; chmod go-w DIR), or pass"
            " --allow-shared-dir\n")  # fmt: skip
    other = tmp_path / "other.key"
    cli.ok("keygen", str(other))
    image.chmod(0o777)
    keys_before = (image / "keys.json").read_bytes()
    rekey = ("rekey", str(image), "-k", str(key), "--add-key", str(other))
    for args in (("run", "-k", str(key), str(image)), ("shred", str(image)), rekey):
        code, _, err = cli(*args)
        assert (code, err) == (own_status(ExitCode.USAGE, args), f"error: image directory {image} is writable by"
                               f" users other than root (mode 0777): {hint}")  # fmt: skip
    assert (image / "keys.json").read_bytes() == keys_before  # rekey changed nothing (issue 21)
    assert cli.ok(*rekey, "--allow-shared-dir").startswith("added ")
    assert cli.ok("run", "--keep", "--allow-shared-dir", "-k", str(other), str(image), "--",
                  "echo", "allowed") == "allowed\n"  # fmt: skip
    image.chmod(0o755)
    os.chown(image, 1000, 1000)
    code, _, err = cli("start", "--name", "x", "-k", str(key), str(image))
    assert code == ExitCode.USAGE
    assert err == (f"error: image directory {image} is writable by users other than root"
                   f" (owned by uid 1000): {hint}")  # fmt: skip
    assert slots(image) == [1] and leftovers() == []


def test_hostile_passwd_and_group_do_not_hang_or_leak(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    """/etc/passwd a FIFO (reading it blocked `run -u` under the host-wide lock) and
    /etc/group a symlink to /dev/zero (it ate memory)."""
    tree = tmp_path / "tree"
    shutil.copytree(busybox_tree, tree, symlinks=True)
    (tree / "etc/passwd").unlink()
    os.mkfifo(tree / "etc/passwd")
    (tree / "etc/group").unlink()
    (tree / "etc/group").symlink_to("/dev/zero")
    image = images / "hostile-etc"
    cli.ok("build", "-k", str(key_file), "-o", str(image), str(tree))
    code, _, err = cli("run", "--keep", "-u", "app", "-k", str(key_file), str(image), "--", "id")
    assert (code, err) == (ExitCode.RUN_FAILED, "error: the container's /etc/passwd is not a regular"
                           " file (a FIFO): use a numeric UID[:GID]\n")  # fmt: skip
    code, _, err = cli("run", "--keep", "-u", "0:grp", "-k", str(key_file), str(image), "--", "id")
    assert (code, err) == (ExitCode.RUN_FAILED, "error: group 'grp' is not in the container's"
                           " /etc/group: use a numeric GID\n")  # fmt: skip
