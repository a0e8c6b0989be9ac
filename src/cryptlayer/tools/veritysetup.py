"""veritysetup: a dm-verity hash tree over each whole layer file (its LUKS2 header included).

Every parameter comes from the authenticated statement (`--no-superblock`): nothing of the hash
file but its hashes is read, so nothing unauthenticated steers the check.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptlayer.errors import CommandError
from cryptlayer.tools import BLOCK, devmapper, udev

# runner (sh, logging) is imported by the two functions that run veritysetup: a teardown asks
# only `corrupted`, by ioctl.

HASH = "sha256"


def _options(salt: str) -> list[str]:
    return ["--no-superblock", "--hash", HASH, "--data-block-size", str(BLOCK),
            "--hash-block-size", str(BLOCK), "--salt", salt]  # fmt: skip


def format_tree(data: Path, tree: Path, salt: str) -> str:
    """Write the hash tree of `data` to the new file `tree`; returns the root hash (hex)."""
    from cryptlayer.tools.runner import run

    out = run(["veritysetup", "format", *_options(salt), str(data), str(tree)]).stdout
    for line in out.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Root hash":
            return value.strip()
    raise CommandError(["veritysetup", "format"], 0, f"no root hash in its output: {out!r}")


def open_verity(data: str, name: str, tree: str, root_hash: str, salt: str, blocks: int) -> str:
    """Map block device `data` checked against the tree on `tree` as /dev/mapper/NAME
    (read-only by nature; a block that fails its check is an I/O error).

    The table is what `veritysetup open --no-superblock` loads (format 1, hashes from block 0 of
    the tree device, no optional arguments), given to the kernel by ioctl: no veritysetup process
    per layer (docs/benchmarks says what one cost). The dm UUID is veritysetup's, so `gc` knows
    the mapping as cryptlayer's even when no journal does.
    """
    table = " ".join(["1", _devno(data), _devno(tree), str(BLOCK), str(BLOCK),
                      str(blocks), "0", HASH, root_hash, salt])  # fmt: skip
    sectors = blocks * BLOCK // devmapper.SECTOR
    devmapper.create(name, f"CRYPT-VERITY-{name}", "verity", sectors, table)
    udev.wait_for_node(f"/dev/mapper/{name}")
    return f"/dev/mapper/{name}"


def _devno(node: str) -> str:
    rdev = os.stat(node).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def verify(data: Path, tree: Path, root_hash: str, salt: str, blocks: int) -> bool:
    """Check every block of `data` against `tree` in userspace (no device-mapper)."""
    from cryptlayer.tools.runner import run

    try:
        run(["veritysetup", "verify", *_options(salt), "--data-blocks", str(blocks),
             str(data), str(tree), root_hash])  # fmt: skip
    except CommandError:
        return False
    return True


def corrupted(name: str) -> bool:
    """Whether the kernel found a block of mapping NAME that does not match its tree (its status
    reads `C`; `V` while every block read so far verified)."""
    return any(
        kind == "verity" and line.split()[:1] == ["C"] for kind, line in devmapper.status(name)
    )
