"""Journals: the resources a container's record or an image's opening holds, as steps of a kind,
and how each kind is taken and given back.

`acquire` writes the intent, registers the undo on the caller's ExitStack, then acts; `release`
undoes one step idempotently. Teardown of a live process (ExitStack unwinding) and of a record
left by another process (`stop`, `gc`) both go through `release`. Records and openings, the
journals themselves, are state.py's; the two releases that depend on the host's other journals
ask the journal for them (`Journal.others`, `Journal.opening_of`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

from cryptlayer.errors import BusyError
from cryptlayer.fsutil import FileId, wipe_file

# The tools are imported where a step is taken or released: state.py imports this module for
# Kind and Step, and `ps`, which only reads records, should not load them (imports are a large
# part of a command's time under emulation: docs/benchmarks, figure 11).

T = TypeVar("T")


class Kind(StrEnum):
    """What a journal step holds; each kind has one releaser below."""

    LOOP = "loop"  # ref: backing file; device: /dev/loopN once attached
    CRYPT = "crypt"  # ref: device-mapper name
    MOUNT = "mount"  # ref: mount point
    DIR = "dir"  # ref: a directory we created
    FILE = "file"  # ref: a file we created (scratch file, OCI config)
    CONTAINER = "container"  # ref: OCI runtime container id
    IMAGE = "image"  # ref: image directory; a use of its shared layers (see layers.py)
    HEADER = "header"  # ref: a LUKS header copy in memory-backed /run; overwritten, then removed
    # lazy start (lazy.py): the fetched image's directory, its server process, its NBD devices
    FETCHED = "fetched"  # ref: a private directory of fetched image files, removed whole
    SERVER = "nbd-server"  # ref: that directory; device: "PID:START" once started
    NBD = "nbd"  # ref: the backend identifier; device: /dev/nbdN once attached


@dataclass
class Step:
    kind: Kind
    ref: str
    device: str = ""
    backing: FileId | None = None  # LOOP: the file behind the device (found even if renamed)


class Journal(Protocol):
    """What steps are written to: a container's record or an image's opening (state.py)."""

    steps: list[Step]

    @property
    def path(self) -> Path: ...

    def save(self, *, durable: bool = True) -> None: ...

    def others(self) -> Sequence[Journal]:
        """Every other journal on this host."""
        ...

    def opening_of(self, image: str) -> Journal | None:
        """The opening of the shared layers of `image`, if they are (or may be) open."""
        ...


CRASH_AT = "CRYPTLAYER_CRASH_AT"
crash_points = 0  # how many crash points this process has passed
_lock = threading.Lock()  # layers open in parallel threads: one journal update at a time


def crash_point() -> None:
    """Fault injection for the VM tier: with CRYPTLAYER_CRASH_AT=N in the environment, the
    process kills itself (SIGKILL, as a crash would) at the Nth point it passes. The points are
    before and after each step is taken, and before and after each is released."""
    global crash_points
    at = os.environ.get(CRASH_AT)
    if at is None:
        return
    crash_points += 1
    if crash_points == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


# Steps whose effect outlives a power cut (a file on disk): their intent is fsync'd before they
# are taken. Loops, mappings and mounts vanish with the machine, so a journal that lost their
# last lines in a power cut still describes everything that exists after it; for them the
# journal is written atomically (rename) but not forced to disk, which a crash of the process
# alone (the page cache survives it) never notices.
DURABLE = frozenset({Kind.FILE})


def acquire(stack: ExitStack, journal: Journal, kind: Kind, ref: str, action: Callable[[], T]) -> T:
    """Journal the intent, register the undo, then take the step."""
    step = Step(kind, ref)
    with _lock:
        journal.steps.append(step)
        journal.save(durable=kind in DURABLE)
        stack.callback(release, journal, step)
        crash_point()
    result = action()
    with _lock:
        crash_point()
        if kind is Kind.LOOP:
            step.device = str(result)
            from cryptlayer.tools import losetup

            step.backing = losetup.backing_identity(step.device)
        elif kind in (Kind.SERVER, Kind.NBD):
            step.device = str(result)
        journal.save(durable=False)
    return result


def mkdir(stack: ExitStack, journal: Journal, path: Path) -> Path:
    """Create directory `path` (0700) as a step of `journal`."""
    acquire(stack, journal, Kind.DIR, str(path), lambda: path.mkdir(mode=0o700))
    return path


def release(journal: Journal, step: Step) -> None:
    """Undo one step if it (still) exists, and strike it from the journal."""
    crash_point()
    _RELEASERS[step.kind](step, journal)
    crash_point()
    if step in journal.steps:
        journal.steps.remove(step)
        journal.save(durable=False)


def release_all(journal: Journal) -> None:
    """Undo every step in reverse; all are attempted even if some fail, and the first failure
    (the cause: a busy mount, say, rather than the busy devices below it) is raised."""
    errors: list[Exception] = []
    for step in reversed(list(journal.steps)):
        try:
            release(journal, step)
        except Exception as err:
            errors.append(err)
    if errors:
        raise errors[0]


def _release_loop(step: Step, journal: Journal) -> None:
    from cryptlayer.tools import losetup, udev

    backing = Path(step.ref)
    if step.device:
        ours = step.backing is not None and losetup.backing_identity(step.device) == step.backing
        if ours or step.device in udev.loops_backed_by({backing}):  # even if the file was renamed
            losetup.detach(step.device)
        return
    # Crashed between attach and journal: a loop on our file that no other journal claims is ours.
    claimed = {s.device for other in journal.others() for s in other.steps}
    for device in udev.loops_backed_by({backing}):
        if device not in claimed:
            losetup.detach(device)


def _release_crypt(step: Step, _journal: Journal) -> None:
    from cryptlayer.tools import devmapper

    devmapper.remove(step.ref)  # one that is gone already is no error


def close_opening(opening: Journal) -> None:
    """Release every step of an image's opening (its users are gone), then forget it."""
    release_all(opening)
    opening.path.unlink(missing_ok=True)


