"""Build an image: every source becomes one LUKS2 file holding a journal-less ext4.

Plaintext only passes through the opened encrypted volume; the image appears under its final
name only when complete (it is built beside it and renamed).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptlayer.build import oci
from cryptlayer.build.ocicrypt import DecryptionKey
from cryptlayer.build.sources import Measure, OciLayerSource, Source, SquashSource, parse_path
from cryptlayer.errors import UsageError
from cryptlayer.image import envelope, luksheader, signatures, statement
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.image.manifest import LAYER_SUFFIX, TREE_SUFFIX, ImageConfig, Layer, Manifest
from cryptlayer.image.process import Overrides
from cryptlayer.paths import build_mapping, build_mount
from cryptlayer.progress import Progress, Silent, watching
from cryptlayer.secret import Secret
from cryptlayer.tools import BLOCK, cryptsetup, devmapper, losetup, mkfs, mount, veritysetup
from cryptlayer.tools.system import require_kernel, require_root, require_tools

MiB = 1024 * 1024
# Room ext4 needs beyond file data (superblocks, bitmaps, inode tables); the layer is shrunk to
# its minimum afterwards, so a generous guess costs nothing on disk.
FS_OVERHEAD = 16 * MiB
INODE_BYTES = 256
GROUP_BYTES = 32768 * BLOCK  # an ext4 block group of 4 KiB blocks


def _fs_bytes(blocks: int, inodes: int) -> int:
    data = blocks * BLOCK
    total = FS_OVERHEAD + data + data // 5 + inodes * INODE_BYTES * 2
    return -(-total // MiB) * MiB  # whole MiB: a multiple of the 4 KiB sector size


def _inodes(needed: int, fs_bytes: int, blocks: int) -> int:
    """Inodes for a file system of `fs_bytes` that `resize2fs -M` will shrink to about `blocks`.

    ext4 spreads inodes evenly over its block groups (128 MiB each), and the shrink must keep
    every group it needs for the inodes in use: with just enough inodes it could drop no group
    at all (a 1 GiB layer stayed 20% too large). So each group gets as many more as there are
    groups now for each one the data needs, and the groups that remain still hold every inode.
    """
    groups_now = -(-fs_bytes // GROUP_BYTES)
    groups_after = max(1, -(-blocks * BLOCK // GROUP_BYTES))
    return -(-(needed + 64) * groups_now // groups_after)


def _expand(
    stack: ExitStack,
    sources: list[str],
    drop_devices: bool,
    decryption: tuple[DecryptionKey, ...] = (),
) -> tuple[list[Source], ImageConfig | None]:
    """Each SOURCE as its layers, bottom first, and the image config an OCI source brings."""
    layers: list[Source] = []
    config: ImageConfig | None = None
    for text in sources:
        if oci.split_reference(text) is None:
            layers.append(parse_path(text, drop_devices=drop_devices))
            continue
        image = stack.enter_context(oci.open_image(text, decryption))
        layers += [OciLayerSource(layer, drop_devices) for layer in image.layers]
        config = image.config  # the topmost image's config wins, as with FROM in a Containerfile
    return layers, config


def build_image(
    sources: list[str],
    output: Path,
    principals: envelope.Principals,
    *,
    squash: bool = False,
    overrides: Overrides | None = None,
    progress: Callable[[str, int], Progress] | None = None,
    signer: Any = None,
    drop_devices: bool = False,
    notice: Callable[[str], None] | None = None,
    decryption: tuple[DecryptionKey, ...] = (),
) -> Manifest:
    """Build an encrypted image at `output` from `sources` (bottom layer first).

    Every layer's keyslot holds a new random image key, wrapped in keys.json for each of
    `principals`. The config is the one an OCI source brings (or none); `overrides` replace
    single fields of it. `progress` makes a display for each layer (progress.for_terminal).
    `signer`: a private key (signatures.load_signing_key) that signs the statement.
    Device nodes under /dev are left out, and with `drop_devices` those elsewhere too
    (sources.device_node); `notice` is given a line saying so for each layer.
    `decryption`: keys for the layers ocicrypt encrypted (build/ocicrypt.py).
    """
    _check_build(principals, output)
    with ExitStack() as stack:
        parsed, oci_config = _expand(stack, sources, drop_devices, decryption)
        final_config = (overrides or Overrides()).image_config(oci_config or ImageConfig())
        if squash and len(parsed) > 1:
            parsed = [SquashSource(tuple(parsed))]
        require_kernel()
        partial = output.parent / f".{output.name}.partial-{secrets.token_hex(4)}"
        partial.mkdir(mode=0o755)
        try:
            key = stack.enter_context(envelope.new_image_key())
            entries = principals.wrap(key)  # before the layers: a failure here costs nothing
            show = progress or (lambda _label, _total: Silent())
            tell = notice or (lambda _line: None)
            layers = tuple(
                _build_layer(src, partial, f"layer{i}{LAYER_SUFFIX}", key, show, tell)
                for i, src in enumerate(parsed)
            )
            built = _write_metadata(partial, layers, final_config, key, entries, signer)
            os.rename(partial, output)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # only our own, encrypted, files
            raise
    return built


def _check_build(principals: envelope.Principals, output: Path) -> None:
    """Refuse a build that could not succeed, before anything is made."""
    if not principals:
        raise UsageError(
            "nobody could open the image",
            "give --key-file, --key-command, --keyring, --passphrase or --recipient",
        )
    require_root("build an image")
    require_tools("cryptsetup", "veritysetup", "mkfs.ext4", "resize2fs")
    if output.exists() or output.is_symlink():
        raise UsageError(
            f"{output} already exists", "choose a new --output path (build never overwrites)"
        )
    if not output.parent.is_dir():
        raise UsageError(
            f"{output.parent} does not exist", "create the directory that will hold the image"
        )


def _write_metadata(
    image_dir: Path,
    layers: tuple[Layer, ...],
    config: ImageConfig,
    key: Secret,
    entries: list[envelope.Entry],
    signer: Any,
) -> Manifest:
    """manifest.json, keys.json (`entries`: the image key wrapped for each principal, and the
    statement's MAC) and, with a signer, the statement's signature."""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    built = Manifest(
        layers,
        config,
        cipher=cryptsetup.CIPHER,
        key_bits=cryptsetup.KEY_BITS,
        sector_size=BLOCK,
        created=created,
    )
    built = replace(built, raw=built.encode())
    manifest_mod.save(image_dir, built)
    envelope.save(image_dir, entries, statement.mac(key, built.raw))
    if signer is not None:
        signatures.add(image_dir, built.raw, signer)
    return built


def _build_layer(
    source: Source,
    image_dir: Path,
    filename: str,
    key: Secret,
    show: Callable[[str, int], Progress],
    notice: Callable[[str], None],
) -> Layer:
    measure = source.measure()
    for line in measure.left_out(source.label):
        notice(line)
    total = measure.blocks * BLOCK  # what filling the file system will take, about
    progress = show(filename.removesuffix(LAYER_SUFFIX), total)
    try:
        return _fill_layer(source, image_dir, filename, key, measure, progress)
    finally:
        progress.close()


def _fill_layer(
    source: Source,
    image_dir: Path,
    filename: str,
    key: Secret,
    measure: Measure,
    progress: Progress,
) -> Layer:
    """One layer: a LUKS2 file, its ext4 filled from `source` and shrunk, then its dm-verity
    hash tree."""
    progress.update("format", 0)
    path = image_dir / filename
    fs_bytes = _fs_bytes(measure.blocks, measure.inodes)
    header = _format_file(path, fs_bytes, key, filename)
    offset = int(header.metadata["segments"]["0"]["offset"])
    fs_size = _make_fs(path, fs_bytes, key, filename, source, measure, progress)
    size = offset + fs_size
    os.truncate(path, size)
    progress.update("hash", size)
    tree = image_dir / tree_name(filename)
    salt = secrets.token_hex(32)
    root_hash = veritysetup.format_tree(path, tree, salt)
    return Layer(
        filename,
        header.uuid,
        size,
        measure.content_bytes,
        source.label,
        offset,
        tree=tree.name,
        tree_size=tree.stat().st_size,
        root_hash=root_hash,
        salt=salt,
        digest=source.digest,
    )


def _format_file(path: Path, fs_bytes: int, key: Secret, filename: str) -> luksheader.Header:
    """A new LUKS2 file at `path` with room for `fs_bytes` of file system; its header."""
    with open(path, "xb") as f:
        f.truncate(cryptsetup.HEADER_BYTES + fs_bytes)
    cryptsetup.format_luks(path, key, label=f"cryptlayer {filename}")
    with open(path, "rb") as f:
        return luksheader.read(f.fileno(), path)


def _make_fs(
    path: Path,
    fs_bytes: int,
    key: Secret,
    filename: str,
    source: Source,
    measure: Measure,
    progress: Progress,
) -> int:
    """Open the LUKS2 file, make its ext4, copy `source` in, shrink it; its size in bytes."""
    name = build_mapping()
    with ExitStack() as stack:
        loop = losetup.attach(path, readonly=False)
        stack.callback(losetup.detach, loop)
        mapped = cryptsetup.open_luks(loop, name, key, readonly=False)
        stack.callback(devmapper.remove, name)
        inodes = _inodes(measure.inodes, fs_bytes, measure.blocks)
        mkfs.make_ext4(mapped, inodes=inodes, label=filename.removesuffix(LAYER_SUFFIX))
        # Below the private runtime directory (0700): the new file system's root is 0755, and
        # no other user may walk into the plaintext while it is filled.
        mnt = build_mount(name)
        mnt.mkdir(mode=0o700)
        stack.callback(mnt.rmdir)
        mount.mount(mapped, mnt, "ext4", mount.SCRATCH_OPTIONS)
        with ExitStack() as mounted:
            mounted.callback(mount.umount, mnt)
            with watching(mnt, progress, "copy"):
                source.populate(mnt)
            progress.update("shrink", measure.blocks * BLOCK)
            lost_found = mnt / "lost+found"
            if lost_found.is_dir() and not any(lost_found.iterdir()):
                lost_found.rmdir()  # mkfs made it; the source did not have it
        return mkfs.shrink(mapped)


def tree_name(filename: str) -> str:
    """layerN.luks -> layerN.verity"""
    return f"{filename.removesuffix(LAYER_SUFFIX)}{TREE_SUFFIX}"
