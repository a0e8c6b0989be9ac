"""Many containers from one image: the layers are opened once and shared; the disk's copy is
erased when the first shredding container starts; the last container closes the layers."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from conftest import MARKER_LOWER, Cli, slots

from cryptlayer.errors import ExitCode
from cryptlayer.paths import run_root
from cryptlayer.runtime import state
from cryptlayer.runtime.layers import mapping_prefix
from cryptlayer.tools import udev


def start(cli: Cli, image: Path, key_file: Path, name: str, *extra: str) -> Path:
    return Path(
        cli.ok("start", "--key-file", str(key_file), "--name", name, *extra, str(image)).strip()
    )


def shared_mappings(image: Path) -> list[str]:
    return udev.mappings(mapping_prefix(str(image)))


SHARED = 2 * 2  # the template's two layers, each a dm-verity mapping with a LUKS mapping on it


def test_no_joining_an_image_shredded_while_open(cli: Cli, image: Path, key_file: Path) -> None:
    start(cli, image, key_file, "a", "--keep")
    cli.ok("shred", str(image))  # while a runs: its layers stay open, the disk's keyslots go
    assert slots(image) == [0, 0]
    code, _, err = cli("start", "--key-file", str(key_file), "--name", "b", "--keep", str(image))
    assert code == ExitCode.ERASED, err  # the open layers do not let a new container in
    assert err.startswith(f"error: image {image} was shredded (crypto-erased)")
    cli.ok("stop", "a")
    assert shared_mappings(image) == []


def test_erased_at_start_and_the_last_user_closes(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    start(cli, image, key_file, "a", "--keep")
    assert slots(image) == [1, 1]  # --keep: nothing erased
    assert len(shared_mappings(image)) == SHARED
    backups = []  # the intact headers, as cryptsetup itself backs them up
    for i, layer in enumerate(sorted(image.glob("*.luks"))):
        backups.append(tmp_path / f"layer{i}.backup")
        subprocess.run(["cryptsetup", "luksHeaderBackup", str(layer), "--header-backup-file",
                        str(backups[-1])], check=True)  # fmt: skip
    start(cli, image, key_file, "b")  # will shred: the disk's keyslots go now
    assert slots(image) == [0, 0]
    copies = sorted((run_root() / ".images").rglob("*.hdr"))
    assert [p.name for p in copies] == ["layer0.hdr", "layer1.hdr"]
    # cryptlayer writes them itself: byte for byte the file luksHeaderBackup writes, owner-read
    same = [p.read_bytes() == b.read_bytes() for p, b in zip(copies, backups, strict=True)]
    assert same == [True, True]
    assert [p.stat().st_mode & 0o777 for p in copies] == [0o400, 0o400]
    keeper = start(cli, image, key_file, "c", "--keep")  # joins, its key checked against /run
    assert len(shared_mappings(image)) == SHARED  # still one set of layer mappings for three
    assert (keeper / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"

    stranger = tmp_path / "stranger.key"
    cli.ok("keygen", str(stranger))
    code, _, err = cli("start", "--key-file", str(stranger), "--name", "d", str(image))
    assert code == ExitCode.KEY, err  # joining an open image still needs the key
    assert err.startswith("error: ")

    code, _, err = cli("stop", "b")
    assert code == 0, err
    assert err == f"stopped b; image {image} shredded; its layers stay open for a, c\n"
    cli.ok("stop", "a")
    assert (keeper / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
    code, _, err = cli("stop", "c")
    assert err == "stopped c\n"
    assert shared_mappings(image) == []
    assert not list((run_root() / ".images").rglob("*.hdr"))  # the last copy of the keyslots
    code, _, err = cli("start", "--key-file", str(key_file), "--name", "e", str(image))
    assert code == ExitCode.ERASED, err


def test_ten_at_once_in_random_order(cli: Cli, image: Path, key_file: Path) -> None:
    rng = random.Random(7)
    names = [f"many{i}" for i in range(10)]
    for name in names:
        start(cli, image, key_file, name, *(["--keep"] if rng.random() < 0.5 else []))
    assert slots(image) == [0, 0]  # at least one of them shreds
    assert len(shared_mappings(image)) == SHARED
    assert len(udev.mappings("cryptlayer-")) == SHARED + 10  # shared layers, one scratch each
    rng.shuffle(names)
    for name in names[:-1]:
        cli.ok("stop", name)
        assert len(shared_mappings(image)) == SHARED, f"closed while {names[-1]} still ran"
    (last,) = json.loads(cli.ok("ps", "--json"))
    rootfs = Path(last["rootfs"])
    assert (rootfs / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
    cli.ok("stop", names[-1])
    assert shared_mappings(image) == []
    assert state.all_openings() == []
    assert cli.ok("gc") == "nothing to clean up\n"


def test_fifty_start_stop_cycles(cli: Cli, image: Path, key_file: Path) -> None:
    for i in range(50):
        rootfs = start(cli, image, key_file, f"cycle{i}", "--keep")
        assert (rootfs / "data/hello.txt").is_file()
        cli.ok("stop", f"cycle{i}")
        assert shared_mappings(image) == []
    assert slots(image) == [1, 1]
    cli.ok("start", "--key-file", str(key_file), "--name", "last", str(image))
    assert slots(image) == [0, 0]
    cli.ok("stop", "last")
    assert slots(image) == [0, 0]
