"""OCI layouts and archives: reading, digests, whiteouts and xattrs (extraction needs no device)."""

from __future__ import annotations

import json
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


# ---- issue 22 item 3: the OCI formats in one home (cryptlayer/oci.py) --------------------------


def test_one_digest_form_everywhere() -> None:
    """One check of a digest's form: sha256 and 64 lowercase hex digits, nothing else."""
    from cryptlayer import oci

    good = "sha256:" + "0123456789abcdef" * 4
    assert oci.is_digest(good) and oci.check_digest(good, lambda: AssertionError()) == good
    bad: list[object] = [good.upper(), "SHA256:" + good[7:], good[:-1], good + "0", good + "\n",
                         "sha512:" + "0" * 128, "sha256:" + "g" * 64, "sha256:../../etc/passwd",
                         "sha256:" + "\u0661" * 64, None, 5, [good]]  # fmt: skip
    for value in bad:
        assert not oci.is_digest(value), value
        with pytest.raises(UsageError, match="said by the caller"):
            oci.check_digest(value, lambda: UsageError("said by the caller"))
    with pytest.raises(ValueError, match="is not a sha256 digest"):
        oci.blob_path("sha256:../../../etc/passwd")
    assert oci.blob_path(good) == f"blobs/sha256/{good[7:]}"
    assert (
        oci.digest_of(b"")
        == oci.digest_of(oci.hasher())
        == ("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    )
    assert oci.is_sha256_hex(good[7:]) and not oci.is_sha256_hex(good[7:].upper())


def test_every_digest_check_refuses_the_same_forms(tmp_path: Path) -> None:
    """--digest, a docker:// reference, a pulled manifest's descriptors, a layout's index and a
    build source's descriptors all take and refuse the same strings (each in its own words)."""
    from cryptlayer.distribution import artifact, layout, registry
    from cryptlayer.image import statement

    good = "sha256:" + "ab" * 32
    for value in ["sha256:" + "AB" * 32, good[:-1], "sha256:" + "\u0661" * 64]:
        with pytest.raises(UsageError, match="is not sha256:<64 lowercase hex digits>"):
            statement.check_digest(value)
        with pytest.raises(UsageError, match="is not a sha256 digest"):
            registry.parse_reference(f"docker://example.com/a/b@{value}")
        with pytest.raises(ValueError, match="is not a sha256 digest"):
            artifact._digest(value, "config")
        with pytest.raises(UsageError, match="is not a sha256 digest"):
            layout._hex(value)
        files = image_files([(LOWER, "none")], CONFIG)
        index = json.loads(files["index.json"])
        index["manifests"][0]["digest"] = value
        files["index.json"] = json.dumps(index).encode()
        write_dir(tmp_path / "lay", files)
        with (
            pytest.raises(UsageError, match="is not a sha256 digest"),
            open_image(f"oci:{tmp_path / 'lay'}"),
        ):
            pass
    assert statement.check_digest(good) == good
    assert registry.parse_reference(f"docker://example.com/a/b@{good}").digest == good


def test_a_build_source_index_is_checked_as_a_pulled_one(tmp_path: Path) -> None:
    """An `oci:` build source's index.json is read as `pull` reads a layout's: at most 4 MiB
    (fsutil.MAX_IMAGE_JSON) and every field checked. Failed before: build read it with a 16 MiB
    limit and took a tag that is not a string, or a platform that is not an object."""
    files = image_files([(LOWER, "none")], CONFIG)
    index = json.loads(files["index.json"])
    for entry, why in [
        ({"org.opencontainers.image.ref.name": 5}, "manifests[0]'s org.opencontainers.image"
                                                   ".ref.name is not a string"),
        ("platform", "manifests[0]'s mediaType or platform is malformed"),
    ]:  # fmt: skip
        changed = json.loads(json.dumps(index))
        if entry == "platform":
            changed["manifests"][0]["platform"] = "linux/amd64"
        else:
            changed["manifests"][0]["annotations"] = entry
        files["index.json"] = json.dumps(changed).encode()
        write_dir(tmp_path / "lay", files)
        with pytest.raises(UsageError) as err, open_image(f"oci:{tmp_path / 'lay'}"):
            pass
        assert err.value.message == f"{tmp_path}/lay/index.json is not valid ({why})"
    files["index.json"] = json.dumps(index).encode() + b" " * (5 << 20)
    write_dir(tmp_path / "lay", files)
    with pytest.raises(UsageError) as err, open_image(f"oci:{tmp_path / 'lay'}"):
        pass
    assert err.value.message == f"{tmp_path}/lay/index.json is too large for image metadata"


def test_the_layout_reader_opens_only_regular_files_below_it(tmp_path: Path) -> None:
    """One reader for build's `oci:` sources and distribution's layouts: no symlink anywhere
    below the layout, nothing but a regular file opened, index.json capped."""
    import errno

    from cryptlayer import oci
    from cryptlayer.fsutil import MAX_IMAGE_JSON, NotRegularError, UntrustedFileError

    root = write_dir(tmp_path / "lay", image_files([(LOWER, "none")], CONFIG))
    reader = oci.LayoutReader(root)
    entries = oci.index_entries(reader.index(), "index.json")
    assert len(entries) == 1 and entries[0].tag == "latest"
    os.close(reader.open_blob(entries[0].digest))
    (root / "blobs/link").symlink_to(root / "index.json")
    with pytest.raises(OSError) as err:
        reader.open("blobs/link")
    assert err.value.errno == errno.ELOOP
    (tmp_path / "outside").mkdir()
    (root / "dir").symlink_to(tmp_path / "outside")
    (tmp_path / "outside/x").write_text("x")
    with pytest.raises(OSError) as err:
        reader.open("dir/x")
    assert err.value.errno == errno.ELOOP
    os.mkfifo(root / "fifo")
    with pytest.raises(NotRegularError, match="fifo is not a regular file \\(a FIFO\\)"):
        reader.open("fifo")
    (root / "index.json").write_bytes(b" " * (MAX_IMAGE_JSON + 1))
    with pytest.raises(UntrustedFileError, match="more than"):
        reader.index()
    with pytest.raises(oci.NotALayoutError):
        oci.LayoutReader(tmp_path / "absent").open("index.json")


def test_a_layer_digest_in_a_statement_is_none_or_a_digest(tmp_path: Path) -> None:
    """manifest.json's layer `digest` (the source's diff_id, shown by inspect) is "" or a digest,
    as build writes it. Failed before: any string was taken, and shown."""
    from luksfixtures import fake_image

    from cryptlayer.errors import DamagedImageError
    from cryptlayer.image import manifest as manifest_mod

    image = fake_image(tmp_path / "image")
    doc = json.loads((image / "manifest.json").read_text())
    for good in ["", "sha256:" + "0" * 64]:
        doc["layers"][0]["digest"] = good
        (image / "manifest.json").write_text(json.dumps(doc))
        assert manifest_mod.load(image).layers[0].digest == good
    for bad in ["sha256:" + "A" * 64, "sha256:\x1b[2J", "x"]:
        doc["layers"][0]["digest"] = bad
        (image / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(DamagedImageError) as err:
            manifest_mod.load(image)
        assert err.value.message.endswith("layer 0's digest is not a sha256 digest"), err.value
