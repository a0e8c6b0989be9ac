"""Figures 1, 3, 4 and 5 for one input size: start, build, stop and shred, image size,
each next to its baseline (decrypt+untar, dd through dm-crypt, rm -rf and shred, the tar)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from common import MiB, drop_caches, group, make_tree, sh, summary, timed

from cryptlayer.build.sources import DirectorySource
from cryptlayer.image import luksheader, manifest
from cryptlayer.image.opener import Policy, open_image
from cryptlayer.keys.sources import Credential
from cryptlayer.runtime import container, state
from cryptlayer.runtime.layers import erase_at_start
from cryptlayer.tools import losetup
from sections.base import (
    PARTS,
    WORK,
    build,
    empty,
    encrypted_tar,
    image_bytes,
    key,
    process_start,
    settings,
    start_stop,
)


def start_latency_and_friends(size_mib: int, startup: float) -> dict[str, Any]:
    """Figures 1, 3, 4, 5 for one input size."""
    work = WORK / f"{size_mib}M"
    tree = work / "tree"
    content = make_tree(tree, size_mib * MiB, PARTS)
    parts = sorted(tree.iterdir())
    out: dict[str, Any] = {"content": content, "layers": {}}

    # Baseline: an AES-256 encrypted tar, decrypted and untarred to disk.
    enc, dest = encrypted_tar(tree, work)
    out["tar_bytes"] = enc.stat().st_size - 16  # CTR after openssl's 16-byte salt header

    def untar() -> None:
        empty(dest)

    def decrypt_untar() -> None:
        decrypt_untar(enc, dest)

    out["baseline_decrypt_untar"] = summary(timed(decrypt_untar, settings.runs, setup=untar))
    big = size_mib > 256  # under emulation each GiB of untar costs minutes: fewer runs
    out["baseline_rm_rf"] = summary(
        timed(
            lambda: shutil.rmtree(dest),
            1 if big else settings.runs,
            setup=lambda: (untar(), decrypt_untar()),
        )
    )
    # GNU shred is CPU-bound (its own PRNG): under emulation 3 passes over 64 MiB take a minute,
    # one pass over 256 MiB five. So: 3 passes at 64 MiB, 1 pass at 256 MiB, and above that
    # the 1-pass rate measured at the largest size so far, scaled (and marked as such).
    if big and settings.shred_s_per_mib:
        out["baseline_shred_passes"] = 1
        out["baseline_shred"] = {
            "median_s": settings.shred_s_per_mib * size_mib,
            "extrapolated": True,
        }
    else:
        passes, shred_runs = (3, settings.runs) if size_mib <= 64 else (1, 1)
        out["baseline_shred_passes"] = passes
        out["baseline_shred"] = summary(
            timed(
                lambda: subprocess.run(
                    f"find {dest} -type f -exec shred -n {passes} -u {{}} + && rm -rf {dest}",
                    shell=True,
                    check=True,
                ),
                shred_runs,
                setup=lambda: (untar(), decrypt_untar()),
            )
        )
        if passes == 1:
            settings.shred_s_per_mib = out["baseline_shred"]["median_s"] / size_mib
    shutil.rmtree(dest, ignore_errors=True)

    for layers in settings.layers:
        dirs = group(parts, layers, work / f"src{layers}")
        image = work / f"img{layers}"
        build_s = build(dirs, image)
        starts = [start_stop(image, Credential(key=key())) for _ in range(settings.runs)]
        per_layer: dict[str, Any] = {
            "build_s": build_s,
            "build_mib_s": content["bytes"] / MiB / build_s,
            "image_bytes": image_bytes(image),
            "start": summary(starts),
            "start_joining": summary(_starts_joining(image)),
        }
        if layers == 1:  # the same copy without dm-crypt (figure 3's second reference)
            per_layer["plain_copy_mib_s"] = content["bytes"] / MiB / _plain_copy(dirs[0], work)
        if layers == 1:  # as a process too: what a user waits for, start-up included
            per_layer["start_as_process"] = summary(
                [process_start(image) for _ in range(settings.runs)]
            )
            per_layer["start_as_process_minus_startup_s"] = (
                per_layer["start_as_process"]["median_s"] - startup
            )
        per_layer["stop_and_shred"] = summary(
            [_stop_and_shred(image, work / "headers") for _ in range(settings.runs)]
        )
        out["layers"][str(layers)] = per_layer
        shutil.rmtree(image)
        for d in dirs:
            shutil.rmtree(d)
    shutil.rmtree(work)
    return out


def _plain_copy(src: Path, work: Path) -> float:
    """Seconds for the build's own copy of `src` into an unencrypted ext4 on a loop device."""
    source = DirectorySource(src)
    measure = source.measure()
    plain, mnt = work / "plain.ext4", work / "plain-mnt"
    with open(plain, "wb") as f:
        f.truncate(2 * measure.blocks * 4096 + 64 * MiB)
    sh("mkfs.ext4", "-q", "-O", "^has_journal", "-N", str(measure.inodes + 64), str(plain))
    mnt.mkdir()
    loop = losetup.attach(plain, readonly=False)
    try:
        sh("mount", "-o", "noatime", loop, str(mnt))
        drop_caches()
        begin = time.perf_counter()
        try:
            source.populate(mnt)
        finally:
            sh("umount", str(mnt))  # written back, as the build's layer is
        return time.perf_counter() - begin
    finally:
        losetup.detach(loop)
        mnt.rmdir()
        plain.unlink()


def _starts_joining(image: Path) -> list[float]:
    """`start` while another container holds the image open: its layers are shared, so only
    the key check, the scratch and the overlay are left to do."""
    with Credential(key=key()) as credential:
        container.start(image, credential, container.StartOptions("bench-first", shred=False))
    try:
        return [
            start_stop(image, Credential(key=key()), "bench-join") for _ in range(settings.runs)
        ]
    finally:
        container.stop("bench-first")


def _stop_and_shred(image: Path, saved: Path) -> float:
    """What shredding costs a container: the erase (done at start now, so timed there, alone)
    plus its `stop` (teardown; the last user also wipes the header copies). The headers are
    saved before and put back after (untimed), so every run erases the same intact image."""
    layers = manifest.load(image).layers
    saved.mkdir(exist_ok=True)
    for layer in layers:
        luksheader.backup(image / layer.file, saved / layer.file)
    with Credential(key=key()) as credential:
        container.start(image, credential, container.StartOptions("bench-shred", shred=False))
    drop_caches()
    begin = time.perf_counter()
    with state.locked(), open_image(image, Policy()) as opened:
        record = state.load("bench-shred")
        erase_at_start(record, opened.files)
    erase = time.perf_counter() - begin
    drop_caches()
    begin = time.perf_counter()
    container.stop("bench-shred")
    took = erase + time.perf_counter() - begin
    for layer in layers:
        sh("cryptsetup", "luksHeaderRestore", "--batch-mode", str(image / layer.file),
           "--header-backup-file", str(saved / layer.file))  # fmt: skip
    shutil.rmtree(saved)
    return took
