"""fuser: the processes that hold files under a mount point (for `stop`'s messages and --force)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cryptlayer.tools.runner import have, run


def holders(target: Path) -> list[str]:
    """The processes holding files under mount point `target`, as 'PID (COMMAND)' items."""
    if not have("fuser"):
        return []
    items = []
    for pid in run(["fuser", "-m", str(target)], check=False).stdout.split():
        pid = pid.rstrip("cefFrm")
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            items.append(f"{pid} ({comm})")
    return items


def kill(target: Path) -> None:
    """SIGKILL every process using files under mount point `target`."""
    run(["fuser", "-k", "-KILL", "-m", str(target)], check=False)
