"""An image's directory and layer files, held by descriptor from the first check to the last use.

Whoever can write an image directory can swap its files for symlinks, hard links or devices at
any moment. So the directory is opened once (no symlink), each layer file relative to it (no
symlink; a regular file with one link, of the size the manifest says), and from then on every
program is handed the open file, never the name: cryptsetup gets `/proc/PID/fd/N` (which opens
the very file we hold), the loop device is attached from the descriptor. What was checked is
what is opened, mapped and erased. Identities (device, inode) are recorded in the journals, so a
later process (a joining container, `stop`, `gc`) erases only the file that was opened.
Commands open images through opener.py, which calls these in its one order.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from cryptlayer.errors import DamagedImageError, UsageError
from cryptlayer.fsutil import DIR_FLAGS, FileId, NotRegularError, open_regular

SHARED_DIR_HINT = (
    "whoever can write it can swap its files while root uses them; make it root's and not"
    " writable by others (chown root: DIR; chmod go-w DIR), or pass --allow-shared-dir"
)


@dataclass(frozen=True)
class LayerFile:
    """One open layer file of an image."""

    shown: Path  # IMAGE/layerN.luks, for messages
    fd: int
    identity: FileId
    size: int

    @property
    def path(self) -> Path:
        """The open file, for another program: opening it reaches this file, whatever its name."""
        return Path(f"/proc/{os.getpid()}/fd/{self.fd}")


@dataclass
class ImageFiles:
    """An image directory and its layer files, open; a context manager that closes them."""

    image: Path
    dir_fd: int
    layers: list[LayerFile] = field(default_factory=list)
    trees: list[LayerFile] = field(default_factory=list)  # each layer's dm-verity hash tree
    _stack: ExitStack = field(default_factory=ExitStack)

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def identities(self) -> list[FileId]:
        return [layer.identity for layer in self.layers]


def check_private(image: Path, st: os.stat_result) -> None:
    """UsageError if a user other than root (or us) can write the image directory."""
    owner_ok = st.st_uid in (0, os.geteuid())
    if owner_ok and not st.st_mode & 0o022:
        return
    who = f"owned by uid {st.st_uid}" if not owner_ok else f"mode {stat.S_IMODE(st.st_mode):04o}"
    raise UsageError(
        f"image directory {image} is writable by users other than root ({who})", SHARED_DIR_HINT
    )


def open_dir(image: Path) -> ImageFiles:
    """Open the image directory itself (not through a symlink); no layer yet (opener.py opens
    them, in its order)."""
    try:
        dir_fd = os.open(image, DIR_FLAGS)
    except OSError as err:
        known = err.errno in (errno.ENOENT, errno.ENOTDIR)  # (as an absent manifest.json's)
        raise UsageError(
            f"{image} is not an image directory" + ("" if known else f" ({err.strerror})"),
            "give the --output of `cryptlayer build`",
        ) from None
    files = ImageFiles(image, dir_fd)
    files._stack.callback(os.close, dir_fd)
    return files


def open_layer(files: ImageFiles, name: str, size: int | None) -> LayerFile:
    """Open layer file `name` of `files` (closed with them); DamagedImageError if it is not one
    (missing, a symlink, not a regular file, linked elsewhere, or not of `size` bytes)."""
    shown = files.image / name
    try:
        fd = open_regular(name, dir_fd=files.dir_fd)  # (a device or FIFO is never opened)
    except NotRegularError as err:
        raise DamagedImageError(
            f"layer file {shown} is not a regular file ({err.kind})",
            "the image is damaged; copy it again",
        ) from None
    except FileNotFoundError:
        raise DamagedImageError(
            f"layer file {shown} is missing", "the image is incomplete; copy it again"
        ) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DamagedImageError(
                f"layer file {shown} is a symbolic link; refusing to follow it",
                "a layer is a regular file inside the image directory; copy the image again",
            ) from None
        raise UsageError(f"cannot open layer file {shown}: {err.strerror}") from None
    files._stack.callback(os.close, fd)
    st = os.fstat(fd)
    if st.st_nlink != 1:
        raise DamagedImageError(
            f"layer file {shown} has {st.st_nlink} hard links; refusing to use or erase it",
            "a layer must be the image's own file: copy the image (cp, not cp -l or ln)",
        )
    if size is not None and st.st_size != size:
        raise DamagedImageError(
            f"layer file {shown} has {st.st_size} bytes, the manifest says {size}",
            "the image is damaged (truncated?); copy it again",
        )
    return LayerFile(shown, fd, FileId.of(st), st.st_size)


def require_same(files: ImageFiles, expected: Sequence[FileId], what: str) -> None:
    """UsageError unless the open layers are the files recorded in `expected` (device, inode):
    as many, each the one recorded (a statement rewritten to list fewer would leave some out)."""
    if not expected:
        return  # recorded by a cryptlayer that did not record them
    if len(files.layers) != len(expected):
        raise UsageError(
            f"{files.image} lists {len(files.layers)} layer files, not the {len(expected)} {what}",
            "someone changed the image directory meanwhile; check who can write it",
        )
    for layer, ident in zip(files.layers, expected, strict=True):
        if layer.identity != ident:
            raise UsageError(
                f"layer file {layer.shown} is not the file {what} (it was replaced)",
                "someone changed the image directory meanwhile; check who can write it",
            )