def uses_image(journal: Journal, image: str) -> bool:
    """Whether `journal` holds (or may have begun to hold) the shared layers of `image`."""
    return any(s.kind is Kind.IMAGE and s.ref == image for s in journal.steps)


def _release_image(step: Step, journal: Journal) -> None:
    """A container stops using an image's shared layers; the last user closes them."""
    if any(uses_image(other, step.ref) for other in journal.others()):
        return  # another container (or one that may have begun to) still uses them
    opening = journal.opening_of(step.ref)
    if opening is not None:
        close_opening(opening)


def _release_header(step: Step, _journal: Journal) -> None:
    wipe_file(Path(step.ref))


def _release_mount(step: Step, _journal: Journal) -> None:
    from cryptlayer.tools import mount

    target = Path(step.ref)
    if target not in mount.mounted_paths():
        return
    try:
        mount.umount(target)
    except mount.MountBusy as err:
        from cryptlayer.tools import fuser  # (runs a program: sh, logging)

        held = fuser.holders(target)
        raise BusyError(
            f"{target} is busy: "
            + (f"held by {', '.join(held)}" if held else "held by an unknown process"),
            "end those processes (or leave the directory) and stop again, or `stop --force`",
        ) from err


def kill_holders(target: Path) -> None:
    """SIGKILL every process using files under mount point `target` (if it is mounted)."""
    from cryptlayer.tools import fuser, mount

    if target in mount.mounted_paths():
        fuser.kill(target)


def _release_dir(step: Step, _journal: Journal) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(step.ref).rmdir()


def _release_file(step: Step, _journal: Journal) -> None:
    Path(step.ref).unlink(missing_ok=True)


def _release_container(step: Step, _journal: Journal) -> None:
    from cryptlayer.tools import runtime

    runtime.delete(step.ref)


def _release_fetched(step: Step, _journal: Journal) -> None:
    import shutil

    shutil.rmtree(step.ref, ignore_errors=True)


def _release_server(step: Step, _journal: Journal) -> None:
    from cryptlayer.runtime import lazy

    lazy.kill_server(step.device)  # none recorded: it ended with its parent's socket ends


def _release_nbd(step: Step, _journal: Journal) -> None:
    from cryptlayer.runtime import lazy
    from cryptlayer.tools import nbd

    # By its backend identifier, never by the recorded /dev/nbdN alone: after a power cut that
    # one is free or another container's, attached since; after a crash between the attach and
    # the journal none was recorded.
    for index, backend in nbd.attached().items():
        if backend == step.ref:
            lazy.detach(nbd.device(index))


_RELEASERS: dict[Kind, Callable[[Step, Journal], None]] = {
    Kind.LOOP: _release_loop,
    Kind.CRYPT: _release_crypt,
    Kind.MOUNT: _release_mount,
    Kind.DIR: _release_dir,
    Kind.FILE: _release_file,
    Kind.CONTAINER: _release_container,
    Kind.IMAGE: _release_image,
    Kind.HEADER: _release_header,
    Kind.FETCHED: _release_fetched,
    Kind.SERVER: _release_server,
    Kind.NBD: _release_nbd,
}
