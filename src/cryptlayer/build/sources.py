"""Layer sources: a directory, a layer tar (plain, gzip, zstd, bzip2, xz), or an OCI layer.

Measures them, and fills an opened layer with them. Every tar is extracted inside a chroot into
the mounted layer, so no member (absolute path, `..`, a symlink or hard link pointing out) can
reach the host: it is confined to the layer, as a container runtime would confine it. OCI
whiteouts become overlayfs whiteouts, or with --squash are applied. See docs/architecture.md.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import IO

from cryptlayer.build.oci import HashingReader, OciLayer, verify_blob
from cryptlayer.errors import UsageError, printable
from cryptlayer.fsutil import FileId
from cryptlayer.tools import BLOCK  # what one ext4 block holds
from cryptlayer.tools.runner import filtered, run

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
XATTR_PAX = "SCHILY.xattr."


@dataclass(frozen=True)
class Measure:
    """How much a source holds: bytes of file content, and blocks and inodes it will need; and
    the device nodes it leaves out (see device_node)."""

    content_bytes: int
    blocks: int
    inodes: int
    dev_nodes: int = 0  # device nodes under /dev, left out
    dropped: tuple[str, ...] = ()  # device nodes elsewhere, left out by --drop-devices: shown

    def __add__(self, other: Measure) -> Measure:
        return Measure(
            self.content_bytes + other.content_bytes,
            self.blocks + other.blocks,
            self.inodes + other.inodes,
            self.dev_nodes + other.dev_nodes,
            self.dropped + other.dropped,
        )

    def left_out(self, label: str) -> list[str]:
        """One line for the device nodes under /dev, one for each other one dropped."""
        lines = [f"left out {shown}: --drop-devices" for shown in self.dropped]
        if self.dev_nodes:
            nodes = "node" if self.dev_nodes == 1 else "nodes"
            lines.insert(0, f"left out {self.dev_nodes} device {nodes} under /dev of {label}"
                            " (the container gets /dev from the runtime)")  # fmt: skip
        return lines


class Device(StrEnum):
    """What a layer does with one entry of its source (device_node)."""

    KEEP = "keep"  # not a device node, or an overlay whiteout
    UNDER_DEV = "under /dev"  # left out: the runtime gives the container its own /dev
    DROPPED = "dropped"  # elsewhere, left out because --drop-devices was given


def device_node(name: str, shown: str, mode: int, rdev: int, *, drop: bool) -> Device:
    """What becomes of the entry `name` (its path from the layer's root) with `mode` and
    `rdev`: UsageError for a device node outside /dev without `drop`.

    A debootstrap tree, and every OCI layer made from one, carries console, null, tty... in
    /dev; a container gets /dev from the runtime, and layers are mounted nodev, so those are
    left out. One anywhere else has no such reason to be there: refused, unless dropped too.
    An overlay whiteout (a 0:0 character device) is kept wherever it is.
    """
    if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        return Device.KEEP
    if stat.S_ISCHR(mode) and rdev == 0:
        return Device.KEEP  # a whiteout
    if under_dev(name):
        return Device.UNDER_DEV
    if drop:
        return Device.DROPPED
    kind = "character" if stat.S_ISCHR(mode) else "block"
    raise UsageError(
        f"{printable(shown)} is a {kind} device node ({os.major(rdev)}:{os.minor(rdev)})",
        "an image may carry device nodes only in /dev, which build leaves out (the container"
        " gets /dev from the runtime); remove it, or pass --drop-devices to leave it out",
    )


def device_shown(shown: str, mode: int, rdev: int) -> str:
    """A device node as a line names it: `PATH (character device 1:3)`."""
    kind = "character" if stat.S_ISCHR(mode) else "block"
    return f"{shown} ({kind} device {os.major(rdev)}:{os.minor(rdev)})"


def under_dev(name: str) -> bool:
    """Whether `name`, a path from a layer's root, lies below its /dev."""
    return _in_layer(name).startswith("dev/")


def _in_layer(name: str) -> str:
    """A member name as extraction resolves it: relative to the root, no `..` above it."""
    return posixpath.normpath("/" + name).lstrip("/") or "."


def _tar_mode(member: tarfile.TarInfo) -> int:
    kind = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}.get(member.type, 0)
    return kind | member.mode


