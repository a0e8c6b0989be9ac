"""Small file-system helpers: atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new file, never half of one.

    `durable`: also on the disk before returning (fsync), so that a power cut keeps it. Without,
    the replacement is still atomic for every process and survives any crash but the machine's.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_image_json(path: Path, fmt: str, missing_hint: str) -> dict[str, Any]:
    """A JSON document of an image, of format `fmt`; UsageError saying what is wrong."""
    from .errors import UsageError

    damaged = "the image is damaged; rebuild it"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing", missing_hint) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not valid JSON ({err})", damaged) from err
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise UsageError(f"{path} is malformed: format is {found!r}, expected {fmt!r}", damaged)
    return raw


def write_json_atomic(path: Path, value: Any, mode: int = 0o644, *, durable: bool = True) -> None:
    """write_atomic for a JSON document."""
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    write_atomic(path, data, mode, durable=durable)


def write_new_file(path: Path, data: bytes | bytearray | memoryview, mode: int) -> None:
    """Create `path` with `data` and `mode`; never overwrite: UsageError if it exists."""
    from .errors import UsageError

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UsageError(
            f"{path} already exists", "choose another name; keygen never overwrites"
        ) from None
    except OSError as err:
        raise UsageError(f"cannot create {path}: {err.strerror}") from err
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def wipe_file(path: Path) -> None:
    """Overwrite `path` with zeros, then remove it (a header copy on tmpfs: its pages would
    otherwise go back to the kernel with the keyslots in them). Gone already is fine."""
    try:
        with open(path, "r+b") as f:
            f.write(bytes(os.fstat(f.fileno()).st_size))
    except FileNotFoundError:
        return
    path.unlink(missing_ok=True)
