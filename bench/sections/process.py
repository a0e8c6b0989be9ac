"""Figure 11: a one-layer `start` as a process, next to decrypt+untar of a real tree and
the same steps by hand in a shell; and where the process's time goes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import MiB, drop_caches, sh, summary, timed

from cryptlayer.image import envelope, manifest
from cryptlayer.keys.sources import Credential
from cryptlayer.runtime import container
from cryptlayer.tools import devmapper, losetup
from sections.base import (
    WORK,
    build,
    decrypt_untar,
    empty,
    encrypted_tar,
    key,
    process_start,
    settings,
    warm_caches,
)

# A real root file system's worth of real files, from this machine's /usr (the guest shares it):
# about 200 MiB in about 6,800 files, as a Debian minbase tree.
REAL_SOURCES = ("/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/perl")
REAL_FILLER = "/usr/share/locale"
REAL_BYTES = 200 * MiB


def real_tree(root: Path) -> dict[str, int]:
    """Copy real files into `root`: REAL_SOURCES whole, then REAL_FILLER's directories, in name
    order, until REAL_BYTES; its bytes and files."""
    root.mkdir(parents=True)
    total = files = 0

    def count(tree: Path) -> None:
        nonlocal total, files
        for path in tree.rglob("*"):
            if path.is_file() and not path.is_symlink():
                total, files = total + path.lstat().st_size, files + 1

    for source in REAL_SOURCES:
        copy = root / source.strip("/").replace("/", "_")
        shutil.copytree(source, copy, symlinks=True)
        count(copy)
    filler = root / "locale"
    filler.mkdir()
    for sub in sorted(Path(REAL_FILLER).iterdir()):
        if total >= REAL_BYTES:
            break
        if sub.is_dir() and not sub.is_symlink():
            shutil.copytree(sub, filler / sub.name, symlinks=True)
            count(filler / sub.name)
    return {"bytes": total, "files": files}


def start_as_process() -> dict[str, Any]:
    """Part 9: a one-layer `start` as users run it (a process), next to decrypt+untar of the same
    real tree and to the same steps run by hand in a shell, all in this run; and where the
    process's time goes (interpreter and imports, each program, udev waits, fsyncs, the rest)."""
    work = WORK / "process"
    tree = work / "tree"
    out: dict[str, Any] = {"content": real_tree(tree)}
    image = work / "img"
    out["build_s"] = build([tree], image)
    enc, dest = encrypted_tar(tree, work)
    shutil.rmtree(tree)
    out["baseline_decrypt_untar"] = summary(
        timed(lambda: decrypt_untar(enc, dest), settings.runs, setup=lambda: empty(dest))
    )
    shutil.rmtree(dest)
    enc.unlink()
    out["start_as_process"] = summary([process_start(image) for _ in range(settings.runs)])
    out["by_hand"] = summary([_start_by_hand(image, work) for _ in range(settings.runs)])
    out["start_as_process_warm"] = summary(
        [process_start(image, warm=True) for _ in range(settings.runs)]
    )
    out["by_hand_warm"] = summary(
        [_start_by_hand(image, work, warm=True) for _ in range(settings.runs)]
    )
    out["bare_python"] = summary(
        timed(lambda: sh(sys.executable, "-c", "pass"), settings.runs, cold=False)
    )
    out["import_cli"] = summary(
        timed(lambda: sh(sys.executable, "-c", "import cryptlayer.cli"), settings.runs, cold=False)
    )
    out["in_process"] = _start_split(image)
    shutil.rmtree(work)
    return out


HAND = """set -e
d=$(losetup -f --show -r "$IMG/$FILE"); t=$(losetup -f --show -r "$IMG/$TREE")
veritysetup open --no-superblock --hash sha256 --data-block-size 4096 --hash-block-size 4096 \\
  --data-blocks "$BLOCKS" --salt "$SALT" "$d" hand-verity "$t" "$ROOT"
cryptsetup open --type luks2 --readonly --key-file "$KEYFILE" /dev/mapper/hand-verity hand-layer
mount -o ro,noatime,noload,nodev,nosuid /dev/mapper/hand-layer "$W/lower"
truncate -s 1G "$W/scratch.img"; s=$(losetup -f --show "$W/scratch.img")
head -c 64 /dev/urandom > "$TMPDIR/hand-scratch.key"
cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \\
  --key-file "$TMPDIR/hand-scratch.key" --keyfile-size 64 "$s" hand-scratch
rm "$TMPDIR/hand-scratch.key"
mkfs.ext4 -q -F -b 4096 -m 0 -O ^has_journal -E root_owner=0:0,nodiscard,lazy_itable_init=1 \\
  /dev/mapper/hand-scratch
mount -o noatime,noinit_itable,nodev,nosuid /dev/mapper/hand-scratch "$W/scratch"
mkdir "$W/scratch/upper" "$W/scratch/work"
mount -t overlay -o "lowerdir=$W/lower,upperdir=$W/scratch/upper,workdir=$W/scratch/work" \\
  overlay "$W/rootfs"
"""


