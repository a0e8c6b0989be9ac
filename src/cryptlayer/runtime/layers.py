"""An image's read-only layers: opened once per host, shared by every container of the image.

The first container to start from an image opens its layers in the image's *opening*
(state.Opening, a journal of its own); later containers join it; the last to go closes it
(journal's release of its IMAGE step). Per layer: read-only loops of the layer file and of its
hash tree, a dm-verity mapping of the file checked against the tree and the statement's root
hash, the LUKS mapping on top of that, and a read-only mount. So the kernel checks every block
read, the LUKS header at open and the data while the container runs: a changed block is an I/O
error, never silently wrong data (`corrupted_layers` says which layer was found so).

Erase at start: a container that will shred its image wipes the on-disk keyslots as soon as it
is assembled, so that a crash or a power cut leaves the disk's copy as unopenable as a clean
stop would. The open mappings keep working (the kernel holds their volume keys); the header
copies that let later containers prove their key and join live only in memory-backed /run.

A lazy start's image (docker://, lazy.py) is a copy fetched into memory-backed /run whose layer
files hold only their headers: erasing wipes their keyslots the same way. The node's disk never
held those headers (the block cache's copy was dropped at the fetch and the server does not
store them: distribution/lazy.py), and the copy goes with the opening, so once it is gone
nothing is left to erase (`fetched_copy_gone`). The registry's copy is the publisher's.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from cryptlayer import paths
from cryptlayer.errors import (
    CommandError,
    ErasedImageError,
    TamperedImageError,
    UsageError,
    WrongKeyError,
)
from cryptlayer.runtime import journal, state
from cryptlayer.runtime.journal import Kind, acquire, crash_point, mkdir
from cryptlayer.runtime.state import Opening, Record
from cryptlayer.tools import veritysetup

# The image's modules and the tools that open layers are imported where layers are opened: a
# teardown (container.stop) needs only mapping_prefix and require_uncorrupted from here. (lazy.py,
# the NBD server's, with socket, subprocess and nbd: ~0.4 s of a `delete` under emulation.)
if TYPE_CHECKING:
    import socket

    from cryptlayer.image.files import ImageFiles
    from cryptlayer.image.manifest import Layer, Manifest
    from cryptlayer.image.opener import OpenedImage
    from cryptlayer.runtime import lazy
    from cryptlayer.secret import Secret

PARALLEL = 4  # layers opened at once


def _dir(opening: Opening) -> Path:
    return paths.image_run_dir(opening.id)


def _header_copy(opening: Opening, index: int) -> Path:
    return paths.header_copy(opening.id, index)


def mapping_prefix(image: str) -> str:
    """The start of the names of an image's shared mappings."""
    return paths.image_mapping_prefix(state.image_id(image))


def mount_points(opening: Opening, manifest: Manifest) -> list[Path]:
    """Where the layers of `opening` are mounted, bottom first."""
    return [paths.layer_mount(opening.id, i) for i in range(len(manifest.layers))]


def require_openable(opened: OpenedImage) -> None:
    """ErasedImageError unless the image can be opened: from its disk, or by joining its opening.

    A container joining an open image needs the bottom layer's keyslot only (or its header copy,
    once erased at start): its key is checked against that one (`join`), the other layers are
    open already, and an erase (`shred`, or at start) always wipes the bottom layer first.
    """
    from cryptlayer.image.files import require_same

    files = opened.files
    image = str(files.image)
    opening = state.load_opening(image)
    joining = opening is not None and bool(state.users_of(image))
    if joining and opening is not None:
        require_same(files, opening.layers, "whose layers are open")
        if opening.erased:
            return
    opened.require_intact(first_only=joining)


