"""Bad input against real devices: each has its own exact error, and costs the user nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import Cli, keyslots

from cryptlayer.errors import ExitCode


def test_wrong_key_fails_and_keeps_the_image(cli: Cli, image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    cli.ok("keygen", str(other))
    code, _, err = cli("run", "--key-file", str(other), str(image), "--", "true")
    assert code == ExitCode.RUN_FAILED  # KEY for the other commands
    assert err == (
        "error: the key does not open this image:"
        f" `cryptlayer inspect {image}` lists the keys and recipients that can\n"
    )
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [1, 1]  # a typo never shreds


def test_key_on_stdin(cli: Cli, image: Path, key_file: Path) -> None:
    out = cli.ok("run", "--keep", "--key-file", "-", str(image), "--", "echo", "via-stdin",
                 input=key_file.read_bytes())  # fmt: skip
    assert out == "via-stdin\n"


def test_truncated_layer(cli: Cli, image: Path, key_file: Path) -> None:
    layer = image / "layer1.luks"
    size = layer.stat().st_size
    os.truncate(layer, size - 4096)
    code, _, err = cli("run", "--key-file", str(key_file), str(image), "--", "true")
    assert code == ExitCode.RUN_FAILED  # USAGE for the other commands
    assert err == (f"error: layer file {layer} has {size - 4096} bytes, the manifest says {size}:"
                   " the image is damaged (truncated?); copy it again\n")  # fmt: skip


def test_damaged_header(cli: Cli, image: Path, key_file: Path) -> None:
    layer = image / "layer0.luks"
    with open(layer, "r+b") as f:
        f.write(b"\0" * 8192)  # both magic signatures live in the first 16 KiB
        f.seek(16384)
        f.write(b"\0" * 8192)
    code, _, err = cli("run", "--key-file", str(key_file), str(image), "--", "true")
    assert code == ExitCode.RUN_FAILED  # TAMPERED for the other commands
    assert err == (f"error: {layer} is not a readable LUKS2 layer (no LUKS2 header): the image is"
                   " damaged or was tampered with; copy it again from a source you trust\n")  # fmt: skip


def test_shred_of_a_damaged_header(cli: Cli, image: Path) -> None:
    layer = image / "layer0.luks"
    with open(layer, "r+b") as f:
        f.write(b"\0" * 8192)
        f.seek(16384)
        f.write(b"\0" * 8192)
    code, _, err = cli("shred", str(image))
    assert code == ExitCode.USAGE
    assert err.startswith(f"error: {layer} is not a readable LUKS2 layer (")
    assert err.endswith("the image is damaged or incomplete; rebuild it\n")


def test_missing_manifest(cli: Cli, image: Path, key_file: Path) -> None:
    (image / "manifest.json").unlink()
    code, _, err = cli("run", "--key-file", str(key_file), str(image), "--", "true")
    assert code == ExitCode.RUN_FAILED  # USAGE for the other commands
    assert (
        err
        == f"error: {image}/manifest.json is missing: this is not a cryptlayer image, or it is incomplete\n"
    )


def test_no_default_command(cli: Cli, images: Path, key_file: Path, busybox_tree: Path) -> None:
    out = images / "nocmd"
    cli.ok("build", "--key-file", str(key_file), "--output", str(out), str(busybox_tree))
    code, _, err = cli("run", "--key-file", str(key_file), str(out))
    assert code == ExitCode.RUN_FAILED  # USAGE for the other commands
    assert (
        err
        == "error: the image has no default command: give one after the image: IMAGE -- COMMAND [ARG...]\n"
    )
    assert [keyslots(p) for p in sorted(out.glob("*.luks"))] == [1]


def test_build_never_overwrites(cli: Cli, image: Path, key_file: Path, busybox_tree: Path) -> None:
    before = sorted(p.name for p in image.iterdir())
    code, _, err = cli(
        "build", "--key-file", str(key_file), "--output", str(image), str(busybox_tree)
    )
    assert code == ExitCode.USAGE
    assert (
        err
        == f"error: {image} already exists: choose a new --output path (build never overwrites)\n"
    )
    assert sorted(p.name for p in image.iterdir()) == before


def test_failed_build_leaves_nothing(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"x" * 10)  # not a tar at all
    code, _, err = cli(
        "build", "--key-file", str(key_file), "--output", str(images / "i"), str(bad)
    )
    assert code == ExitCode.USAGE
    assert err == f"error: source {bad} is neither a directory nor a tar archive\n"
    assert list(images.iterdir()) == []


def test_user_workdir_env_overrides(cli: Cli, image: Path, key_file: Path) -> None:
    out = cli.ok("run", "--keep", "--key-file", str(key_file), "-e", "GREETING=hi", "-w", "/home/app",
                 "-u", "app", str(image), "--", "sh", "-c", 'echo "$GREETING $(id -u):$(id -g) $(pwd)"')  # fmt: skip
    assert out == "hi 1000:1000 /home/app\n"


def test_tar_layers(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, tmp_path: Path
) -> None:
    src = tmp_path / "tarsrc"
    (src / "opt").mkdir(parents=True)
    (src / "opt/from-tar").write_text("tar content\n")
    os.symlink("from-tar", src / "opt/link")
    archive = shutil.make_archive(str(tmp_path / "layer"), "gztar", src)
    out = images / "tarimg"
    cli.ok("build", "--key-file", str(key_file), "--output", str(out), str(busybox_tree), archive)
    got = cli.ok("run", "--key-file", str(key_file), str(out), "--", "cat", "/opt/link")
    assert got == "tar content\n"
