"""e2fsprogs: make, check, shrink and measure the ext4 file systems inside layers."""

from __future__ import annotations

from cryptlayer.tools import BLOCK
from cryptlayer.tools.runner import run


def make_ext4(device: str, *, inodes: int | None, label: str) -> None:
    """Make a journal-less ext4 on `device` (layers are read-only; the journal is dead weight)."""
    argv = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-m", "0", "-O", "^has_journal",
            "-L", label[:16], "-E", "root_owner=0:0,nodiscard,lazy_itable_init=1"]  # fmt: skip
    if inodes is not None:
        argv += ["-N", str(inodes)]
    run([*argv, device])


def shrink(device: str) -> int:
    """Shrink the ext4 on `device` to its minimum; return its new size in bytes.

    Only for a file system we just made and cleanly unmounted: -f skips resize2fs's demand for a
    fresh e2fsck, which would also recreate the lost+found the layer's source did not have.
    """
    run(["resize2fs", "-f", "-M", device])
    return block_count(device) * BLOCK


def block_count(device: str) -> int:
    """How many blocks the ext4 on `device` has."""
    for line in run(["dumpe2fs", "-h", device]).stdout.splitlines():
        if line.startswith("Block count:"):
            return int(line.split(":", 1)[1])
    raise ValueError(f"dumpe2fs printed no block count for {device}")
