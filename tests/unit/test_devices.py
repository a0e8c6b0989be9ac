"""Device nodes in a build's sources: those under /dev are left out with one line saying how
many (a debootstrap tree and every OCI layer made from one carries eight), any other is refused
unless --drop-devices leaves it out too, named; overlay whiteouts (0:0) stay. The VM tier builds
and runs such a tree (tests/vm/test_oci_images.py)."""

from __future__ import annotations

import os
import stat
import tarfile
from contextlib import ExitStack
from pathlib import Path

import pytest
from ocifixtures import CONFIG, Entry, image_files, layer_tar, write_dir

from cryptlayer.build import builder as build
from cryptlayer.build.sources import DirectorySource, Measure, OciLayerSource, TarSource
from cryptlayer.errors import UsageError

# What debootstrap (and so `umoci`, `podman import` and `docker export` of its tree) puts in /dev.
DEV_NODES = {"console": (5, 1), "full": (1, 7), "null": (1, 3), "ptmx": (5, 2),
             "random": (1, 8), "tty": (5, 0), "urandom": (1, 9), "zero": (1, 5)}  # fmt: skip
LEFT_OUT = "left out 8 device nodes under /dev of {} (the container gets /dev from the runtime)"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chroot need root")


def debootstrap_like(root: Path) -> Path:
    """A tree with debootstrap's /dev: eight nodes, pts/ and shm/, and a whiteout."""
    (root / "dev/pts").mkdir(parents=True)
    (root / "dev/shm").mkdir()
    for name, (major, minor) in DEV_NODES.items():
        os.mknod(root / "dev" / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
    os.mknod(root / "dev/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # a whiteout: kept
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("box\n")
    os.utime(root / "dev", ns=(1, 10**18))
    return root


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its file type and rdev."""
    return {
        str(p.relative_to(root)): (stat.S_IFMT(p.lstat().st_mode), p.lstat().st_rdev)
        for p in root.rglob("*")
    }


WHAT_IS_KEPT = {
    "dev": (stat.S_IFDIR, 0), "dev/pts": (stat.S_IFDIR, 0), "dev/shm": (stat.S_IFDIR, 0),
    "dev/gone": (stat.S_IFCHR, 0), "etc": (stat.S_IFDIR, 0), "etc/hostname": (stat.S_IFREG, 0),
}  # fmt: skip


def test_directory_leaves_out_the_nodes_under_dev(tmp_path: Path) -> None:
    tree = debootstrap_like(tmp_path / "tree")
    source = DirectorySource(tree)
    measure = source.measure()
    assert (measure.dev_nodes, measure.dropped) == (8, ())
    assert measure.left_out(str(tree)) == [LEFT_OUT.format(tree)]  # one line, not eight
    layer = tmp_path / "layer"
    layer.mkdir()
    source.populate(layer)
    assert listing(layer) == WHAT_IS_KEPT
    assert (layer / "dev").stat().st_mtime_ns == 10**18  # as the source has it


def test_directory_refuses_a_device_elsewhere_unless_dropped(tmp_path: Path) -> None:
    tree = debootstrap_like(tmp_path / "tree")
    os.mknod(tree / "etc/evil", stat.S_IFCHR | 0o666, os.makedev(1, 1))  # /dev/mem
    with pytest.raises(UsageError) as refused:
        DirectorySource(tree).measure()
    assert str(refused.value) == (
        f"{tree}/etc/evil is a character device node (1:1): an image may carry device nodes"
        " only in /dev, which build leaves out (the container gets /dev from the runtime);"
        " remove it, or pass --drop-devices to leave it out"
    )
    source = DirectorySource(tree, drop_devices=True)
    measure = source.measure()
    assert measure.dropped == (f"{tree}/etc/evil (character device 1:1)",)
    assert measure.left_out(str(tree)) == [
        LEFT_OUT.format(tree),
        f"left out {tree}/etc/evil (character device 1:1): --drop-devices",
    ]
    layer = tmp_path / "layer"
    layer.mkdir()
    source.populate(layer)
    assert listing(layer) == WHAT_IS_KEPT


def test_directory_checks_what_was_copied_not_what_was_measured(tmp_path: Path) -> None:
    """A node made between measure and copy is caught in the layer itself."""
    tree = debootstrap_like(tmp_path / "tree")
    source = DirectorySource(tree)
    source.measure()
    os.mknod(tree / "etc/late", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(UsageError, match=r"tree/etc/late is a block device node \(7:0\)"):
        source.populate(layer)


def dev_tar(extra: list[Entry]) -> bytes:
    return layer_tar([
        Entry("dir", "dev", mode=0o755), Entry("dir", "dev/pts", mode=0o755),
        *[Entry("char", f"./dev/{name}", mode=0o666, device=rdev)
          for name, rdev in DEV_NODES.items()],
        Entry("char", "dev/gone", mode=0o600),  # 0:0, a whiteout
        Entry("file", "etc/hostname", b"box\n"), *extra,
    ])  # fmt: skip


TAR_KEPT = {"dev": (stat.S_IFDIR, 0), "dev/pts": (stat.S_IFDIR, 0), "dev/gone": (stat.S_IFCHR, 0),
            "etc": (stat.S_IFDIR, 0), "etc/hostname": (stat.S_IFREG, 0)}  # fmt: skip


def test_tar_leaves_out_the_nodes_under_dev(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    path.write_bytes(dev_tar([]))
    measure = TarSource(path).measure()
    assert (measure.dev_nodes, measure.dropped) == (8, ())
    assert measure.inodes == 5  # the root, dev, dev/pts, dev/gone, etc/hostname: no node
    layer = tmp_path / "layer"
    layer.mkdir()
    TarSource(path).populate(layer)
    assert listing(layer) == TAR_KEPT


@pytest.mark.parametrize("how", ["node", "hard link to /dev/null"])
def test_tar_refuses_a_device_elsewhere_unless_dropped(tmp_path: Path, how: str) -> None:
    evil = (Entry("char", "etc/evil", mode=0o666, device=(1, 1)) if how == "node"
            else Entry("hardlink", "etc/evil", target="dev/null"))  # fmt: skip
    rdev = "1:1" if how == "node" else "1:3"
    path = tmp_path / "layer.tar"
    path.write_bytes(dev_tar([evil]))
    refused = rf"layer.tar:etc/evil is a character device node \({rdev}\): .* --drop-devices"
    with pytest.raises(UsageError, match=refused):
        TarSource(path).measure()
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(UsageError, match=r"etc/evil is a character device node"):
        TarSource(path).populate(layer)  # checked again while extracting
    assert not (layer / "etc/evil").exists()
    measure = TarSource(path, drop_devices=True).measure()
    assert measure.dropped == (f"{path}:etc/evil (character device {rdev})",)
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    TarSource(path, drop_devices=True).populate(dropped)
    assert listing(dropped) == TAR_KEPT


def test_oci_layer_with_dev_nodes(tmp_path: Path) -> None:
    """What `umoci` makes of a debootstrap tree: its layer holds /dev's nodes."""
    layout = write_dir(tmp_path / "lay", image_files([(dev_tar([]), "gzip")], CONFIG))
    with ExitStack() as stack:
        parsed, _ = build._expand(stack, [f"oci:{layout}"], drop_devices=False)
        (source,) = parsed
        assert isinstance(source, OciLayerSource)
        measure = source.measure()
        assert measure.dev_nodes == 8
        layer = tmp_path / "layer"
        layer.mkdir()
        source.populate(layer)
    assert listing(layer) == TAR_KEPT


def test_squashed_layers_add_up_what_they_leave_out() -> None:
    one = Measure(1, 1, 1, 8, ("a:etc/x (block device 8:0)",))
    two = Measure(1, 1, 1, 1, ())
    assert (one + two).left_out("l") == [
        "left out 9 device nodes under /dev of l (the container gets /dev from the runtime)",
        "left out a:etc/x (block device 8:0): --drop-devices",
    ]


@pytest.mark.parametrize("name", ["dev", "dev/../etc/x", "devices/null"])
def test_tar_device_not_below_dev_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "layer.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(info)
    with pytest.raises(UsageError, match=f"layer.tar:{name} is a character device node"):
        TarSource(path).measure()


def test_device_nodes_are_refused_but_whiteouts_kept(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    os.mknod(tree / "whiteout", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    DirectorySource(tree).measure()  # an overlay whiteout is fine
    os.mknod(tree / "mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))
    with pytest.raises(UsageError, match=r"tree/mem is a character device node \(1:1\)"):
        DirectorySource(tree).measure()
    tar_path = tmp_path / "layer.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("srv/sda")  # (under /dev it would be left out: test_devices.py)
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(info)
    with pytest.raises(UsageError, match=r"layer.tar:srv/sda is a block device node \(8:0\)"):
        TarSource(tar_path).measure()