def _blocks(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


class Source(ABC):
    """What becomes one layer."""

    @property
    @abstractmethod
    def label(self) -> str:
        """What it is, for messages and the manifest."""

    @property
    def digest(self) -> str:
        """The OCI diff_id, where there is one."""
        return ""

    @abstractmethod
    def measure(self) -> Measure: ...

    @abstractmethod
    def populate(self, target: Path, *, squash: bool = False) -> None: ...


COPIERS = min(4, os.cpu_count() or 1)  # cp processes filling one layer from a directory
COPIERS_FROM = 64 * 1024 * 1024  # bytes; below, one cp process (more would only cost)


@dataclass(frozen=True)
class _Tree:
    """What one walk of a directory source found."""

    measure: Measure
    linked: bool  # two names of one file inside the tree: hard links one cp must keep together
    sizes: dict[str, int]  # bytes under each top-level entry


@dataclass(frozen=True)
class DirectorySource(Source):
    path: Path
    drop_devices: bool = False  # leave out device nodes outside /dev too (device_node)

    @property
    def label(self) -> str:
        return str(self.path)

    @cached_property
    def _tree(self) -> _Tree:
        content = blocks = inodes = dev_nodes = 0
        dropped: list[str] = []
        linked = False
        sizes: dict[str, int] = {}
        seen: set[FileId] = set()
        for root, dirs, files in os.walk(self.path):
            inodes += 1
            blocks += 1
            rel = os.path.relpath(root, self.path)
            for name in dirs + files:
                st = os.lstat(os.path.join(root, name))
                top = name if rel == "." else rel.split(os.sep, 1)[0]
                sizes[top] = sizes.get(top, 0) + BLOCK
                shown = os.path.join(root, name)
                what = device_node(os.path.join(rel, name), shown, st.st_mode, st.st_rdev,
                                   drop=self.drop_devices)  # fmt: skip
                if what is Device.UNDER_DEV:
                    dev_nodes += 1
                    continue
                if what is Device.DROPPED:
                    dropped.append(device_shown(shown, st.st_mode, st.st_rdev))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue  # counted when walked
                if st.st_nlink > 1:
                    if FileId.of(st) in seen:
                        linked = True
                        continue
                    seen.add(FileId.of(st))
                inodes += 1
                if stat.S_ISREG(st.st_mode):
                    content += st.st_size
                    blocks += _blocks(st.st_size)
                    sizes[top] += st.st_size
                elif stat.S_ISLNK(st.st_mode):
                    blocks += 1
        measure = Measure(content, blocks, inodes, dev_nodes, tuple(dropped))
        return _Tree(measure, linked, sizes)

    def measure(self) -> Measure:
        return self._tree.measure

    def populate(self, target: Path, *, squash: bool = False) -> None:
        # cp -a keeps modes, owners, times, links, special files and xattrs. Large trees are
        # copied by several cp processes at once, each given a share of the top-level entries
        # (reading many files is latency-bound); not when the tree has hard links inside,
        # which only one cp process can keep as links.
        shares = [] if self._tree.linked else _shares(self._tree.sizes, COPIERS)
        if len(shares) < 2:
            run(["cp", "-a", "--", f"{self.path}/.", f"{target}/"])
        else:
            with ThreadPoolExecutor(len(shares), thread_name_prefix="copy") as pool:
                argvs = [["cp", "-a", "--", *(str(self.path / n) for n in share), f"{target}/"]
                         for share in shares]  # fmt: skip
                for copied in [pool.submit(run, argv) for argv in argvs]:
                    copied.result()
            # What `cp -a SRC/. TARGET/` does for the top directory itself, once its entries
            # are in (they change its times): owner, mode, times and extended attributes.
            top = os.lstat(self.path)
            os.chown(target, top.st_uid, top.st_gid)
            shutil.copystat(self.path, target)
        self._leave_out_devices(target)

    def _leave_out_devices(self, target: Path) -> None:
        """Remove from the filled layer the device nodes device_node leaves out; refuse any
        other. What cp copied is checked, not what measure saw: the tree may have changed."""
        todo = [""]
        while todo:
            rel = todo.pop()
            where = target / rel if rel else target
            times = os.lstat(where)
            removed = False
            with os.scandir(where) as entries:
                for entry in entries:
                    name = posixpath.join(rel, entry.name) if rel else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(name)
                        continue
                    if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                        continue  # (d_type says so: no stat for each file of a large tree)
                    st = entry.stat(follow_symlinks=False)
                    what = device_node(name, str(self.path / name), st.st_mode, st.st_rdev,
                                       drop=self.drop_devices)  # fmt: skip
                    if what is not Device.KEEP:
                        os.unlink(entry.path)
                        removed = True
            if removed:  # the directory's times, as cp -a made them (the source's)
                os.utime(where, ns=(times.st_atime_ns, times.st_mtime_ns), follow_symlinks=False)


def _shares(sizes: dict[str, int], count: int) -> list[list[str]]:
    """Top-level entries in up to `count` shares of about equal bytes (largest first, each to
    the smallest share); one share for a tree below COPIERS_FROM bytes."""
    if sum(sizes.values()) < COPIERS_FROM:
        return [sorted(sizes)] if sizes else []
    shares: list[tuple[int, list[str]]] = [(0, []) for _ in range(min(count, len(sizes)))]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        i = min(range(len(shares)), key=lambda k: shares[k][0])
        shares[i] = (shares[i][0] + sizes[name], [*shares[i][1], name])
    return [names for _, names in shares]


@contextmanager
def decompressed(raw: IO[bytes]) -> Iterator[IO[bytes]]:
    """The uncompressed stream of a tar that may be gzip, zstd, bzip2 or xz compressed."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        with gzip.GzipFile(fileobj=raw, mode="rb") as g:
            yield g  # type: ignore[misc]
    elif magic.startswith(b"\x28\xb5\x2f\xfd"):
        with filtered(["zstd", "-dc"], raw) as z:
            yield z
    elif magic.startswith(b"BZh"):
        with bz2.BZ2File(raw) as b:
            yield b
    elif magic.startswith(b"\xfd7zXZ"):
        with lzma.LZMAFile(raw) as x:
            yield x
    else:
        yield raw


class _TarDevices:
    """device_node for the members of one tar in order, hard links to a node left out included
    (a link to a node is the node under another name); what was left out, counted and named."""

    def __init__(self, label: str, drop: bool) -> None:
        self.label = label  # "" in the extracting child: its messages get the label added
        self.drop = drop
        self.left_out: dict[str, tuple[int, int]] = {}  # name -> (mode, rdev)
        self.dev_nodes = 0
        self.dropped: list[str] = []

    def __call__(self, member: tarfile.TarInfo) -> Device:
        name = _in_layer(member.name)
        if member.islnk():
            node = self.left_out.get(_in_layer(member.linkname))
            if node is None:
                return Device.KEEP
            mode, rdev = node
        else:
            mode, rdev = _tar_mode(member), os.makedev(member.devmajor, member.devminor)
        shown = f"{self.label}:{member.name}" if self.label else member.name
        what = device_node(name, shown, mode, rdev, drop=self.drop)
        if what is Device.KEEP:
            self.left_out.pop(name, None)  # (a later member put something else there)
            return what
        self.left_out[name] = (mode, rdev)
        if what is Device.UNDER_DEV:
            self.dev_nodes += 1
        else:
            self.dropped.append(device_shown(shown, mode, rdev))
        return what


class _TarSource(Source):
    """A layer tar, wherever its bytes come from; checked against its diff_id if it has one."""

    drop_devices: bool  # leave out device nodes outside /dev too (device_node)

    @contextmanager
    def _raw(self) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield  # pragma: no cover

    @contextmanager
    def _stream(self) -> Iterator[HashingReader]:
        with self._raw() as raw, decompressed(raw) as plain:
            yield HashingReader(plain)

    def _check(self, actual: str) -> None:
        if self.digest and actual != self.digest:
            raise UsageError(
                f"layer {self.label} does not match its diff_id {self.digest} (it is {actual})",
                "the image is corrupted; fetch it again",
            )

    def measure(self) -> Measure:
        content = blocks = inodes = 0
        devices = _TarDevices(self.label, self.drop_devices)
        try:
            with self._stream() as stream:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        if devices(member) is not Device.KEEP:
                            continue
                        inodes += 1
                        blocks += _blocks(member.size) if member.isfile() else 1
                        if member.isfile():
                            content += member.size
                self._check(stream.drain())
        except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile, lzma.LZMAError) as err:
            raise UsageError(
                f"cannot read layer {self.label}: {err}", "is the file complete?"
            ) from err
        return Measure(content, blocks, inodes + 1, devices.dev_nodes, tuple(devices.dropped))

    def populate(self, target: Path, *, squash: bool = False) -> None:
        with self._stream() as stream:
            digest = extract_confined(
                stream, target, self.label, squash=squash, drop_devices=self.drop_devices
            )
        self._check(digest)


@dataclass(frozen=True)
class TarSource(_TarSource):
    path: Path
    drop_devices: bool = False

    @property
    def label(self) -> str:
        return str(self.path)

    @contextmanager
    def _raw(self) -> Iterator[IO[bytes]]:
        with open(self.path, "rb") as f:
            yield f


@dataclass(frozen=True)
class OciLayerSource(_TarSource):
    layer: OciLayer
    drop_devices: bool = False

    @property
    def label(self) -> str:
        return self.layer.blobs.describe(self.layer.path)

    @property
    def digest(self) -> str:
        return self.layer.diff_id

    def measure(self) -> Measure:
        if self.layer.cipher is None:
            verify_blob(self.layer)
        # An ocicrypt layer is checked by the stream that scans it (ocicrypt.decrypting: digest,
        # size and HMAC at its end, a failure on the way reported as the tampering it is): a
        # pass of its own would decrypt it once more (docs/benchmarks, figure 13).
        return super().measure()

    @contextmanager
    def _raw(self) -> Iterator[IO[bytes]]:
        with self.layer.open() as f:  # an ocicrypt layer decrypted on the way
            yield f


@dataclass(frozen=True)
class SquashSource(Source):
    """Several layers merged into one, whiteouts applied (`build --squash`)."""

    parts: tuple[Source, ...]

    @property
    def label(self) -> str:
        return " + ".join(p.label for p in self.parts)

    def measure(self) -> Measure:
        total = Measure(0, 0, 0)
        for part in self.parts:
            total = total + part.measure()
        return total

    def populate(self, target: Path, *, squash: bool = False) -> None:
        for part in self.parts:
            part.populate(target, squash=True)


def parse_path(text: str, *, drop_devices: bool = False) -> Source:
    """A directory or a tar file named on the command line (`drop_devices`: see device_node)."""
    path = Path(text)
    if not path.exists():
        raise UsageError(
            f"source {text} does not exist", "give a directory, a layer tar or oci:PATH"
        )
    if path.is_dir():
        return DirectorySource(path, drop_devices)
    if path.is_file():
        # The first member's headers (PAX ones included) fit well in 64 KiB of the plain stream.
        with open(path, "rb") as f, decompressed(f) as plain:
            head = plain.read(1 << 16)
        if tarfile.is_tarfile(io.BytesIO(head)):
            return TarSource(path, drop_devices)
    raise UsageError(f"source {text} is neither a directory nor a tar archive")


# --- extraction, in a chrooted child -------------------------------------------------------


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _apply(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    squash: bool,
    seen: set[str],
    devices: _TarDevices,
) -> dict[str, bytes]:
    """Extract one member (or apply its whiteout); returns the xattrs still to set on it."""
    # Checked again while extracting: a tar file may change between measuring and extracting.
    if devices(member) is not Device.KEEP:
        return {}  # left out: never made, so never reached through a symlink either
    name = posixpath.normpath("/" + member.name).lstrip("/") or "."
    base, parent = posixpath.basename(name), posixpath.dirname(name) or "."
    if base == OPAQUE:
        os.makedirs("/" + parent, exist_ok=True)
        if squash:  # hide what lower layers put here, keep what this layer did
            for child in os.listdir("/" + parent):
                if posixpath.normpath(posixpath.join(parent, child)) not in seen:
                    _remove(posixpath.join("/", parent, child))
        else:
            os.setxattr("/" + parent, "trusted.overlay.opaque", b"y")
        return {}
    if base.startswith(WHITEOUT):
        victim = posixpath.join("/", parent, base[len(WHITEOUT) :])
        _remove(victim)
        if not squash:  # overlayfs's whiteout: a 0:0 character device
            os.makedirs("/" + parent, mode=0o755, exist_ok=True)
            os.mknod(victim, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        return {}
    path = "/" + name
    if name != "." and os.path.lexists(path) and not (member.isdir() and os.path.isdir(path)):
        _remove(path)  # a later layer replaces what is there
    member.name = name
    tar.extract(member, "/", numeric_owner=True, filter=lambda m, _p: m)
    seen.add(name)
    return {
        key[len(XATTR_PAX) :]: value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(XATTR_PAX)
    }


def _extract_here(stream: IO[bytes], squash: bool, drop_devices: bool) -> None:
    """Extract the tar on `stream` into / (we are chrooted)."""
    devices = _TarDevices("", drop_devices)
    seen: set[str] = set()
    dirs: list[tarfile.TarInfo] = []
    xattrs: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            pending = _apply(tar, member, squash, seen, devices)
            if pending:
                xattrs.append(("/" + member.name, pending))
            if member.isdir():
                dirs.append(member)
        # Last: a chown (of this file, or of a hard link to it) clears security.capability.
        for path, attrs in xattrs:
            for key, value in attrs.items():
                os.setxattr(path, key, value, follow_symlinks=False)
        for member in reversed(dirs):  # children changed their parents' mtimes
            os.utime("/" + member.name, (member.mtime, member.mtime), follow_symlinks=False)


def _close_all_but(keep: set[int]) -> None:
    # One by one from /proc: close_range(2) is not allowed everywhere (seccomp sandboxes).
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def extract_confined(
    stream: HashingReader, target: Path, label: str, *, squash: bool, drop_devices: bool = False
) -> str:
    """Extract a tar stream into `target` from a child chrooted there; returns its sha256.
    Device nodes are left out or refused as device_node says.

    We feed the child the plain tar through a pipe of its own; the child closes every other
    descriptor first, so it holds nothing open that another process waits on (such as the
    stdin of a `zstd -dc` feeding us).
    """
    data_r, data_w = os.pipe()
    msg_r, msg_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        status = 0
        try:
            os.close(data_w)
            os.close(msg_r)
            _close_all_but({0, 1, 2, data_r, msg_w})
            os.chroot(target)
            os.chdir("/")
            with os.fdopen(data_r, "rb") as data:
                _extract_here(data, squash, drop_devices)
                while data.read(1 << 20):  # the tar's trailing padding
                    pass
            os.write(msg_w, b"ok")
        except BaseException as err:  # report anything, then leave without Python's cleanup
            os.write(msg_w, str(err).encode(errors="replace")[:4000])
            status = 1
        finally:
            os._exit(status)
    os.close(data_r)
    os.close(msg_w)
    try:
        with os.fdopen(data_w, "wb") as feed:
            while chunk := stream.read(1 << 20):
                feed.write(chunk)
    except BrokenPipeError:
        pass  # the child stopped reading: its message says why
    digest = stream.drain()
    with os.fdopen(msg_r, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, wait_status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(wait_status) != 0 or message != "ok":
        raise UsageError(
            f"cannot extract {label}: {message or 'extraction failed'}", "is the layer tar valid?"
        )
    return digest
