"""mount/umount for ext4 layers, the scratch volume and the overlay root file system."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..runner import run

# Layers and the scratch volume: no device node or set-uid file on them works through these
# mounts (the overlay root is mounted nodev; the container has no_new_privs for set-uid).
LAYER_OPTIONS = ["ro", "noatime", "noload", "nodev", "nosuid"]
SCRATCH_OPTIONS = ["noatime", "noinit_itable", "nodev", "nosuid"]


@dataclass(frozen=True)
class Mounted:
    """One line of /proc/self/mountinfo."""

    target: Path
    fstype: str
    device: str  # MAJ:MIN of the file system's device (0:N for ones without a block device)


def mount(source: str, target: Path, fstype: str, options: list[str]) -> None:
    """Mount `source` on `target`."""
    run(["mount", "-t", fstype, "-o", ",".join(options), source, str(target)])


def umount(target: Path) -> None:
    """Unmount `target`."""
    run(["umount", str(target)])


def mounts() -> list[Mounted]:
    """Every mount on this host, in mount order, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
            fields = line.split()
            target = Path(fields[4].encode().decode("unicode_escape"))  # spaces come as \\040
            fstype = fields[fields.index("-") + 1]
            found.append(Mounted(target, fstype, fields[2]))
    return found


def mounted_paths() -> set[Path]:
    """Every mount point on this host."""
    return {m.target for m in mounts()}


def containing(path: Path) -> Mounted:
    """The mount that `path` lives on (the last one mounted on it or on its nearest parent)."""
    path = path.resolve()
    best = None
    for m in mounts():
        if (m.target == path or m.target in path.parents) and (
            best is None or len(m.target.parts) >= len(best.target.parts)
        ):
            best = m
    assert best is not None, "/ is always mounted"
    return best
