"""A container's life: assemble the layers into a root file system, run, tear down, shred.

Assembly: the image's read-only layers, shared with its other containers (layers.py); a scratch
volume (sparse file -> loop -> plain dm-crypt with a random key -> ext4) for the overlay's upper
layer; overlayfs; and, for a container that will shred, the erase of the on-disk keyslots.
Every step goes through journal.acquire.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlayer import paths
from cryptlayer.errors import CryptlayerError, TamperedImageError, UsageError
from cryptlayer.runtime import DEFAULT_SCRATCH, DEFAULT_STOP_TIMEOUT, journal, layers, state
from cryptlayer.runtime.journal import Kind, acquire, crash_point, mkdir
from cryptlayer.runtime.state import Mode, Record
from cryptlayer.tools import udev
from cryptlayer.tools.system import require_kernel, require_root, require_tools

# What only assembly needs is imported where it is done: a `stop` (and cryptlayer-runtime's
# `delete`, a process of its own) loads the journals, the records and udev, not the image's
# opener, the keys, the OCI config or the tools that build (docs/benchmarks/NOTES.md, figure 12;
# tests/unit/test_engine_imports.py keeps it so).
if TYPE_CHECKING:
    from types import FrameType

    from cryptlayer.image.manifest import Manifest
    from cryptlayer.image.opener import OpenedImage
    from cryptlayer.image.process import Overrides
    from cryptlayer.keys.node import NodeKeys
    from cryptlayer.keys.sources import Credential
    from cryptlayer.runtime.lazy import LazyLayers
    from cryptlayer.secret import Secret

TOOLS = ("cryptsetup", "mkfs.ext4")  # the programs a start runs (loops, mounts: system calls)


@dataclass(frozen=True)
class StartOptions:
    """How to assemble a container."""

    name: str
    shred: bool = True
    scratch_bytes: int = DEFAULT_SCRATCH
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    allow_shared_dir: bool = False  # an image directory others may write (see image/files.py)
    digest: str | None = None  # the image must be this one (image/opener.py checks all three)
    trust: Path | None = None  # an allowed_signers file: a key of it must have signed the image
    lazy: LazyLayers | None = None  # the image was fetched for a lazy start


def default_name(image: Path) -> str:
    """A fresh name like podman's: the image's name and a random suffix."""
    import secrets

    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in image.resolve().name)
    return state.check_name(f"{stem.lstrip('.-_')[:40] or 'cl'}-{secrets.token_hex(3)}")


def _open_scratch(stack: ExitStack, record: Record, size: int) -> Path:
    """The writable layer: plain dm-crypt over a sparse file; its key exists only in the kernel."""
    from cryptlayer.secret import Secret
    from cryptlayer.tools import BLOCK, cryptsetup, losetup, mkfs, mount

    paths.scratch_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    path = paths.scratch_file(record.name)

    def create() -> None:
        with open(path, "xb") as f:
            f.truncate(-(-size // BLOCK) * BLOCK)

    acquire(stack, record, Kind.FILE, str(path), create)
    loop = acquire(
        stack, record, Kind.LOOP, str(path), lambda: losetup.attach(path, readonly=False)
    )
    mapping = paths.scratch_mapping(record.name)

    def open_plain() -> str:
        with Secret.random(cryptsetup.KEY_BITS // 8) as key:
            return cryptsetup.open_plain(loop, mapping, key)

    node = acquire(stack, record, Kind.CRYPT, mapping, open_plain)
    mkfs.make_ext4(node, inodes=None, label="scratch")
    target = mkdir(stack, record, paths.scratch_mount(record.name))
    acquire(stack, record, Kind.MOUNT, str(target),
            lambda: mount.mount(node, target, "ext4", mount.SCRATCH_OPTIONS))  # fmt: skip
    for sub in ("upper", "work"):
        (target / sub).mkdir(mode=0o755)
    return target


def assemble(
    stack: ExitStack, record: Record, opened: OpenedImage, key: Secret, options: StartOptions
) -> Path:
    """Open (or join) the layers and stack them under the scratch layer; returns the rootfs."""
    from cryptlayer.tools import mount

    mkdir(stack, record, paths.container_dir(record.name))
    lowers = acquire(stack, record, Kind.IMAGE, str(opened.image),
                     lambda: layers.join(record, opened, key, options.lazy))  # fmt: skip
    scratch = _open_scratch(stack, record, options.scratch_bytes)
    rootfs = mkdir(stack, record, paths.rootfs_mount(record.name))
    # overlayfs lists the top layer first; by name, in the directory every layer is mounted in
    # (the options must fit in a page: 128 full paths would not)
    layers_dir = lowers[0].parent
    lowerdir = ":".join(p.relative_to(layers_dir).as_posix() for p in reversed(lowers))
    overlay_options = [
        f"lowerdir={lowerdir}",
        f"upperdir={scratch}/upper",
        f"workdir={scratch}/work",
        "nodev",  # device nodes an image carries open nothing (nor does the device cgroup)
    ]
    acquire(stack, record, Kind.MOUNT, str(rootfs),
            lambda: mount.mount("cryptlayer", rootfs, "overlay", overlay_options,
                                cwd=layers_dir))  # fmt: skip
    return rootfs


def _assemble_locked(
    image: Path,
    credential: Credential | NodeKeys,
    options: StartOptions,
    mode: Mode,
    overrides: Overrides | None = None,
) -> Record:
    """Assemble under the host lock; on failure everything acquired is released again.

    Once the record exists (the key already checked) a shredding container's record says so: a
    crash from then on ends with the image erased by `gc`. A failure this process sees before the
    erase began costs nothing: the container never ran, the image stays as it was. A mistyped key
    or a missing tool fails before any of this.
    """
    from datetime import UTC, datetime

    from cryptlayer.image.opener import Policy, open_image
    from cryptlayer.runtime.seccomp import load_profile
    from cryptlayer.tools import runtime

    require_root("start containers")
    require_tools(*TOOLS)
    policy = Policy(
        digest=options.digest, trust=options.trust, allow_shared=options.allow_shared_dir
    )
    # Every check of the image, in its one order; its files are used by descriptor from now on.
    with open_image(image, policy) as opened:
        require_kernel()
        if overrides is not None:
            runtime.runtime()  # fail on a missing runtime before touching any device
            load_profile()  # and on a missing seccomp profile
        created = datetime.now(UTC).isoformat(timespec="seconds")
        # Unwrapped before the host lock is taken: a passphrase's Argon2id takes seconds. The
        # statement and every layer's header are checked with it before anything else is done.
        with (
            _chosen(credential, opened) as chosen,
            opened.unlock(chosen) as key,
            state.locked(),
        ):
            layers.require_openable(opened)
            record = state.create(
                Record(
                    options.name,
                    str(opened.image),
                    options.shred,
                    mode,
                    os.getpid(),
                    created=created,
                    layers=len(opened.manifest.layers),
                    layer_ids=opened.files.identities(),
                )
            )
            _assemble_record(record, opened, key, options, overrides)
    return record


def _chosen(
    credential: Credential | NodeKeys, opened: OpenedImage
) -> AbstractContextManager[Credential]:
    """The Credential to unlock `opened` with: the one given (its caller wipes it), or the
    node's for it (`[[keys]]`: by its path, or its signers and digest, checked by now), wiped
    when done."""
    from contextlib import nullcontext

    from cryptlayer.keys.node import NodeKeys

    if isinstance(credential, NodeKeys):
        digest = opened.manifest.digest
        return credential.choose(opened.image, signers=opened.signers, digest=digest)
    return nullcontext(credential)


def _assemble_record(
    record: Record,
    opened: OpenedImage,
    key: Secret,
    options: StartOptions,
    overrides: Overrides | None,
) -> None:
    """Acquire everything `record` journals, then erase at start if it shreds. On a failure
    everything is released; before the erase began, the image is spared (`record.shred` off);
    from then on, the erase is completed (_finish_if_empty)."""
    with ExitStack() as stack:
        stack.callback(_finish_if_empty, record)
        spare = ExitStack()  # (unwound after all that is acquired below)
        spare.callback(_spare, record)
        stack.enter_context(spare)
        rootfs = assemble(stack, record, opened, key, options)
        if overrides is not None:
            _write_config(stack, record, rootfs, opened.manifest, overrides)
        if options.shred:
            spare.pop_all()  # the erase begins: a failure from here on leaves it to complete
            layers.erase_at_start(record, opened.files)
        record.rootfs = str(rootfs)
        record.pid = os.getpid() if record.mode is Mode.RUN else 0
        record.save()
        stack.pop_all()  # success: the journal now owns every resource


def _spare(record: Record) -> None:
    """Unwinding an assembly that failed before its erase began: the image stays as it was."""
    record.shred = False
    record.save()


def _write_config(
    stack: ExitStack,
    record: Record,
    rootfs: Path,
    manifest: Manifest,
    overrides: Overrides,
) -> None:
    """For `run`: the OCI runtime's config.json, and the container as the runtime will know it."""
    from cryptlayer.fsutil import write_json_atomic
    from cryptlayer.runtime.ocispec import runtime_config

    config = runtime_config(rootfs, record.name, manifest.config, overrides)
    config_path = paths.oci_config(record.name)
    acquire(stack, record, Kind.FILE, str(config_path),
            lambda: write_json_atomic(config_path, config, mode=0o600))  # fmt: skip
    acquire(stack, record, Kind.CONTAINER, paths.container_id(record.name), lambda: None)


