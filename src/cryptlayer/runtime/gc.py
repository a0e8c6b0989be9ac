"""Garbage collection: tear down what crashed processes left, and apply the shreds they owed."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptlayer.errors import CryptlayerError
from cryptlayer.fsutil import wipe_file
from cryptlayer.image.manifest import LAYER_SUFFIX, MANIFEST, TREE_SUFFIX
from cryptlayer.paths import (
    CACHE_TEMP_PREFIX,
    CACHE_TEMP_STALE,
    cached_blobs_dir,
    images_run_dir,
    run_root,
    scratch_dir,
)
from cryptlayer.runtime import journal, lazy, state
from cryptlayer.runtime.container import teardown
from cryptlayer.runtime.journal import Kind
from cryptlayer.runtime.state import Mode, Record
from cryptlayer.tools import devmapper, losetup, mount, nbd, udev

SYS_BLOCK = Path("/sys/block")


@dataclass
class Report:
    """What gc did."""

    containers: list[str] = field(default_factory=list)  # records torn down
    shredded: list[str] = field(default_factory=list)  # images erased
    orphans: list[str] = field(default_factory=list)  # resources no record knew
    errors: list[str] = field(default_factory=list)


def _abandoned(record: Record) -> bool:
    """A record nobody will finish: its owner died, or the machine restarted since it was made
    (an idle started container is not abandoned). An engine's container (one with a holder,
    state.Holder) is abandoned once its creator is gone and its real runtime no longer holds
    it: the engine deleted it without telling cryptlayer-runtime, or the create died before the
    runtime made it."""
    if record.from_earlier_boot():
        return True
    holder = state.load_holder(record.name)
    if holder is not None:
        if state.being_created(record.name) or (record.pid and record.owner_alive()):
            return False
        return not holder.knows()
    if record.mode is Mode.START and record.pid == 0:
        return False
    return not record.owner_alive()


def collect() -> Report:
    """Tear down abandoned containers (completing the erases they owed), close image layers
    nobody uses, then anything of cryptlayer's that no journal claims."""
    report = Report()
    with state.locked():
        for record in state.all_records():
            if not _abandoned(record):
                continue
            done_before = record.shredded
            try:
                teardown(record)
            except CryptlayerError as err:
                report.errors.append(f"{record.name}: {err}")
                continue
            report.containers.append(record.name)
            if record.shred and record.shredded and not done_before:
                report.shredded.append(record.image)
            if not record.path.exists():
                state.forget_idle_holder(record.name)
        _collect_holders(report)
        for opening in state.all_openings():
            if state.users_of(opening.image):
                continue
            _try(report, f"layers of {opening.image}", lambda o=opening: journal.close_opening(o))
        _collect_orphans(report)
    return report


def _collect_holders(report: Report) -> None:
    """Holders of containers that no longer exist: the create was killed before its record was
    written, or a reboot ended it."""
    for name in state.holder_names():
        if not state.exists(name) and state.forget_idle_holder(name):
            report.orphans.append(f"holder of {name}")


def _collect_orphans(report: Report) -> None:
    """Remove what no journal claims, top of the stack first: mounts, mappings, loop and NBD
    devices, scratch files, header copies, images fetched for a lazy start, the block cache's
    dead temporary files, then the directories they leave empty."""
    live = state.all_journals()
    claimed = {s.ref for j in live for s in j.steps} | {s.device for j in live for s in j.steps}
    _collect_mounts(report, claimed)
    _collect_mappings(report, claimed)
    looped = {Path(s.ref) for j in live for s in j.steps if s.kind is Kind.LOOP}
    _collect_loops(report, claimed, looped)
    _collect_nbd(report, claimed)
    _collect_scratch_files(report, claimed)
    _collect_header_copies(report, images_run_dir(), claimed)
    _collect_fetched(report, claimed)
    _collect_cache_temps(report)
    _collect_empty_dirs(claimed)


def _collect_mounts(report: Report, claimed: set[str]) -> None:
    """Mounts under the run root, deepest first: the overlay sits on the layer and scratch
    mounts."""
    root = run_root()
    ours = [p for p in mount.mounted_paths() if root in p.parents and str(p) not in claimed]
    for target in sorted(ours, key=lambda p: len(p.parts), reverse=True):
        _try(report, f"mount {target}", lambda t=target: mount.umount(t))


def _collect_mappings(report: Report, claimed: set[str]) -> None:
    """cryptlayer's mappings, by dm UUID: found even if renamed. A mapping another sits on (a
    layer's dm-verity mapping under its LUKS mapping) is busy until that one is closed: close in
    passes, top first."""
    pending = [name for name in udev.cryptlayer_mappings() if name not in claimed]
    while pending:
        failed: list[tuple[str, CryptlayerError]] = []
        for name in pending:
            try:
                devmapper.remove(name)
                report.orphans.append(f"mapping {name}")
            except CryptlayerError as err:
                failed.append((name, err))
        if len(failed) == len(pending):
            report.errors += [f"mapping {name}: {err}" for name, err in failed]
            break
        pending = [name for name, _ in failed]


