"""Acquire and release a container's resources through its record.

`acquire` writes the intent, registers the undo on the caller's ExitStack, then acts; `release`
undoes one step idempotently. Teardown of a live process (ExitStack unwinding) and of a record
left by another process (`stop`, `gc`) both go through `release`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from .errors import BusyError, CommandError
from .runner import have, run
from .state import Kind, Record, Step, all_records
from .tools import cryptsetup, losetup, mount, runtime, udev

T = TypeVar("T")


def acquire(stack: ExitStack, record: Record, kind: Kind, ref: str, action: Callable[[], T]) -> T:
    """Journal the intent, register the undo, then take the step."""
    step = Step(kind, ref)
    record.steps.append(step)
    record.save()
    stack.callback(release, record, step)
    result = action()
    if kind is Kind.LOOP:
        step.device = str(result)
    step.done = True
    record.save()
    return result


def release(record: Record, step: Step) -> None:
    """Undo one step if it (still) exists, and strike it from the record."""
    _RELEASERS[step.kind](step, record)
    if step in record.steps:
        record.steps.remove(step)
        record.save()


def release_all(record: Record) -> None:
    """Undo every step in reverse; all are attempted even if some fail, and the first failure
    (the cause: a busy mount, say, rather than the busy devices below it) is raised."""
    errors: list[Exception] = []
    for step in reversed(list(record.steps)):
        try:
            release(record, step)
        except Exception as err:
            errors.append(err)
    if errors:
        raise errors[0]


def _release_loop(step: Step, record: Record) -> None:
    backing = Path(step.ref)
    if step.device:
        if step.device in udev.loops_backed_by({backing}):
            losetup.detach(step.device)
        return
    # Crashed between attach and journal: a loop on our file that no other record claims is ours.
    claimed = {s.device for r in all_records() if r.name != record.name for s in r.steps}
    for device in udev.loops_backed_by({backing}):
        if device not in claimed:
            losetup.detach(device)


def _release_crypt(step: Step, _record: Record) -> None:
    if Path("/dev/mapper", step.ref).exists():
        cryptsetup.close(step.ref)


def _release_mount(step: Step, _record: Record) -> None:
    target = Path(step.ref)
    if target not in mount.mounted_paths():
        return
    try:
        mount.umount(target)
    except CommandError as err:
        if "busy" in err.stderr:
            raise BusyError(
                f"{target} is busy: {holders(target) or 'held by an unknown process'}",
                "end those processes (or leave the directory) and stop again, or `stop --force`",
            ) from err
        raise


def holders(target: Path) -> str:
    """The processes holding files under mount point `target`, as 'pid (command)' items."""
    result = run(["fuser", "-m", str(target)], check=False) if have("fuser") else None
    if result is None:
        return ""
    items = []
    for pid in result.stdout.split():
        pid = pid.rstrip("cefFrm")
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            items.append(f"{pid} ({comm})")
    return "held by " + ", ".join(items) if items else ""


def kill_holders(target: Path) -> None:
    """SIGKILL every process using files under mount point `target`."""
    if target in mount.mounted_paths():
        run(["fuser", "-k", "-KILL", "-m", str(target)], check=False)


def _release_dir(step: Step, _record: Record) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path(step.ref).rmdir()


def _release_file(step: Step, _record: Record) -> None:
    Path(step.ref).unlink(missing_ok=True)


def _release_container(step: Step, _record: Record) -> None:
    runtime.delete(step.ref)


_RELEASERS: dict[Kind, Callable[[Step, Record], None]] = {
    Kind.LOOP: _release_loop,
    Kind.CRYPT: _release_crypt,
    Kind.MOUNT: _release_mount,
    Kind.DIR: _release_dir,
    Kind.FILE: _release_file,
    Kind.CONTAINER: _release_container,
}
