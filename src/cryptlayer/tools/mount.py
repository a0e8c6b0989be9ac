"""mount/umount for ext4 layers, the scratch volume and the overlay root file system."""

from __future__ import annotations

from pathlib import Path

from ..runner import run


def mount(source: str, target: Path, fstype: str, options: list[str]) -> None:
    """Mount `source` on `target`."""
    run(["mount", "-t", fstype, "-o", ",".join(options), source, str(target)])


def umount(target: Path) -> None:
    """Unmount `target`."""
    run(["umount", str(target)])


def mounted_paths() -> set[Path]:
    """Every mount point on this host, from /proc/self/mountinfo."""
    points: set[Path] = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # field 5 is the mount point, with spaces etc. escaped as \\040
            raw = line.split()[4]
            points.add(Path(raw.encode().decode("unicode_escape")))
    return points