def _collect_loops(report: Report, claimed: set[str], files: set[Path]) -> None:
    """Loop devices backed by a scratch file or an image layer that no journal's loop step holds."""
    for device in udev.block_devices():
        if device.backing_file is None or device.node in claimed:
            continue
        backing = Path(device.backing_file.removesuffix(" (deleted)"))
        if backing in files:
            continue
        if scratch_dir() in backing.parents or _is_layer_file(backing):
            _try(report, f"loop {device.node}", lambda d=device.node: losetup.detach(d))


def _collect_nbd(report: Report, claimed: set[str]) -> None:
    """NBD devices attached by a lazy start (backend `cryptlayer:...`) that no journal's NBD step
    names: its journal was lost. The mappings over one went before; its server ends by itself
    when its last device is detached. A device attached by anything else is never touched."""
    for index, backend in sorted(nbd.attached().items()):
        node = nbd.device(index)
        if not backend.startswith(lazy.BACKEND_PREFIX) or {backend, node} & claimed:
            continue
        if held := _holders(index):  # a mapping gc could not remove: never pulled from under it
            report.errors.append(f"NBD device {node} ({backend}): in use by {', '.join(held)}")
            continue
        _try(report, f"NBD device {node} ({backend})", lambda n=node: lazy.detach(n))


def _holders(index: int) -> list[str]:
    """The devices that sit on /dev/nbdN (dm-0, ...)."""
    try:
        return sorted(p.name for p in (SYS_BLOCK / f"nbd{index}" / "holders").iterdir())
    except OSError:
        return []


def _collect_fetched(report: Report, claimed: set[str]) -> None:
    """Images fetched for a lazy start that no opening names: their maker died between making
    the directory and journaling it (lazy.work_dir). One whose maker lives holds its lock: kept."""
    parent = lazy.fetch_parent()
    if not parent.is_dir():
        return
    for work in sorted(parent.iterdir()):
        if str(work) in claimed:
            continue
        try:
            if lazy.remove_if_abandoned(work):
                report.orphans.append(f"fetched image {work}")
        except CryptlayerError as err:
            report.errors.append(str(err))


def _collect_cache_temps(report: Report) -> None:
    """The block cache's temporary chunk files whose writers died (older than CACHE_TEMP_STALE:
    a writer has the chunk in hand when it makes one, and renames it seconds later). The cache's
    locks are flocks, which the kernel releases with their holder: none is left to find."""
    top = cached_blobs_dir()
    if not top.is_dir():
        return
    now = time.time()
    for blob in sorted(top.iterdir()):
        try:
            entries = list(os.scandir(blob))
        except (NotADirectoryError, FileNotFoundError):
            continue
        for entry in entries:
            if not entry.name.startswith(CACHE_TEMP_PREFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # renamed by its writer, or removed by another scan
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > CACHE_TEMP_STALE:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    report.orphans.append(f"cache temporary file {entry.path}")


def _collect_scratch_files(report: Report, claimed: set[str]) -> None:
    """Scratch files no journal claims."""
    if scratch_dir().is_dir():
        for leftover in scratch_dir().iterdir():
            if str(leftover) not in claimed:
                _try(report, f"scratch file {leftover}", leftover.unlink)


def _collect_header_copies(report: Report, images: Path, claimed: set[str]) -> None:
    """Header copies and mount points of image openings that no journal knows."""
    if not images.is_dir():
        return
    mounted = mount.mounted_paths()
    for top in images.iterdir():
        if str(top) in claimed or not top.is_dir():
            continue
        for item in top.iterdir():
            if item.suffix == ".hdr":
                _try(report, f"header copy {item}", lambda p=item: wipe_file(p))
            elif item.is_dir() and item not in mounted:
                with contextlib.suppress(OSError):
                    item.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _collect_empty_dirs(claimed: set[str]) -> None:
    """Empty directories of containers that no longer exist (never descending into a mount, nor
    into the lazy start's: an empty one there may be being filled; _collect_fetched's)."""
    root = run_root()
    mounted = mount.mounted_paths()
    if root.is_dir():
        for top in root.iterdir():
            if (
                not top.is_dir()
                or top.name.startswith(".")
                or str(top) in claimed
                or top in mounted
                or top.resolve() == lazy.fetch_parent()
            ):
                continue
            for sub in top.iterdir():
                if sub.is_dir() and sub not in mounted:
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def _is_layer_file(path: Path) -> bool:
    """A layer of a cryptlayer image, or its dm-verity hash tree: a .luks or .verity file beside
    a manifest.json."""
    return path.suffix in (LAYER_SUFFIX, TREE_SUFFIX) and (path.parent / MANIFEST).is_file()


def _try(report: Report, what: str, action: object) -> None:
    try:
        action()  # type: ignore[operator]
        report.orphans.append(what)
    except CryptlayerError as err:
        report.errors.append(f"{what}: {err}")
