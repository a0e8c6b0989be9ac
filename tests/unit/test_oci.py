"""OCI layouts and archives: reading, digests, whiteouts and xattrs (extraction needs no device)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from ocifixtures import (
    CAP,
    CONFIG,
    MIDDLE,
    TOP,
    docker_archive_files,
    image_files,
    write_dir,
    write_tar,
)

from cryptlayer.build.oci import open_image, split_reference
from cryptlayer.build.sources import OciLayerSource, SquashSource
from cryptlayer.errors import UsageError

LOWER, UPPER = MIDDLE, TOP  # the image both tiers use


def test_split_reference() -> None:
    assert split_reference("oci:/a/b:v1") == ("oci", "/a/b", "v1")
    assert split_reference("oci:/a/b") == ("oci", "/a/b", "")
    assert split_reference("oci-archive:x.tar:t") == ("oci-archive", "x.tar", "t")
    assert split_reference("docker-archive:/x:y.tar") == ("docker-archive", "/x:y.tar", "")
    assert split_reference("/plain/dir") is None


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_oci_layout_layers_and_config(tmp_path: Path, how: str) -> None:
    write_dir(tmp_path / "lay", image_files([(LOWER, how), (UPPER, how)], CONFIG, tag="v1"))
    with open_image(f"oci:{tmp_path / 'lay'}:v1") as image:
        assert len(image.layers) == 2
        cfg = image.config
        assert (cfg.entrypoint, cfg.cmd, cfg.env, cfg.workdir, cfg.user) == (
            ("/bin/sh", "-c"),
            tuple(CONFIG["Cmd"]),
            ("GREETING=from-config",),
            "/srv",
            "app",
        )
        assert cfg.exposed_ports == ("8080/tcp",)
        assert cfg.labels == (("org.example", "yes"),)
        for layer in image.layers:
            OciLayerSource(layer).measure()  # checks blob digest and diff_id


def test_archives(tmp_path: Path) -> None:
    write_tar(tmp_path / "o.tar", image_files([(LOWER, "gzip")], CONFIG))
    with open_image(f"oci-archive:{tmp_path / 'o.tar'}") as image:
        assert OciLayerSource(image.layers[0]).measure().content_bytes == len(
            b"keep\n" + b"gone\n" + b"old\n"
        )
    write_tar(tmp_path / "d.tar", docker_archive_files([LOWER, UPPER], CONFIG))
    with open_image(f"docker-archive:{tmp_path / 'd.tar'}") as image:
        assert len(image.layers) == 2
        assert image.config.cmd == tuple(CONFIG["Cmd"])
        OciLayerSource(image.layers[1]).measure()


def test_unknown_tag_and_ambiguous_index(tmp_path: Path) -> None:
    write_dir(tmp_path / "lay", image_files([(LOWER, "none")], CONFIG, tag="v1"))
    with (
        pytest.raises(UsageError, match="has no image tagged 'v2'"),
        open_image(f"oci:{tmp_path / 'lay'}:v2"),
    ):
        pass


def test_corrupted_blob_is_refused(tmp_path: Path) -> None:
    files = image_files([(LOWER, "gzip")], CONFIG)
    blob = next(n for n, d in files.items() if d.startswith(b"\x1f\x8b"))
    files[blob] = files[blob][:-8] + b"corrupt!"
    write_dir(tmp_path / "lay", files)
    with open_image(f"oci:{tmp_path / 'lay'}") as image, pytest.raises(UsageError) as err:
        OciLayerSource(image.layers[0]).measure()
    assert f"does not match its digest sha256:{blob.rsplit('/', 1)[1]}" in str(err.value)
    assert "the image is corrupted; fetch it again" in str(err.value)


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    write_tar(tmp_path / "d.tar", docker_archive_files([LOWER], CONFIG))
    files = docker_archive_files([LOWER], CONFIG)
    files["layer0/layer.tar"] = UPPER  # the config still names LOWER's diff_id
    write_tar(tmp_path / "bad.tar", files)
    with (
        open_image(f"docker-archive:{tmp_path / 'bad.tar'}") as image,
        pytest.raises(UsageError, match="does not match its diff_id"),
    ):
        OciLayerSource(image.layers[0]).measure()


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="chroot, mknod and trusted xattrs need root"
)


@needs_root
def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    write_dir(tmp_path / "lay", image_files([(LOWER, "none"), (UPPER, "gzip")], CONFIG))
    target = tmp_path / "layer"
    target.mkdir()
    with open_image(f"oci:{tmp_path / 'lay'}") as image:
        OciLayerSource(image.layers[1]).populate(target)
    gone = os.lstat(target / "etc/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(target / "opt", "trusted.overlay.opaque") == b"y"
    ping = target / "usr/bin/ping"
    assert ping.stat().st_mode & 0o7777 == 0o4755
    assert os.getxattr(ping, "security.capability") == CAP
    assert (target / "usr/bin/ping2").stat().st_ino == ping.stat().st_ino
    assert os.readlink(target / "usr/bin/p") == "ping"
    assert stat.S_ISFIFO(os.lstat(target / "run/fifo").st_mode)
    owned = os.lstat(target / "home/app/owned")
    assert (owned.st_uid, owned.st_gid, owned.st_mtime) == (1000, 1000, 1_700_000_000)
    assert (
        os.lstat(target / "opt").st_mtime == 1_700_000_000
    )  # directories too, after their children


@needs_root
def test_squash_applies_whiteouts(tmp_path: Path) -> None:
    write_dir(tmp_path / "lay", image_files([(LOWER, "none"), (UPPER, "zstd")], CONFIG))
    target = tmp_path / "layer"
    target.mkdir()
    with open_image(f"oci:{tmp_path / 'lay'}") as image:
        SquashSource(tuple(OciLayerSource(layer) for layer in image.layers)).populate(target)
    assert sorted(os.listdir(target / "etc")) == ["keep"]
    assert sorted(os.listdir(target / "opt")) == ["new"]
    assert os.getxattr(target / "usr/bin/ping", "security.capability") == CAP
