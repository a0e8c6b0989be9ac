"""Container records: a journal of every resource a container holds, and the host-wide lock.

Each step is written down (atomically) before it is taken, so after a crash `gc` knows what may
exist; releasing a step is idempotent, so a step that never happened costs nothing to release.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from cryptlayer.errors import BusyError, UsageError
from cryptlayer.fsutil import FileId, try_lock, write_json_atomic
from cryptlayer.paths import openings_dir, private_run_root, records_dir, state_root
from cryptlayer.runtime.journal import Kind, Step, uses_image

T = TypeVar("T")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


class Mode(StrEnum):
    RUN = "run"  # owned by a `cryptlayer run` process for its whole life
    START = "start"  # assembled by `start`, lives until `stop`


@dataclass
class Record:
    """One container: what it was made from and every resource it holds, in order."""

    name: str
    image: str
    shred: bool  # crypto-erase the image when the container goes away
    mode: Mode
    pid: int  # process working on it now (0: nobody; a started container at rest)
    rootfs: str = ""
    created: str = ""
    shredded: bool = False
    steps: list[Step] = field(default_factory=list)
    layers: int = 0
    boot: str = ""  # the kernel's boot id when it was made: after a reboot nothing of it is left
    layer_ids: list[FileId] = field(default_factory=list)  # each layer file's

    @property
    def path(self) -> Path:
        return records_dir() / f"{self.name}.json"

    def save(self, *, durable: bool = True) -> None:
        write_json_atomic(self.path, _document(self), mode=0o600, durable=durable, compact=True)

    def others(self) -> list[Record | Opening]:
        return _others(self.path)

    def opening_of(self, image: str) -> Opening | None:
        return load_opening(image)

    def from_earlier_boot(self) -> bool:
        """Whether the machine restarted since (power loss): its devices and mounts are gone."""
        return bool(self.boot) and self.boot != boot_id()

    def owner_alive(self) -> bool:
        """Whether the process working on this record still exists (a pid from an earlier boot
        may belong to another process now)."""
        if self.pid <= 0 or self.from_earlier_boot():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> Description:
        """What `ps` shows of this container (without importing the heavy modules)."""
        if self.mode is Mode.RUN and self.owner_alive():
            status = "running"
        elif self.mode is Mode.START and self.pid == 0 and not self.from_earlier_boot():
            status = "assembled"
        else:
            status = "stale"  # its owner died, or the machine restarted: `cryptlayer gc`
        return Description(self.name, self.image, str(self.mode), status, self.rootfs,
                           self.layers, self.shred, self.created)  # fmt: skip


@dataclass(frozen=True)
class Description:
    """One row of `ps`: a container's name, image, mode, status and what stopping it does."""

    name: str
    image: str
    mode: str
    status: str  # running, assembled (started, at rest) or stale (for `cryptlayer gc`)
    rootfs: str
    layers: int
    shred_on_stop: bool
    created: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def boot_id() -> str:
    """This boot's random id (it changes at every boot)."""
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()