def _start_by_hand(image: Path, work: Path, warm: bool = False) -> float:
    """What `start --keep` does, as a shell script of the same tools (one bash process)."""
    layer = manifest.load(image).layers[0]
    hand = work / "hand"
    for d in ("lower", "scratch", "rootfs"):
        (hand / d).mkdir(parents=True, exist_ok=True)
    keyfile = Path(os.environ.get("TMPDIR", "/tmp")) / "hand-layer.key"  # tmpfs in the VM
    image_key = envelope.unlock(image, envelope.load(image).entries, Credential(key=key()))
    with image_key.view() as raw:
        keyfile.write_bytes(raw)
    keyfile.chmod(0o600)
    image_key.wipe()
    env = {**os.environ, "IMG": str(image), "FILE": layer.file, "TREE": layer.tree,
           "BLOCKS": str(layer.blocks), "SALT": layer.salt, "ROOT": layer.root_hash,
           "KEYFILE": str(keyfile), "W": str(hand)}  # fmt: skip
    drop_caches()
    if warm:
        warm_caches(python=False)
    begin = time.perf_counter()
    try:
        subprocess.run(["bash", "-c", HAND], env=env, check=True)
        return time.perf_counter() - begin
    finally:
        keyfile.unlink()
        for d in ("rootfs", "scratch", "lower"):
            subprocess.run(["umount", str(hand / d)], check=False)
        for m in ("hand-scratch", "hand-layer", "hand-verity"):
            devmapper.remove(m)
        for line in sh("losetup", "-n", "-O", "NAME,BACK-FILE", "-l").splitlines():
            device, _, backing = line.partition(" ")
            if backing.strip().startswith((str(image), str(hand))):
                losetup.detach(device)
        shutil.rmtree(hand)


def _start_split(image: Path) -> dict[str, Any]:
    """An in-process `start --keep`, with the time spent in each program, in udev waits and in
    fsyncs summed (the rest is cryptlayer's own Python: key, statement, headers, journal)."""
    from cryptlayer.tools import runner, udev

    programs: dict[str, float] = {}
    waits = [0.0, 0.0]  # udev, fsync
    spawn, wait_for_node, fsync = runner._spawn, udev.wait_for_node, os.fsync

    def timed_spawn(argv: Any, **kw: Any) -> Any:
        begin = time.perf_counter()
        try:
            return spawn(argv, **kw)
        finally:
            name = Path(argv[0]).name
            programs[name] = programs.get(name, 0.0) + time.perf_counter() - begin

    def timed_wait(node: str, timeout: float = 30.0) -> None:
        begin = time.perf_counter()
        try:
            wait_for_node(node, timeout)
        finally:
            waits[0] += time.perf_counter() - begin

    def timed_fsync(fd: int) -> None:
        begin = time.perf_counter()
        try:
            fsync(fd)
        finally:
            waits[1] += time.perf_counter() - begin

    runner._spawn, udev.wait_for_node, os.fsync = timed_spawn, timed_wait, timed_fsync  # type: ignore[assignment]
    try:
        drop_caches()
        begin = time.perf_counter()
        with Credential(key=key()) as credential:
            container.start(image, credential, container.StartOptions("bench", shred=False))
        total = time.perf_counter() - begin
    finally:
        runner._spawn, udev.wait_for_node, os.fsync = spawn, wait_for_node, fsync  # type: ignore[assignment]
    container.stop("bench")
    spent = sum(programs.values()) + sum(waits)
    return {"total_s": total, "programs_s": programs, "udev_waits_s": waits[0],
            "fsync_s": waits[1], "rest_s": total - spent}  # fmt: skip