def join(
    record: Record, opened: OpenedImage, key: Secret, lazy_layers: lazy.LazyLayers | None = None
) -> list[Path]:
    """Open the image's layers, or join the opening another container made; returns the mount
    points, bottom first. Called under the host lock, as the action of the record's IMAGE step.

    `key` comes from `opened.unlock`, which checked every layer's header against the statement;
    the first opener's cryptsetup reads each header again through its dm-verity mapping
    (blocks the statement's root hash vouches for), so only a joiner checks one here: the
    bottom layer's, or its copy in /run, right before its key is tested against it.

    With `lazy_layers` (an image fetched for a lazy start: its layer files hold only their
    headers), each layer's blob is an NBD device served from the registry instead of a loop
    device over the file (lazy.py); verity and LUKS over it as for a file.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    from cryptlayer.image import luksheader
    from cryptlayer.image.files import require_same
    from cryptlayer.tools import cryptsetup

    files, manifest = opened.files, opened.manifest
    image = str(files.image)
    opening = state.load_opening(image)
    if opening is not None and not state.users_of(image, besides=record.path):
        journal.close_opening(opening)  # left by a crash before its last user's IMAGE step
        opening = None
    if opening is not None:
        require_same(files, opening.layers, "whose layers are open")
        bottom = files.layers[0]
        if opening.erased:
            copy = _header_copy(opening, 0)
            with open(copy, "rb") as f:
                luksheader.require(f.fileno(), manifest, manifest.layers[0], copy)
            cryptsetup.test_key(copy, key)
        else:  # the layers are open already: prove the key first (read from the file itself)
            luksheader.require(bottom.fd, manifest, manifest.layers[0], bottom.shown)
            cryptsetup.test_key(bottom.path, key, bottom.shown)
        return mount_points(opening, manifest)
    opening = Opening(image, layers=files.identities())
    paths.openings_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    opening.save()
    _dir(opening).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with ExitStack() as stack, ExitStack() as ends:
        mkdir(stack, opening, _dir(opening))
        served: list[socket.socket | None] = [None] * len(manifest.layers)
        if lazy_layers is not None:
            from cryptlayer.runtime import lazy

            sockets = lazy.serve(stack, opening, lazy_layers)
            for end in sockets:  # the kernel holds its own once attached; the server the others
                ends.callback(end.close)
            served = list(sockets)
        # Layers are independent: each one's losetup, cryptsetup open and mount run in a thread
        # of its own (the programs run in parallel; the journal takes one update at a time).
        workers = min(PARALLEL, len(manifest.layers))
        with ThreadPoolExecutor(workers, thread_name_prefix="layer") as pool:
            opened_layers = [
                pool.submit(
                    _open_layer, stack, opening, manifest.layers[i], files, i, key, served[i]
                )
                for i in range(len(manifest.layers))
            ]
            wait(opened_layers)  # all of them, even when one fails: then every step is journaled
        for future in opened_layers:
            future.result()  # the first failure, raised once nothing runs any more
        stack.pop_all()  # the opening's journal owns them; its last user closes them
    return mount_points(opening, manifest)


def _open_layer(
    stack: ExitStack,
    opening: Opening,
    layer: Layer,
    files: ImageFiles,
    index: int,
    key: Secret,
    served: socket.socket | None = None,
) -> None:
    from cryptlayer.tools import cryptsetup, losetup, mount

    file, tree = files.layers[index], files.trees[index]
    path = file.shown
    if served is not None:  # lazy: the blob from the registry, through the NBD device
        from cryptlayer.runtime import lazy

        loop = lazy.attach(stack, opening, served, layer.size, lazy.backend_name(opening.id, index))
    else:
        loop = acquire(stack, opening, Kind.LOOP, str(path),
                       lambda: losetup.attach_fd(file.fd, readonly=True,
                                                 name=str(path)))  # fmt: skip
    tree_loop = acquire(stack, opening, Kind.LOOP, str(tree.shown),
                        lambda: losetup.attach_fd(tree.fd, readonly=True,
                                                  name=str(tree.shown)))  # fmt: skip
    checked_name = paths.verity_mapping(opening.id, index)

    def open_checked() -> str:
        return veritysetup.open_verity(
            loop, checked_name, tree_loop, layer.root_hash, layer.salt, layer.blocks
        )

    checked = acquire(stack, opening, Kind.CRYPT, checked_name, open_checked)
    mapping = paths.layer_mapping(opening.id, index)
    # A block that fails its check fails what read it (cryptsetup reading the header, mount
    # reading the superblock): then the verity mapping says the file was changed.
    try:
        node = acquire(stack, opening, Kind.CRYPT, mapping,
                       lambda: cryptsetup.open_luks(checked, mapping, key,
                                                    readonly=True))  # fmt: skip
        target = mkdir(stack, opening, paths.layer_mount(opening.id, index))
        acquire(stack, opening, Kind.MOUNT, str(target),
                lambda: mount.mount(node, target, "ext4", mount.LAYER_OPTIONS))  # fmt: skip
    except (WrongKeyError, CommandError, mount.MountError) as err:
        if veritysetup.corrupted(checked_name):
            from cryptlayer.runtime import lazy

            lazy.after_corruption(opening, [index])  # a lazy layer's chunks: fetched again
            raise _corrupted(path) from None
        if not isinstance(err, WrongKeyError):
            raise
        raise UsageError(
            f"the image key in keys.json does not open {path}",
            "the image is damaged (layers and keys.json differ); copy it again",
        ) from None


def _corrupted(path: Path) -> TamperedImageError:
    from cryptlayer.image.opener import changed_layer

    return changed_layer(path, found=" (the kernel refused the changed blocks)")


def corrupted_layers(opening: Opening, manifest_layers: int) -> list[int]:
    """Indices of the layers whose verity mapping met a block that does not match its tree."""
    return [
        i for i in range(manifest_layers)
        if veritysetup.corrupted(paths.verity_mapping(opening.id, i))
    ]  # fmt: skip


def require_uncorrupted(opening: Opening | None, image: str, count: int) -> None:
    """TamperedImageError naming the layers dm-verity found changed while they were in use."""
    if opening is None:
        return
    bad = corrupted_layers(opening, count)
    if bad:
        from cryptlayer.runtime import lazy  # (only then: a teardown imports little)

        names = ", ".join(f"layer {i}" for i in bad)
        shown = lazy.after_corruption(opening, bad) or image  # lazy: its reference, chunks dropped
        raise TamperedImageError(
            f"{names} of {shown} failed dm-verity's check while in use: its blocks were changed"
            " after the build, and the container got I/O errors instead of them",
            "do not trust this copy or what the container made of it; copy the image again",
        )


def _copy_header(stack: ExitStack, opening: Opening, index: int, copy: Path) -> None:
    """A copy of a layer's LUKS header, read through its verity mapping (checked blocks)."""
    from cryptlayer.image import luksheader

    checked = f"/dev/mapper/{paths.verity_mapping(opening.id, index)}"
    acquire(stack, opening, Kind.HEADER, str(copy),
            lambda: luksheader.backup(Path(checked), copy))  # fmt: skip


def fetched_copy_gone(image: Path) -> bool:
    """Whether `image` was a lazy start's fetched copy (under the memory-backed run root), now
    removed with its opening: the node's copy an erase owed is gone with it."""
    root = paths.run_root().resolve()
    return root in image.parents and not image.exists()


def erase_at_start(record: Record, files: ImageFiles) -> None:
    """Wipe the on-disk keyslots of every layer, keeping header copies in /run for joiners.

    The record says `shred` (since its creation), so a crash halfway leaves an erase that `gc`
    completes.
    """
    from cryptlayer.image.files import require_same
    from cryptlayer.image.shred import erase_layer

    opening = state.load_opening(str(files.image))
    if opening is None:
        raise ErasedImageError(f"image {files.image} is not open", "start the container again")
    require_same(files, opening.layers, "whose layers are open")
    if not opening.erased:
        with ExitStack() as stack:
            for i in range(len(files.layers)):
                _copy_header(stack, opening, i, _header_copy(opening, i))
            stack.pop_all()
        for layer in files.layers:
            erase_layer(layer)
            crash_point()
        opening.erased = True
        opening.save()
    record.shredded = True
    record.save()
