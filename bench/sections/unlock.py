"""Figure 2: unlocking a 10-layer image, with a key file and with a passphrase."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from common import MiB, make_tree, sh, summary, timed

from cryptlayer.image import envelope
from cryptlayer.keys.sources import Credential, Secret
from cryptlayer.tools import cryptsetup, devmapper, losetup
from sections.base import (
    PASSPHRASE,
    WORK,
    build,
    key,
    settings,
    start_stop,
)


def unlock_cost() -> dict[str, Any]:
    """Figure 2: a 10-layer image opened with a key file and with a passphrase."""
    work = WORK / "unlock"
    tree = work / "tree"
    make_tree(tree, 10 * MiB, 10)
    image = work / "img"
    build(sorted(tree.iterdir()), image, passphrase=True)
    with_key = [start_stop(image, Credential(key=key())) for _ in range(settings.runs)]
    with_pass = [
        start_stop(image, Credential(passphrase=Secret(bytearray(PASSPHRASE))))
        for _ in range(settings.runs)
    ]
    entries = envelope.load(image).entries
    argon = timed(
        lambda: envelope.unlock(
            image, entries, Credential(passphrase=Secret(bytearray(PASSPHRASE)))
        ).wipe(),
        settings.runs,
        cold=False,
    )
    # One layer's unlock alone: `cryptsetup open` with the image key, and what merely starting
    # the cryptsetup binary costs here (under emulation, most of it).
    image_key = envelope.unlock(image, entries, Credential(key=key()))
    loop = losetup.attach(image / "layer0.luks", readonly=True)
    mapping = "cryptlayer-bench-unlock"

    def close_if_open() -> None:
        if Path("/dev/mapper", mapping).exists():
            devmapper.remove(mapping)

    try:
        opens = timed(
            lambda: cryptsetup.open_luks(loop, mapping, image_key, readonly=True),
            settings.runs * 3,
            setup=close_if_open,
            cold=False,
        )
        close_if_open()
    finally:
        close_if_open()
        losetup.detach(loop)
        image_key.wipe()
    exec_only = timed(lambda: sh("cryptsetup", "--version"), settings.runs * 3, cold=False)
    kdf = next(e for e in entries if e.kind == "passphrase")
    shutil.rmtree(work)
    return {
        "layers": 10,
        "start_with_key_file": summary(with_key),
        "start_with_passphrase": summary(with_pass),
        "argon2id_unwrap": summary(argon),
        "argon2id_cost": {
            "iterations": kdf.param("iterations"),
            "memory_kib": kdf.param("memory_kib"),
        },
        "cryptsetup_open_one_layer": summary(opens),
        "cryptsetup_exec_only": summary(exec_only),
    }