def start(image: Path, credential: Credential | NodeKeys, options: StartOptions) -> Record:
    """Assemble a container and leave it assembled until `stop`; returns its record. The key is
    `credential`, or the node's (NodeKeys), chosen once the image is open and checked."""
    return _assemble_locked(image, credential, options, Mode.START)


def _finish_if_empty(record: Record) -> None:
    """After a teardown: complete an erase that a crash interrupted, and forget the record once
    nothing is left of it. Called under the host lock."""
    if record.shred and not record.shredded:
        from cryptlayer.image.shred import shred_image  # (the erase at start did it, unless cut)

        crash_point()
        if not layers.fetched_copy_gone(Path(record.image)):
            shred_image(Path(record.image), expected=record.layer_ids, allow_shared=True)
        record.shredded = True
        record.save()
    if not record.steps:
        crash_point()
        state.remove(record)


def teardown(record: Record) -> None:
    """Release every resource of `record` in reverse, then shred if owed and forget it."""
    try:
        journal.release_all(record)
        _confirm_gone(record)  # only after a clean release: its error must not mask the cause
    finally:
        _finish_if_empty(record)


def _confirm_gone(record: Record) -> None:
    """Ask the kernel (sysfs, through pyudev), not the tools, whether the container's mappings
    and loop devices are gone (and the image's shared ones, when no other container holds them).

    A loop device that udev's probe still held when it was detached goes when the probe ends:
    only when something is left is udev waited for (`udevadm settle`, a program start) and
    asked again.
    """
    left = _still_there(record)
    if left:
        udev.settle()
        left = _still_there(record)
    if left:
        raise CryptlayerError(
            f"devices of {record.name!r} are still there after teardown: {', '.join(left)}",
            "see what holds them (lsof, fuser), then run `cryptlayer gc`",
        )