def check_name(name: str) -> str:
    """UsageError unless `name` is a valid container name."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"invalid name {name!r}",
            "use letters, digits, '_', '.' and '-' (at most 63), starting with a letter or digit",
        )
    return name


def _document(journal: Record | Opening) -> dict[str, Any]:
    """A record or opening as JSON: its fields, its steps as objects (dataclasses.asdict, but
    without its deep copies: two writes per step make this a hot path under emulation)."""
    document = {f.name: getattr(journal, f.name) for f in fields(journal)}
    document["steps"] = [vars(step) for step in journal.steps]
    return document


def _steps(raw: dict[str, Any]) -> list[Step]:
    return [Step(Kind(s["kind"]), str(s["ref"]), str(s.get("device", "")),
                 FileId.from_json(s["backing"]) if s.get("backing") else None)
            for s in raw.pop("steps", [])]  # fmt: skip


def _from_json(raw: dict[str, Any]) -> Record:
    steps = _steps(raw)
    raw["mode"] = Mode(raw["mode"])
    raw["layer_ids"] = [FileId.from_json(ident) for ident in raw.get("layer_ids", [])]
    known = {f.name for f in fields(Record)}  # a newer cryptlayer may have added fields
    return Record(**{k: v for k, v in raw.items() if k in known}, steps=steps)


def _damaged(path: Path, err: Exception) -> UsageError:
    return UsageError(
        f"the record {path} is damaged ({err})",
        "check what it holds (losetup -a, dmsetup ls), then remove it",
    )


def load(name: str) -> Record:
    """The record of container NAME; UsageError if there is none or it cannot be read."""
    path = records_dir() / f"{check_name(name)}.json"
    try:
        return _from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UsageError(
            f"no container named {name!r}", "see `cryptlayer ps` for the names"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise _damaged(path, err) from err


def _read_all(directory: Path, parse: Callable[[dict[str, Any]], T]) -> list[T]:
    """Every readable JSON journal in `directory`, by file name."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            found.append(parse(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced; the next look will see it
    return found


def exists(name: str) -> bool:
    """Whether a record of container `name` exists."""
    return (records_dir() / f"{name}.json").exists()


def all_records() -> list[Record]:
    """Every container record, by name."""
    return _read_all(records_dir(), _from_json)


def users_of(image: str, besides: Path | None = None) -> list[str]:
    """Names of the containers that use (or may have begun to use) the shared layers of `image`."""
    return [r.name for r in all_records() if r.path != besides and uses_image(r, image)]


def create(record: Record) -> Record:
    """Write a new record; BusyError if the name is taken. Call with the lock held."""
    records_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    if record.path.exists():
        raise BusyError(
            f"a container named {record.name!r} already exists",
            f"choose another --name, or `cryptlayer stop {record.name}` first",
        )
    record.boot = boot_id()
    record.save()
    return record


def remove(record: Record) -> None:
    """Forget the record (its resources are gone)."""
    record.path.unlink(missing_ok=True)


@contextmanager
def locked() -> Iterator[None]:
    """Hold the host-wide cryptlayer lock (flock) so processes do not race over devices."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_run_root()  # everything that takes the lock works below it
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# The shared read-only layers of an image: opened by its first container, closed by its last.
def image_id(image: str) -> str:
    try:  # not hashlib, which loads OpenSSL: ~0.1 s of a teardown under emulation (figure 12)
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # (an interpreter without it: 3.12 names it _sha2)
        from hashlib import sha256

    return str(sha256(image.encode()).hexdigest()[:24])


@dataclass
class Opening:
    """The journal of an image's shared layers: loops, mappings, mounts, runtime headers.

    Its users are the container records holding an IMAGE step for it (counted, never stored, so
    the count cannot drift from the records). `erased`: the on-disk keyslots were wiped at
    start; the layers were opened from header copies in /run.
    """

    image: str
    erased: bool = False
    steps: list[Step] = field(default_factory=list)
    layers: list[FileId] = field(default_factory=list)  # each layer file's

    @property
    def id(self) -> str:
        return image_id(self.image)

    @property
    def path(self) -> Path:
        return openings_dir() / f"{self.id}.json"

    def save(self, *, durable: bool = True) -> None:
        write_json_atomic(self.path, _document(self), mode=0o600, durable=durable, compact=True)

    def others(self) -> list[Record | Opening]:
        return _others(self.path)

    def opening_of(self, image: str) -> Opening | None:
        return load_opening(image)


def _opening_from_json(raw: dict[str, Any]) -> Opening:
    steps = _steps(raw)
    layers = [FileId.from_json(ident) for ident in raw.get("layers", [])]
    return Opening(str(raw["image"]), bool(raw.get("erased", False)), steps, layers)


def load_opening(image: str) -> Opening | None:
    """The opening of `image`, if its layers are (or may be) open; None if not."""
    path = openings_dir() / f"{image_id(image)}.json"
    try:
        return _opening_from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise _damaged(path, err) from err


def all_openings() -> list[Opening]:
    """Every image opening."""
    return _read_all(openings_dir(), _opening_from_json)


def all_journals() -> list[Record | Opening]:
    """Every record and opening: everything cryptlayer holds on this host."""
    return [*all_records(), *all_openings()]


def _others(path: Path) -> list[Record | Opening]:
    return [j for j in all_journals() if j.path != path]


# The OCI runtime that runs a container an engine made through cryptlayer-runtime: written
# beside the records (holders/NAME.holder) before the assembly begins, so that `gc` can ask that
# runtime whether the container still exists once nobody will `delete` it (the engine died, or
# never called).
HOLDER_SUFFIX = ".holder"


def holders_dir() -> Path:
    return state_root() / "holders"


@dataclass(frozen=True)
class Holder:
    """The real runtime's program, its state directory (`--root`; empty when unknown) and the
    container's id there."""

    runtime: str
    root: str
    id: str

    def knows(self) -> bool:
        """Whether the runtime still holds the container: crun and runc keep ROOT/ID from its
        `create` until its `delete` (and a reboot empties /run); without a known root, the
        runtime's own `state` answers."""
        if self.root:
            return os.path.lexists(os.path.join(self.root, self.id))
        import subprocess

        try:
            probe = subprocess.run([self.runtime, "state", self.id], capture_output=True,
                                   stdin=subprocess.DEVNULL, timeout=60)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return True  # cannot tell: left alone
        return probe.returncode == 0


