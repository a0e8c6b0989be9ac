"""veritysetup: a dm-verity hash tree over each whole layer file (its LUKS2 header included).

Every parameter comes from the authenticated statement (`--no-superblock`): nothing of the hash
file but its hashes is read, so nothing unauthenticated steers the check.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CommandError
from ..runner import run
from . import devmapper, udev

HASH = "sha256"
BLOCK_SIZE = 4096  # data and hash blocks: the layer's sector size, and the page size


def _options(salt: str) -> list[str]:
    return ["--no-superblock", "--hash", HASH, "--data-block-size", str(BLOCK_SIZE),
            "--hash-block-size", str(BLOCK_SIZE), "--salt", salt]  # fmt: skip


def format_tree(data: Path, tree: Path, salt: str) -> str:
    """Write the hash tree of `data` to the new file `tree`; returns the root hash (hex)."""
    out = run(["veritysetup", "format", *_options(salt), str(data), str(tree)]).stdout
    for line in out.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Root hash":
            return value.strip()
    raise CommandError(["veritysetup", "format"], 0, f"no root hash in its output: {out!r}")


def open_verity(data: str, name: str, tree: str, root_hash: str, salt: str, blocks: int) -> str:
    """Map `data` checked against `tree` as /dev/mapper/NAME (read-only by nature)."""
    run(["veritysetup", "open", *_options(salt), "--data-blocks", str(blocks),
         data, name, tree, root_hash])  # fmt: skip
    udev.wait_for_node(f"/dev/mapper/{name}")
    return f"/dev/mapper/{name}"


def verify(data: Path, tree: Path, root_hash: str, salt: str, blocks: int) -> bool:
    """Check every block of `data` against `tree` in userspace (no device-mapper)."""
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
