"""The OCI runtime: crun, or runc where crun is absent."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from cryptlayer.errors import MissingToolError
from cryptlayer.paths import runtime_state
from cryptlayer.tools.runner import Attached, have, run, run_attached


def _state_root() -> str:
    """The runtime's own state: memory-backed, like everything of a running container."""
    return str(runtime_state())


def runtime() -> str:
    """The runtime program to use: crun, else runc."""
    for program in ("crun", "runc"):
        if have(program):
            return program
    raise MissingToolError("no OCI runtime found", "install crun (apt-get install crun)")


def start_attached(bundle: Path, container_id: str, stdin: IO[bytes] | None) -> Attached:
    """`crun run` the bundle in the foreground of our stdio."""
    return run_attached(
        [runtime(), "--root", _state_root(), "run", "--bundle", str(bundle), container_id],
        stdin=stdin,
    )


def kill(container_id: str, signal: str) -> None:
    """Send `signal` to the container's init (ignored if it is already gone)."""
    run([runtime(), "--root", _state_root(), "kill", container_id, signal], check=False)


def delete(container_id: str) -> None:
    """Forget the container, killing it first if it still runs (ignored if unknown).

    A container the runtime knows has its directory in the runtime's state from its creation
    until it is deleted (`crun run` deletes its container when it ends); without one there is
    nothing to do, and no runtime is started to find that out.
    """
    if not (runtime_state() / container_id).exists():
        return
    run([runtime(), "--root", _state_root(), "delete", "--force", container_id], check=False)
