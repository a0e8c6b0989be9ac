"""What on this host could defeat the promise: decrypted memory reaching a disk (swap, zram
writeback, core dumps, hibernation), and storage where an erase may leave old keyslots behind
(copy-on-write file systems, flash).

"Nothing decrypted is written to disk" holds for the layers and the scratch volume (dm-crypt);
it also needs the memory of the container and of cryptlayer to stay off disk. Like tomb, which
refuses to open on unencrypted swap, `run` and `start` look before they open anything: swap that
is not on dm-crypt (a page of the container's plaintext may be swapped out and stay on disk),
zram with a backing device (it writes idle pages out), and a core_pattern that writes files
(a crash of a host process that read the plaintext). The container itself gets RLIMIT_CORE 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptlayer.tools import mount

PROC = Path("/proc")
SYS = Path("/sys")


@dataclass(frozen=True)
class Problem:
    """One thing on this host that may write decrypted memory to disk; `kind` is the name a
    host's config.toml uses to silence its warning (config.WARNINGS)."""

    kind: str  # swap, zram-writeback, core-pattern or hibernation
    text: str

    def __str__(self) -> str:
        return self.text


# File systems that write changes to new blocks: an overwritten keyslot may survive in old ones.
COPY_ON_WRITE = frozenset({"btrfs", "zfs", "bcachefs", "f2fs", "nilfs2"})


def erase_caveat(image: Path, sysfs: Path = Path("/sys")) -> str | None:
    """Why crypto-erasing `image` in place may leave old copies of its keyslots, if it may."""
    where = mount.containing(image)
    see = "keep the key off this host (docs/threat-model.md)"
    if where.fstype in COPY_ON_WRITE:
        return (
            f"{image} is on {where.fstype}, which writes changes to new blocks: old copies of"
            f" the erased keyslots may survive; {see}"
        )
    device = sysfs / "dev/block" / where.device
    for queue in (device / "queue", device / ".." / "queue"):  # a disk, or a partition's disk
        try:
            rotational = (queue / "rotational").read_text().strip()
        except OSError:
            continue
        if rotational == "0":
            return (
                f"{image} is on flash storage (device {where.device} is not rotational):"
                f" wear levelling may keep old copies of the erased keyslots; {see}"
            )
        break
    return None


def _block(sys: Path, device: str) -> Path | None:
    """/sys/class/block/NAME for a device node or MAJ:MIN."""
    if ":" in device and device.replace(":", "").isdigit():
        link = sys / "dev/block" / device
        return link.resolve() if link.exists() else None
    name = Path(device).name
    path = sys / "class/block" / name
    return path.resolve() if path.exists() else None


def _encrypted(block: Path, depth: int = 0) -> bool:
    """Whether the block device at sysfs path `block` is dm-crypt, or lies on one."""
    uuid = block / "dm/uuid"
    if uuid.exists() and uuid.read_text().startswith("CRYPT-"):
        return True
    if depth > 8:
        return False
    slaves = block / "slaves"
    below = list(slaves.iterdir()) if slaves.is_dir() else []  # a partition has none
    return bool(below) and all(_encrypted(s.resolve(), depth + 1) for s in below)


def _swap_problem(name: str, kind: str, sys: Path) -> Problem | None:
    if kind == "file":
        name = name.removesuffix("\\040(deleted)")
        try:
            dev = os.stat(name).st_dev
        except OSError:
            return Problem("swap", f"swap file {name} (its device could not be checked)")
        block = _block(sys, f"{os.major(dev)}:{os.minor(dev)}")
        if block is None or not _encrypted(block):
            return Problem("swap", f"swap file {name} is not on a dm-crypt device")
        return None
    block = _block(sys, name)
    if block is None:
        return Problem("swap", f"swap {name} (not found in sysfs)")
    if block.name.startswith("zram"):
        backing = block / "backing_dev"
        if backing.exists() and backing.read_text().strip() not in ("", "none"):
            where = backing.read_text().strip()
            return Problem("zram-writeback", f"zram swap {name} writes idle pages to {where}")
        return None
    if not _encrypted(block):
        return Problem("swap", f"swap {name} is not on dm-crypt")
    return None


def problems(proc: Path = PROC, sys: Path = SYS) -> list[Problem]:
    """What on this host may write decrypted memory to disk; empty if nothing."""
    found = []
    try:
        lines = (proc / "swaps").read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and (problem := _swap_problem(fields[0], fields[1], sys)):
            found.append(problem)
    try:
        pattern = (proc / "sys/kernel/core_pattern").read_text().strip()
    except OSError:
        pattern = ""
    if pattern and not pattern.startswith("|"):
        found.append(
            Problem("core-pattern", f"core_pattern {pattern!r} writes core dumps to files")
        )
    resume = sys / "power/resume"
    if resume.exists() and resume.read_text().strip() not in ("", "0:0"):
        device = resume.read_text().strip()
        block = _block(sys, device)
        if block is None or not _encrypted(block):
            text = f"hibernation writes memory to {device}, which is not on dm-crypt"
            found.append(Problem("hibernation", text))
    return found
