"""Figure 10: what dm-verity costs one layer."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from common import MiB, drop_caches, make_tree, sh, summary, timed

from cryptlayer.image import envelope, manifest
from cryptlayer.keys.sources import Credential
from cryptlayer.tools import cryptsetup, devmapper, losetup
from sections.base import (
    WORK,
    build,
    key,
    settings,
)


def verity_cost(size_mib: int) -> dict[str, Any]:
    """Part 6: what dm-verity costs one layer, next to the same layer without it, in one run:
    opening it (loop, [tree loop, verity,] LUKS, mount: as start does, by hand), reading through
    it, the tree's share of a build, and the tree's size."""
    from cryptlayer.tools import veritysetup

    work = WORK / "verity"
    tree = work / "tree"
    make_tree(tree, size_mib * MiB, 1)
    image = work / "img"
    build_s = build([tree / "part00"], image)
    layer = manifest.load(image).layers[0]
    path, hashes = image / layer.file, image / layer.tree
    mnt = work / "mnt"
    mnt.mkdir()
    image_key = envelope.unlock(image, envelope.load(image).entries, Credential(key=key()))
    opened: list[str] = []

    def open_layer(verified: bool) -> None:
        loop = losetup.attach(path, readonly=True)
        opened.append(loop)
        below = loop
        if verified:
            tree_loop = losetup.attach(hashes, readonly=True)
            opened.append(tree_loop)
            below = veritysetup.open_verity(loop, "cryptlayer-bench-verity", tree_loop,
                                            layer.root_hash, layer.salt, layer.blocks)  # fmt: skip
        cryptsetup.open_luks(below, "cryptlayer-bench-layer", image_key, readonly=True)
        sh("mount", "-o", "ro,noload", "/dev/mapper/cryptlayer-bench-layer", str(mnt))

    def close_layer() -> None:
        sh("umount", str(mnt))
        devmapper.remove("cryptlayer-bench-layer")
        if Path("/dev/mapper/cryptlayer-bench-verity").exists():
            devmapper.remove("cryptlayer-bench-verity")
        while opened:
            losetup.detach(opened.pop())

    def reads() -> dict[str, float]:
        seq = timed(lambda: sh("sh", "-c", f"cat {mnt}/large* > /dev/null"), settings.runs)
        small = timed(lambda: sh("sh", "-c", f"find {mnt} -name 'small*' -print0"
                                 " | xargs -0 cat > /dev/null"), settings.runs)  # fmt: skip
        return {"sequential_s": min(seq), "small_files_s": min(small)}

    out: dict[str, Any] = {"size_mib": size_mib, "build_s": build_s}
    for verified in (False, True):
        name = "verity" if verified else "plain_luks"
        opens = []
        for _ in range(settings.runs):
            drop_caches()
            begin = time.perf_counter()
            open_layer(verified)
            opens.append(time.perf_counter() - begin)
            close_layer()
        open_layer(verified)
        try:
            out[name] = {"open": summary(opens), **reads()}
        finally:
            close_layer()
    image_key.wipe()
    spare = work / "spare.verity"

    def tree_again() -> None:
        veritysetup.format_tree(path, spare, layer.salt)

    out["tree_format"] = summary(
        timed(tree_again, settings.runs, setup=lambda: spare.unlink(missing_ok=True))
    )
    out["layer_bytes"], out["tree_bytes"] = layer.size, layer.tree_size
    shutil.rmtree(work)
    return out
