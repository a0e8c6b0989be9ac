"""Layer sources: a directory or a layer tar. Measures them and fills an opened layer with them.

Tar members are extracted inside a chroot into the mounted layer, so no member (absolute path,
`..`, a symlink or hard link pointing out) can reach the host: it is confined to the layer,
as a container runtime would confine it. See docs/architecture.md.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .runner import run

BLOCK = 4096


@dataclass(frozen=True)
class Measure:
    """How much a source holds: bytes of file content, and blocks and inodes it will need."""

    content_bytes: int
    blocks: int
    inodes: int


def _blocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


@dataclass(frozen=True)
class Source:
    """A directory or tar file that becomes one layer."""

    path: Path

    @classmethod
    def parse(cls, text: str) -> Source:
        path = Path(text)
        if not path.exists():
            raise UsageError(f"source {text} does not exist", "give a directory or a layer tar")
        if path.is_dir():
            return DirectorySource(path)
        if path.is_file() and tarfile.is_tarfile(path):
            return TarSource(path)
        raise UsageError(f"source {text} is neither a directory nor a tar archive")

    def measure(self) -> Measure:
        raise NotImplementedError

    def populate(self, target: Path) -> None:
        raise NotImplementedError


class DirectorySource(Source):
    def measure(self) -> Measure:
        content = blocks = inodes = 0
        seen: set[tuple[int, int]] = set()
        for root, dirs, files in os.walk(self.path):
            inodes += 1
            blocks += 1
            for name in dirs + files:
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISDIR(st.st_mode):
                    continue  # counted when walked
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                inodes += 1
                if stat.S_ISREG(st.st_mode):
                    content += st.st_size
                    blocks += _blocks(st.st_size)
                elif stat.S_ISLNK(st.st_mode):
                    blocks += 1
        return Measure(content, blocks, inodes)

    def populate(self, target: Path) -> None:
        # cp -a keeps modes, owners, times, links, special files and xattrs.
        run(["cp", "-a", "--", f"{self.path}/.", f"{target}/"])


class TarSource(Source):
    def measure(self) -> Measure:
        content = blocks = inodes = 0
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for member in tar:
                    inodes += 1
                    blocks += 1 if not member.isfile() else _blocks(member.size)
                    if member.isfile():
                        content += member.size
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UsageError(
                f"cannot read tar {self.path}: {err}", "is the file complete?"
            ) from err
        return Measure(content, blocks, inodes + 1)

    def populate(self, target: Path) -> None:
        extract_confined(self.path, target)


def _strip_root(member: tarfile.TarInfo, _path: str) -> tarfile.TarInfo:
    """Members are relative to the layer root; the chroot confines the rest."""
    member.name = member.name.lstrip("/") or "."
    return member


def extract_confined(archive: Path, target: Path) -> None:
    """Extract `archive` into `target` from a child process chrooted into `target`."""
    try:
        # Opened (and its decompressor loaded) before the chroot; closed by `with tar` below.
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115
    except (tarfile.TarError, OSError) as err:
        raise UsageError(f"cannot read tar {archive}: {err}", "is the file complete?") from err
    with tar:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            os.close(read_fd)
            status = 0
            try:
                os.chroot(target)
                os.chdir("/")
                tar.extractall("/", numeric_owner=True, filter=_strip_root)
            except BaseException as err:  # report anything, then leave without Python's cleanup
                os.write(write_fd, str(err).encode(errors="replace")[:4000])
                status = 1
            finally:
                os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        _, wait_status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0:
        raise UsageError(
            f"cannot extract {archive}: {message or 'extraction failed'}", "is the layer tar valid?"
        )
