"""Figure 3's reference: what dm-crypt itself can write here."""

from __future__ import annotations

import re
from typing import Any

from common import MiB, sh, timed

from cryptlayer.tools import cryptsetup, losetup
from sections.base import (
    WORK,
    settings,
)


def dm_crypt_limit() -> dict[str, Any]:
    """Figure 3's reference: what dm-crypt itself can write here."""
    bench = sh(
        "cryptsetup",
        "benchmark",
        "--cipher",
        cryptsetup.CIPHER,
        "--key-size",
        str(cryptsetup.KEY_BITS),
    )
    match = re.search(r"aes-xts\s+512b\s+([\d.]+)\s+MiB/s\s+([\d.]+)\s+MiB/s", bench)
    path = WORK / "dd.img"
    WORK.mkdir(parents=True, exist_ok=True)
    size = 512
    with open(path, "wb") as f:
        f.truncate(size * MiB)
    loop = losetup.attach(path, readonly=False)
    try:
        sh(
            "cryptsetup",
            "open",
            "--type",
            "plain",
            "--cipher",
            cryptsetup.CIPHER,
            "--key-size",
            str(cryptsetup.KEY_BITS),
            "--key-file",
            "/dev/urandom",
            "--keyfile-size",
            "64",
            loop,
            "cryptlayer-bench-dd",
        )
        try:
            dd = timed(
                lambda: sh(
                    "dd",
                    "if=/dev/zero",
                    "of=/dev/mapper/cryptlayer-bench-dd",
                    "bs=4M",
                    f"count={size // 4}",
                    "oflag=direct",
                    "conv=fsync",
                ),
                settings.runs,
            )
        finally:
            sh("cryptsetup", "close", "cryptlayer-bench-dd")
    finally:
        losetup.detach(loop)
        path.unlink()
    return {
        "cryptsetup_benchmark_encrypt_mib_s": float(match.group(1)) if match else None,
        "cryptsetup_benchmark_decrypt_mib_s": float(match.group(2)) if match else None,
        "dd_through_mapping_mib_s": size / min(dd),
    }
