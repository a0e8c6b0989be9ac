"""Many containers from one image: each opens it, and the shred waits for the last of them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import MARKER_LOWER, Cli, keyslots


def slots(image: Path) -> list[int]:
    return [keyslots(p) for p in sorted(image.glob("*.luks"))]


def start(cli: Cli, image: Path, key_file: Path, name: str, *extra: str) -> Path:
    return Path(
        cli.ok("start", "--key-file", str(key_file), "--name", name, *extra, str(image)).strip()
    )


def test_shred_waits_for_the_last_user(cli: Cli, image: Path, key_file: Path) -> None:
    start(cli, image, key_file, "a")
    keeper = start(cli, image, key_file, "b", "--keep")
    start(cli, image, key_file, "c")
    code, _, err = cli("stop", "a")
    assert code == 0, err
    assert (
        err
        == f"stopped a; image {image} is still used by b, c, the last of them to stop shreds it\n"
    )
    assert slots(image) == [1, 1]
    assert (keeper / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
    cli.ok("stop", "c")
    assert slots(image) == [1, 1]
    code, _, err = cli("stop", "b")  # started with --keep, but the last user pays the debt
    assert err == f"stopped b; image {image} shredded\n"
    assert slots(image) == [0, 0]


def test_ten_at_once_in_random_order(cli: Cli, image: Path, key_file: Path) -> None:
    rng = random.Random(7)
    names = [f"many{i}" for i in range(10)]
    for name in names:
        start(cli, image, key_file, name, *(["--keep"] if rng.random() < 0.5 else []))
    rng.shuffle(names)
    for name in names[:-1]:
        cli.ok("stop", name)
        assert slots(image) == [1, 1], f"shredded while {names[-1]} still ran"
    (last,) = json.loads(cli.ok("ps", "--json"))
    rootfs = Path(last["rootfs"])
    assert (rootfs / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
    cli.ok("stop", names[-1])
    assert slots(image) == [0, 0]
    assert cli.ok("gc") == "nothing to clean up\n"


def test_fifty_start_stop_cycles(cli: Cli, image: Path, key_file: Path) -> None:
    for i in range(50):
        rootfs = start(cli, image, key_file, f"cycle{i}", "--keep")
        assert (rootfs / "data/hello.txt").is_file()
        cli.ok("stop", f"cycle{i}")
    assert slots(image) == [1, 1]
    cli.ok("start", "--key-file", str(key_file), "--name", "last", str(image))
    cli.ok("stop", "last")
    assert slots(image) == [0, 0]
