"""Container records: a journal of every resource a container holds, and the host-wide lock.

Each step is written down (atomically) before it is taken, so after a crash `gc` knows what may
exist; releasing a step is idempotent, so a step that never happened costs nothing to release.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import BusyError, UsageError
from .fsutil import write_json_atomic
from .paths import records_dir, state_root

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


class Kind(StrEnum):
    """What a journal step holds; each kind has one releaser in teardown.py."""

    LOOP = "loop"  # ref: backing file; device: /dev/loopN once attached
    CRYPT = "crypt"  # ref: device-mapper name
    MOUNT = "mount"  # ref: mount point
    DIR = "dir"  # ref: a directory we created
    FILE = "file"  # ref: a file we created (scratch file, OCI config)
    CONTAINER = "container"  # ref: OCI runtime container id


class Mode(StrEnum):
    RUN = "run"  # owned by a `cryptlayer run` process for its whole life
    START = "start"  # assembled by `start`, lives until `stop`


@dataclass
class Step:
    kind: Kind
    ref: str
    device: str = ""
    done: bool = False  # False: intent written, the step may or may not have happened


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
    handed_to: list[str] = field(default_factory=list)  # still using the image: they shred it

    @property
    def path(self) -> Path:
        return records_dir() / f"{self.name}.json"

    def save(self) -> None:
        write_json_atomic(self.path, asdict(self), mode=0o600)

    def owner_alive(self) -> bool:
        """Whether the process working on this record still exists."""
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> dict[str, Any]:
        """What `ps` shows of a container (without importing the heavy modules)."""
        layers = sum(
            1 for s in self.steps if s.kind is Kind.CRYPT and not s.ref.endswith("-scratch")
        )
        if self.mode is Mode.RUN and self.owner_alive():
            status = "running"
        else:
            status = "assembled" if self.mode is Mode.START and self.pid == 0 else "stale"
        return {
            "name": self.name,
            "image": self.image,
            "mode": str(self.mode),
            "status": status,
            "rootfs": self.rootfs,
            "layers": layers,
            "shred_on_stop": self.shred,
            "created": self.created,
        }


def check_name(name: str) -> str:
    """UsageError unless `name` is a valid container name."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"invalid name {name!r}",
            "use letters, digits, '_', '.' and '-' (at most 63), starting with a letter or digit",
        )
    return name


def _from_json(raw: dict[str, Any]) -> Record:
    steps = [Step(Kind(s["kind"]), s["ref"], s.get("device", ""), s.get("done", False))
             for s in raw.pop("steps", [])]  # fmt: skip
    raw["mode"] = Mode(raw["mode"])
    known = {f.name for f in fields(Record)}  # a newer cryptlayer may have added fields
    return Record(**{k: v for k, v in raw.items() if k in known}, steps=steps)


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
        raise UsageError(
            f"the record {path} is damaged ({err})",
            "check what it holds (losetup -a, dmsetup ls), then remove it",
        ) from err


def all_records() -> list[Record]:
    """Every container record, by name."""
    directory = records_dir()
    if not directory.is_dir():
        return []
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            records.append(_from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record being replaced; the next look will see it
    return records


def users_of(image: str, besides: str = "") -> list[str]:
    """Names of the containers that hold devices of `image` now."""
    return [r.name for r in all_records() if r.image == image and r.steps and r.name != besides]


def create(record: Record) -> Record:
    """Write a new record; BusyError if the name is taken. Call with the lock held."""
    records_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    if record.path.exists():
        raise BusyError(
            f"a container named {record.name!r} already exists",
            f"choose another --name, or `cryptlayer stop {record.name}` first",
        )
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
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# A shred owed to an image that other containers were still using when its owner stopped: the
# last of them to go (or gc, after a crash) applies it. One marker file per image.
def _owed_path(image: str) -> Path:
    import hashlib

    return state_root() / "owed" / f"{hashlib.sha256(image.encode()).hexdigest()[:24]}.json"


def owe_shred(image: str) -> None:
    path = _owed_path(image)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json_atomic(path, {"image": image}, mode=0o600)


def shred_owed(image: str) -> bool:
    return _owed_path(image).exists()


def clear_owed(image: str) -> None:
    _owed_path(image).unlink(missing_ok=True)


def owed_images() -> list[str]:
    directory = state_root() / "owed"
    if not directory.is_dir():
        return []
    images = []
    for path in sorted(directory.glob("*.json")):
        try:
            images.append(str(json.loads(path.read_text(encoding="utf-8"))["image"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return images
