"""Figure 6: reads through the container's root file system against a plain ext4."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from common import MiB, make_tree, sh, timed

from cryptlayer.image import envelope
from cryptlayer.keys.sources import Credential
from cryptlayer.runtime import container
from cryptlayer.tools import losetup
from sections.base import (
    WORK,
    build,
    key,
    settings,
)


def read_throughput(size_mib: int) -> dict[str, Any]:
    """Figure 6: reads through the container's root file system against a plain ext4 image."""
    work = WORK / "read"
    tree = work / "tree"
    make_tree(tree, size_mib * MiB, 1)
    src = tree / "part00"
    image = work / "img"
    build([src], image)
    plain = work / "plain.ext4"
    sh("mkfs.ext4", "-q", "-d", str(src), "-O", "^has_journal", str(plain), f"{size_mib * 2}M")

    def reads(root: Path) -> dict[str, float]:
        seq = timed(lambda: sh("sh", "-c", f"cat {root}/large* > /dev/null"), settings.runs)
        small = timed(
            lambda: sh(
                "sh", "-c", f"find {root} -name 'small*' -print0 | xargs -0 cat > /dev/null"
            ),
            settings.runs,
        )
        return {"sequential_s": min(seq), "small_files_s": min(small)}

    results: dict[str, Any] = {}
    mnt = work / "mnt"
    mnt.mkdir()
    loop = losetup.attach(plain, readonly=True)
    try:
        sh("mount", "-o", "ro", loop, str(mnt))
        results["plain_ext4"] = reads(mnt)
        sh("umount", str(mnt))
    finally:
        losetup.detach(loop)
    with Credential(key=key()) as credential:
        record_ = container.start(
            image, credential, container.StartOptions("bench-read", shred=False)
        )
    try:
        results["cryptlayer"] = reads(Path(record_.rootfs))
    finally:
        container.stop("bench-read")
    # The same layer opened by hand with dm-crypt's workqueues bypassed.
    image_key = envelope.unlock(image, envelope.load(image).entries, Credential(key=key()))
    loop = losetup.attach(image / "layer0.luks", readonly=True)
    try:
        sh_secret = [
            "cryptsetup",
            "open",
            "--readonly",
            "--perf-no_read_workqueue",
            "--perf-no_write_workqueue",
            "--key-file",
            "-",
            loop,
            "cryptlayer-bench-nowq",
        ]
        from cryptlayer.tools.runner import run

        run(sh_secret, secret=image_key)
        try:
            sh("mount", "-o", "ro,noload", "/dev/mapper/cryptlayer-bench-nowq", str(mnt))
            results["cryptlayer_no_workqueue"] = reads(mnt)
            sh("umount", str(mnt))
        finally:
            sh("cryptsetup", "close", "cryptlayer-bench-nowq")
    finally:
        losetup.detach(loop)
        image_key.wipe()
    shutil.rmtree(work)
    return {"size_mib": size_mib, **results}
