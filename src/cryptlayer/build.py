"""Build an image: every source becomes one LUKS2 file holding a journal-less ext4.

Plaintext only passes through the opened encrypted volume; the image appears under its final
name only when complete (it is built beside it and renamed).
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from . import manifest as manifest_mod
from .errors import UsageError
from .keys import Secret
from .manifest import ImageConfig, Layer, Manifest
from .paths import run_root
from .sources import Source
from .system import require_kernel, require_root, require_tools
from .tools import cryptsetup, losetup, mkfs, mount

MiB = 1024 * 1024
# Room ext4 needs beyond file data (superblocks, bitmaps, inode tables); the layer is shrunk to
# its minimum afterwards, so a generous guess costs nothing on disk.
FS_OVERHEAD = 16 * MiB
INODE_BYTES = 256


def _fs_bytes(blocks: int, inodes: int) -> int:
    data = blocks * 4096
    total = FS_OVERHEAD + data + data // 5 + inodes * INODE_BYTES * 2
    return -(-total // MiB) * MiB  # whole MiB: a multiple of the 4 KiB sector size


def build_image(sources: list[str], output: Path, key: Secret, config: ImageConfig) -> Manifest:
    """Build an encrypted image at `output` from `sources` (bottom layer first)."""
    require_root("build an image")
    require_tools("cryptsetup", "losetup", "mkfs.ext4", "resize2fs", "mount")
    parsed = [Source.parse(s) for s in sources]
    require_kernel()
    if output.exists() or output.is_symlink():
        raise UsageError(
            f"{output} already exists", "choose a new --output path (build never overwrites)"
        )
    if not output.parent.is_dir():
        raise UsageError(
            f"{output.parent} does not exist", "create the directory that will hold the image"
        )
    partial = output.parent / f".{output.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir(mode=0o755)
    try:
        layers = tuple(
            _build_layer(src, partial, f"layer{i}.luks", key) for i, src in enumerate(parsed)
        )
        built = Manifest(
            layers, config, cryptsetup.CIPHER, datetime.now(UTC).isoformat(timespec="seconds")
        )
        manifest_mod.save(partial, built)
        os.rename(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # only our own, encrypted, files
        raise
    return built


def _build_layer(source: Source, image_dir: Path, filename: str, key: Secret) -> Layer:
    measure = source.measure()
    path = image_dir / filename
    header = 1 * MiB  # data offset given cryptsetup.FORMAT_OPTIONS; checked below
    with open(path, "xb") as f:
        f.truncate(header + _fs_bytes(measure.blocks, measure.inodes))
    cryptsetup.format_luks(path, key, label=f"cryptlayer {filename}")
    header_json = cryptsetup.dump(path)
    offset = cryptsetup.data_offset(header_json)
    name = f"cryptlayer-build-{secrets.token_hex(6)}"
    with ExitStack() as stack:
        loop = losetup.attach(path, readonly=False)
        stack.callback(losetup.detach, loop)
        mapped = cryptsetup.open_luks(loop, name, key, readonly=False)
        stack.callback(cryptsetup.close, name)
        mkfs.make_ext4(mapped, inodes=measure.inodes + 64, label=filename.removesuffix(".luks"))
        mnt = run_root() / f".build-{name}"
        mnt.mkdir(parents=True, mode=0o700)  # a dot name: never a container's
        stack.callback(mnt.rmdir)
        mount.mount(mapped, mnt, "ext4", ["noatime", "noinit_itable"])
        with ExitStack() as mounted:
            mounted.callback(mount.umount, mnt)
            source.populate(mnt)
            lost_found = mnt / "lost+found"
            if lost_found.is_dir() and not any(lost_found.iterdir()):
                lost_found.rmdir()  # mkfs made it; the source did not have it
        fs_size = mkfs.shrink(mapped)
    size = offset + fs_size
    os.truncate(path, size)
    return Layer(filename, cryptsetup.uuid(path), size, measure.content_bytes, str(source.path))