def holder_path(name: str) -> Path:
    return holders_dir() / f"{name}{HOLDER_SUFFIX}"


def hold(name: str, holder: Holder) -> int:
    """Write container `name`'s holder and keep it locked (flock) by this process, which is
    creating the container: `gc` leaves a container alone while its creator lives. Returns the
    descriptor (close-on-exec: the runtime started as a child does not inherit the lock);
    BusyError when another live process is creating a container of that name."""
    holders_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    path = holder_path(check_name(name))
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        fd = os.open(path, flags, 0o600)
        locked = try_lock(fd)
        if _still_named(path, fd):  # (gc removes an idle holder: lock the one named)
            if locked:
                break
            os.close(fd)
            raise BusyError(
                f"the container {name!r} is being created by another process",
                "wait for it, or delete the container",
            )
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(asdict(holder)).encode())
    return fd


def load_holder(name: str) -> Holder | None:
    """Container `name`'s holder, if an engine made it (None for cryptlayer's own containers,
    and for an unreadable file: nothing is decided on it)."""
    try:
        raw = json.loads(holder_path(name).read_text(encoding="utf-8"))
        return Holder(str(raw["runtime"]), str(raw["root"]), str(raw["id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def being_created(name: str) -> bool:
    """Whether a live process holds container `name`'s holder locked: its create is under way."""
    try:
        fd = os.open(holder_path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return not try_lock(fd, shared=True)
    finally:
        os.close(fd)


def _still_named(path: Path, fd: int) -> bool:
    try:
        return FileId.of(os.stat(path, follow_symlinks=False)) == FileId.of(os.fstat(fd))
    except FileNotFoundError:
        return False


def forget_holder(name: str) -> None:
    holder_path(name).unlink(missing_ok=True)


def forget_idle_holder(name: str) -> bool:
    """Remove container `name`'s holder unless its create is under way; whether it was removed.
    The lock is held while the file is removed: a create that opens it meanwhile sees it gone."""
    path = holder_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if try_lock(fd) and _still_named(path, fd):
            path.unlink()
            return True
        return False
    finally:
        os.close(fd)


def holder_names() -> list[str]:
    """The names of the containers that have a holder file."""
    if not holders_dir().is_dir():
        return []
    found = holders_dir().glob(f"*{HOLDER_SUFFIX}")
    return sorted(p.name.removesuffix(HOLDER_SUFFIX) for p in found)