def _still_there(record: Record) -> list[str]:
    left = udev.mappings(paths.container_mapping_prefix(record.name))
    files = {paths.scratch_file(record.name)}
    if state.load_opening(record.image) is None:  # we were its last user
        left += udev.mappings(layers.mapping_prefix(record.image))
        files.add(Path(record.image))
    return left + udev.loops_backed_by(files)


def _locked_teardown(record: Record) -> None:
    with state.locked():
        teardown(record)


def stop(name: str, *, force: bool = False) -> Record:
    """Tear down container NAME (and shred its image unless it was started with --keep).

    With `force`, processes holding its mounts are killed first (like tomb slam).
    """
    require_root("stop containers")
    with state.locked():
        record = state.load(name)
        if record.mode is Mode.RUN and record.owner_alive():
            raise UsageError(
                f"container {name!r} belongs to a running `cryptlayer run` (pid {record.pid})",
                "stop that process (Ctrl-C or kill) instead",
            )
        record.pid = os.getpid()
        record.save()
        corrupted = _corruption(record)
        try:
            if force:
                for step in reversed(record.steps):
                    if step.kind is Kind.MOUNT:
                        journal.kill_holders(Path(step.ref))
            teardown(record)
        except BaseException:
            if record.mode is Mode.START and record.path.exists():
                record.pid = 0  # still assembled, at rest: `stop` can be tried again
                record.save()
            raise
    if corrupted is not None:
        raise corrupted
    return record


def run(
    image: Path,
    credential: Credential | NodeKeys,
    options: StartOptions,
    overrides: Overrides,
    interactive: bool,
) -> int:
    """Assemble, run the container in the foreground, tear down; returns its exit status."""
    record = _assemble_locked(image, credential, options, Mode.RUN, overrides)
    credential.wipe()  # the layers are open: nothing needs the key any more
    corrupted: TamperedImageError | None = None
    try:
        status = _run_foreground(
            paths.container_dir(record.name),
            paths.container_id(record.name),
            interactive,
            options.stop_timeout,
        )
        corrupted = _corruption(record)
    finally:
        _shielded(_locked_teardown, record)
    if corrupted is not None:
        raise corrupted
    return status


def _corruption(record: Record) -> TamperedImageError | None:
    """What dm-verity found changed in the image's layers while they were open, if anything."""
    try:
        layers.require_uncorrupted(state.load_opening(record.image), record.image, record.layers)
    except TamperedImageError as err:
        return err
    return None


def _run_foreground(bundle: Path, cid: str, interactive: bool, stop_timeout: float) -> int:
    """`crun run` attached to our stdio, with our signals forwarded; returns its exit status.

    Like `podman stop`: a container whose init ignores the signal (PID 1 has no default
    handlers) is killed with SIGKILL `stop_timeout` seconds after the first signal.
    """
    from cryptlayer.tools import runtime

    stdin: Any = getattr(sys.stdin, "buffer", sys.stdin) if interactive else None
    crun = runtime.start_attached(bundle, cid, stdin)
    signalled_at: list[float] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        os.kill(crun.pid, signum)  # crun passes it on to the container's init
        if not signalled_at:
            signalled_at.append(time.monotonic())

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        while not crun.wait(timeout=0.5):
            if signalled_at and time.monotonic() - signalled_at[0] > stop_timeout:
                runtime.kill(cid, "KILL")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return crun.status


def _shielded(action: Any, *args: Any) -> None:
    """Run `action` with SIGINT/SIGTERM/SIGHUP held off, so teardown is never abandoned halfway."""
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        action(*args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
