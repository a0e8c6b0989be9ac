"""Figures 1-7, 10 and 11: everything that needs dm-crypt. Runs inside the VM (`make bench`).

Each cryptlayer figure is measured next to its baseline in the same run, on the same disk, with
caches dropped before every timed run. cryptlayer is called in-process (its own start-up taken
out); a few runs as a real process measure that start-up too, which the report shows separately.
Usage: devices.py [--sizes 64,256,1024] [--runs 3] [--layers 1,5,20] [--concurrent 20]
[SECTION...] (default: all of startup unlock limit sizes read concurrent verity process).
Arguments, not environment variables: the VM does not inherit the host's environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiB, drop_caches, group, machine, make_tree, record, sh, summary, timed

from cryptlayer.build.builder import build_image
from cryptlayer.build.sources import DirectorySource
from cryptlayer.image import envelope, luksheader, manifest
from cryptlayer.image.opener import Policy, open_image
from cryptlayer.keys.sources import Credential, Secret
from cryptlayer.runtime import container, state
from cryptlayer.runtime.layers import erase_at_start
from cryptlayer.tools import cryptsetup, devmapper, losetup

SIZES = [64, 256, 1024]  # MiB
RUNS = 3
LAYERS = [1, 5, 20]
CONCURRENT = 20
SHRED_S_PER_MIB = 0.0  # one pass of GNU shred, measured at the largest size below 1 GiB
SECTIONS = ("startup", "unlock", "limit", "sizes", "read", "concurrent", "verity", "process")
PARTS = 20
CLI = [sys.executable, "-m", "cryptlayer"]
WORK = Path(os.environ.get("CRYPTLAYER_SCRATCH", "/var/tmp")) / "bench"
KEY = Path(os.environ.get("TMPDIR", "/tmp")) / "bench.key"  # tmpfs in the VM
PASSPHRASE = b"correct horse battery staple"


def key() -> Secret:
    return Secret(bytearray(KEY.read_bytes()))


def build(dirs: list[Path], out: Path, passphrase: bool = False) -> float:
    principals = envelope.Principals(keys=[key()])
    if passphrase:
        principals.passphrases.append(Secret(bytearray(PASSPHRASE)))
    drop_caches()  # the source is read from the disk, as a build's would be
    start = time.perf_counter()
    with principals:
        build_image([str(d) for d in dirs], out, principals)
    return time.perf_counter() - start


def start_stop(image: Path, credential: Credential, name: str = "bench") -> float:
    """Seconds for `start` to a mounted root file system; then stop (untimed, image kept)."""
    drop_caches()
    begin = time.perf_counter()
    with credential:
        container.start(image, credential, container.StartOptions(name, shred=False))
    took = time.perf_counter() - begin
    container.stop(name)
    return took


def image_bytes(image: Path) -> int:
    return sum(p.stat().st_size for p in image.glob("*.luks"))


def cli_startup() -> dict[str, Any]:
    """The CLI's own start-up in this machine, to take out of process-level figures."""
    help_times = timed(lambda: sh(*CLI, "--help"), RUNS, cold=False)
    ps_times = timed(lambda: sh(*CLI, "ps"), RUNS, cold=False)
    bare = timed(lambda: sh(sys.executable, "-c", "pass"), RUNS, cold=False)
    return {"help": summary(help_times), "ps": summary(ps_times), "bare_python": summary(bare)}


def start_latency_and_friends(size_mib: int, startup: float) -> dict[str, Any]:
    """Figures 1, 3, 4, 5 for one input size."""
    work = WORK / f"{size_mib}M"
    tree = work / "tree"
    content = make_tree(tree, size_mib * MiB, PARTS)
    parts = sorted(tree.iterdir())
    out: dict[str, Any] = {"content": content, "layers": {}}

    # Baseline: an AES-256 encrypted tar, decrypted and untarred to disk.
    enc, dest = _encrypted_tar(tree, work)
    out["tar_bytes"] = enc.stat().st_size - 16  # CTR after openssl's 16-byte salt header

    def untar() -> None:
        _empty(dest)

    def decrypt_untar() -> None:
        _decrypt_untar(enc, dest)

    out["baseline_decrypt_untar"] = summary(timed(decrypt_untar, RUNS, setup=untar))
    big = size_mib > 256  # under emulation each GiB of untar costs minutes: fewer runs
    out["baseline_rm_rf"] = summary(
        timed(
            lambda: shutil.rmtree(dest),
            1 if big else RUNS,
            setup=lambda: (untar(), decrypt_untar()),
        )
    )
    # GNU shred is CPU-bound (its own PRNG): under emulation 3 passes over 64 MiB take a minute,
    # one pass over 256 MiB five. So: 3 passes at 64 MiB, 1 pass at 256 MiB, and above that
    # the 1-pass rate measured at the largest size so far, scaled (and marked as such).
    global SHRED_S_PER_MIB
    if big and SHRED_S_PER_MIB:
        out["baseline_shred_passes"] = 1
        out["baseline_shred"] = {"median_s": SHRED_S_PER_MIB * size_mib, "extrapolated": True}
    else:
        passes, shred_runs = (3, RUNS) if size_mib <= 64 else (1, 1)
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
            SHRED_S_PER_MIB = out["baseline_shred"]["median_s"] / size_mib
    shutil.rmtree(dest, ignore_errors=True)

    for layers in LAYERS:
        dirs = group(parts, layers, work / f"src{layers}")
        image = work / f"img{layers}"
        build_s = build(dirs, image)
        starts = [start_stop(image, Credential(key=key())) for _ in range(RUNS)]
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
            per_layer["start_as_process"] = summary([_process_start(image) for _ in range(RUNS)])
            per_layer["start_as_process_minus_startup_s"] = (
                per_layer["start_as_process"]["median_s"] - startup
            )
        per_layer["stop_and_shred"] = summary(
            [_stop_and_shred(image, work / "headers") for _ in range(RUNS)]
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
        return [start_stop(image, Credential(key=key()), "bench-join") for _ in range(RUNS)]
    finally:
        container.stop("bench-first")


# What a host that starts containers often has in its page cache: the programs' own files (the
# image stays cold). Under virtme-ng they come over 9p from the host, so a cold interpreter pays
# for reading some 300 Python modules that way, which no real disk makes it pay.
WARM_PROGRAMS = (("cryptsetup", "--version"), ("veritysetup", "--version"),
                 ("losetup", "--version"), ("mount", "--version"), ("mkfs.ext4", "-V"),
                 ("bash", "-c", "true"))  # fmt: skip
WARM_PYTHON = (
    "import cryptlayer.cli, cryptlayer.runtime.container, sh, pyudev,"
    " cryptography.hazmat.primitives.ciphers.aead"
)


def _warm(python: bool) -> None:
    """Read the programs (and with `python`, cryptlayer's interpreter and modules) into the page
    cache, untimed, after a cache drop."""
    for argv in WARM_PROGRAMS:
        subprocess.run(argv, capture_output=True, check=False)
    if python:
        subprocess.run([sys.executable, "-c", WARM_PYTHON], check=True)


def _process_start(image: Path, warm: bool = False) -> float:
    drop_caches()
    if warm:
        _warm(python=True)
    begin = time.perf_counter()
    sh(*CLI, "start", "--keep", "--key-file", str(KEY), "--name", "bench", str(image))
    took = time.perf_counter() - begin
    container.stop("bench")
    return took


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


def unlock_cost() -> dict[str, Any]:
    """Figure 2: a 10-layer image opened with a key file and with a passphrase."""
    work = WORK / "unlock"
    tree = work / "tree"
    make_tree(tree, 10 * MiB, 10)
    image = work / "img"
    build(sorted(tree.iterdir()), image, passphrase=True)
    with_key = [start_stop(image, Credential(key=key())) for _ in range(RUNS)]
    with_pass = [
        start_stop(image, Credential(passphrase=Secret(bytearray(PASSPHRASE)))) for _ in range(RUNS)
    ]
    entries = envelope.load(image).entries
    argon = timed(
        lambda: envelope.unlock(
            image, entries, Credential(passphrase=Secret(bytearray(PASSPHRASE)))
        ).wipe(),
        RUNS,
        cold=False,
    )
    # One layer's unlock alone: `cryptsetup open` with the image key, and what merely starting
    # the cryptsetup binary costs here (under emulation, most of it).
    image_key = envelope.unlock(image, entries, Credential(key=key()))
    loop = losetup.attach(image / "layer0.luks", readonly=True)
    mapping = "cryptlayer-bench-unlock"

    def close_if_open() -> None:
        if Path("/dev/mapper", mapping).exists():
            devmapper.remove(mapping)

    try:
        opens = timed(
            lambda: cryptsetup.open_luks(loop, mapping, image_key, readonly=True),
            RUNS * 3,
            setup=close_if_open,
            cold=False,
        )
        close_if_open()
    finally:
        close_if_open()
        losetup.detach(loop)
        image_key.wipe()
    exec_only = timed(lambda: sh("cryptsetup", "--version"), RUNS * 3, cold=False)
    kdf = next(e for e in entries if e.kind == "passphrase")
    shutil.rmtree(work)
    return {
        "layers": 10,
        "start_with_key_file": summary(with_key),
        "start_with_passphrase": summary(with_pass),
        "argon2id_unwrap": summary(argon),
        "argon2id_cost": {
            "iterations": kdf.param("iterations"),
            "memory_kib": kdf.param("memory_kib"),
        },
        "cryptsetup_open_one_layer": summary(opens),
        "cryptsetup_exec_only": summary(exec_only),
    }


def dm_crypt_limit() -> dict[str, Any]:
    """Figure 3's reference: what dm-crypt itself can write here."""
    bench = sh(
        "cryptsetup",
        "benchmark",
        "--cipher",
        cryptsetup.CIPHER,
        "--key-size",
        str(cryptsetup.KEY_BITS),
    )
    match = re.search(r"aes-xts\s+512b\s+([\d.]+)\s+MiB/s\s+([\d.]+)\s+MiB/s", bench)
    path = WORK / "dd.img"
    WORK.mkdir(parents=True, exist_ok=True)
    size = 512
    with open(path, "wb") as f:
        f.truncate(size * MiB)
    loop = losetup.attach(path, readonly=False)
    try:
        sh(
            "cryptsetup",
            "open",
            "--type",
            "plain",
            "--cipher",
            cryptsetup.CIPHER,
            "--key-size",
            str(cryptsetup.KEY_BITS),
            "--key-file",
            "/dev/urandom",
            "--keyfile-size",
            "64",
            loop,
            "cryptlayer-bench-dd",
        )
        try:
            dd = timed(
                lambda: sh(
                    "dd",
                    "if=/dev/zero",
                    "of=/dev/mapper/cryptlayer-bench-dd",
                    "bs=4M",
                    f"count={size // 4}",
                    "oflag=direct",
                    "conv=fsync",
                ),
                RUNS,
            )
        finally:
            sh("cryptsetup", "close", "cryptlayer-bench-dd")
    finally:
        losetup.detach(loop)
        path.unlink()
    return {
        "cryptsetup_benchmark_encrypt_mib_s": float(match.group(1)) if match else None,
        "cryptsetup_benchmark_decrypt_mib_s": float(match.group(2)) if match else None,
        "dd_through_mapping_mib_s": size / min(dd),
    }


def read_throughput(size_mib: int) -> dict[str, Any]:
    """Figure 6: reads through the container's root file system against a plain ext4 image."""
    work = WORK / "read"
    tree = work / "tree"
    make_tree(tree, size_mib * MiB, 1)
    src = tree / "part00"
    image = work / "img"
    build([src], image)
    plain = work / "plain.ext4"
    sh("mkfs.ext4", "-q", "-d", str(src), "-O", "^has_journal", str(plain), f"{size_mib * 2}M")

    def reads(root: Path) -> dict[str, float]:
        seq = timed(lambda: sh("sh", "-c", f"cat {root}/large* > /dev/null"), RUNS)
        small = timed(
            lambda: sh(
                "sh", "-c", f"find {root} -name 'small*' -print0 | xargs -0 cat > /dev/null"
            ),
            RUNS,
        )
        return {"sequential_s": min(seq), "small_files_s": min(small)}

    results: dict[str, Any] = {}
    mnt = work / "mnt"
    mnt.mkdir()
    loop = losetup.attach(plain, readonly=True)
    try:
        sh("mount", "-o", "ro", loop, str(mnt))
        results["plain_ext4"] = reads(mnt)
        sh("umount", str(mnt))
    finally:
        losetup.detach(loop)
    with Credential(key=key()) as credential:
        record_ = container.start(
            image, credential, container.StartOptions("bench-read", shred=False)
        )
    try:
        results["cryptlayer"] = reads(Path(record_.rootfs))
    finally:
        container.stop("bench-read")
    # The same layer opened by hand with dm-crypt's workqueues bypassed.
    image_key = envelope.unlock(image, envelope.load(image).entries, Credential(key=key()))
    loop = losetup.attach(image / "layer0.luks", readonly=True)
    try:
        sh_secret = [
            "cryptsetup",
            "open",
            "--readonly",
            "--perf-no_read_workqueue",
            "--perf-no_write_workqueue",
            "--key-file",
            "-",
            loop,
            "cryptlayer-bench-nowq",
        ]
        from cryptlayer.tools.runner import run

        run(sh_secret, secret=image_key)
        try:
            sh("mount", "-o", "ro,noload", "/dev/mapper/cryptlayer-bench-nowq", str(mnt))
            results["cryptlayer_no_workqueue"] = reads(mnt)
            sh("umount", str(mnt))
        finally:
            sh("cryptsetup", "close", "cryptlayer-bench-nowq")
    finally:
        losetup.detach(loop)
        image_key.wipe()
    shutil.rmtree(work)
    return {"size_mib": size_mib, **results}


def verity_cost(size_mib: int) -> dict[str, Any]:
    """Part 6: what dm-verity costs one layer, next to the same layer without it, in one run:
    opening it (loop, [tree loop, verity,] LUKS, mount: as start does, by hand), reading through
    it, the tree's share of a build, and the tree's size."""
    from cryptlayer.tools import veritysetup

    work = WORK / "verity"
    tree = work / "tree"
    make_tree(tree, size_mib * MiB, 1)
    image = work / "img"
    build_s = build([tree / "part00"], image)
    layer = manifest.load(image).layers[0]
    path, hashes = image / layer.file, image / layer.tree
    mnt = work / "mnt"
    mnt.mkdir()
    image_key = envelope.unlock(image, envelope.load(image).entries, Credential(key=key()))
    opened: list[str] = []

    def open_layer(verified: bool) -> None:
        loop = losetup.attach(path, readonly=True)
        opened.append(loop)
        below = loop
        if verified:
            tree_loop = losetup.attach(hashes, readonly=True)
            opened.append(tree_loop)
            below = veritysetup.open_verity(loop, "cryptlayer-bench-verity", tree_loop,
                                            layer.root_hash, layer.salt, layer.blocks)  # fmt: skip
        cryptsetup.open_luks(below, "cryptlayer-bench-layer", image_key, readonly=True)
        sh("mount", "-o", "ro,noload", "/dev/mapper/cryptlayer-bench-layer", str(mnt))

    def close_layer() -> None:
        sh("umount", str(mnt))
        devmapper.remove("cryptlayer-bench-layer")
        if Path("/dev/mapper/cryptlayer-bench-verity").exists():
            devmapper.remove("cryptlayer-bench-verity")
        while opened:
            losetup.detach(opened.pop())

    def reads() -> dict[str, float]:
        seq = timed(lambda: sh("sh", "-c", f"cat {mnt}/large* > /dev/null"), RUNS)
        small = timed(lambda: sh("sh", "-c", f"find {mnt} -name 'small*' -print0"
                                 " | xargs -0 cat > /dev/null"), RUNS)  # fmt: skip
        return {"sequential_s": min(seq), "small_files_s": min(small)}

    out: dict[str, Any] = {"size_mib": size_mib, "build_s": build_s}
    for verified in (False, True):
        name = "verity" if verified else "plain_luks"
        opens = []
        for _ in range(RUNS):
            drop_caches()
            begin = time.perf_counter()
            open_layer(verified)
            opens.append(time.perf_counter() - begin)
            close_layer()
        open_layer(verified)
        try:
            out[name] = {"open": summary(opens), **reads()}
        finally:
            close_layer()
    image_key.wipe()
    spare = work / "spare.verity"

    def tree_again() -> None:
        veritysetup.format_tree(path, spare, layer.salt)

    out["tree_format"] = summary(
        timed(tree_again, RUNS, setup=lambda: spare.unlink(missing_ok=True))
    )
    out["layer_bytes"], out["tree_bytes"] = layer.size, layer.tree_size
    shutil.rmtree(work)
    return out


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
    enc, dest = _encrypted_tar(tree, work)
    shutil.rmtree(tree)
    out["baseline_decrypt_untar"] = summary(
        timed(lambda: _decrypt_untar(enc, dest), RUNS, setup=lambda: _empty(dest))
    )
    shutil.rmtree(dest)
    enc.unlink()
    out["start_as_process"] = summary([_process_start(image) for _ in range(RUNS)])
    out["by_hand"] = summary([_start_by_hand(image, work) for _ in range(RUNS)])
    out["start_as_process_warm"] = summary([_process_start(image, warm=True) for _ in range(RUNS)])
    out["by_hand_warm"] = summary([_start_by_hand(image, work, warm=True) for _ in range(RUNS)])
    out["bare_python"] = summary(timed(lambda: sh(sys.executable, "-c", "pass"), RUNS, cold=False))
    out["import_cli"] = summary(
        timed(lambda: sh(sys.executable, "-c", "import cryptlayer.cli"), RUNS, cold=False)
    )
    out["in_process"] = _start_split(image)
    shutil.rmtree(work)
    return out


def _empty(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()


def _encrypted_tar(tree: Path, work: Path) -> tuple[Path, Path]:
    """The baseline's input: `tree` as an AES-256-CTR encrypted tar; and where it untars to."""
    tar, enc = work / "tree.tar", work / "tree.tar.enc"
    sh("tar", "-C", str(tree), "-cf", str(tar), ".")
    sh("openssl", "enc", "-aes-256-ctr", "-pbkdf2", "-pass", f"file:{KEY}", "-in", str(tar),
       "-out", str(enc))  # fmt: skip
    tar.unlink()
    return enc, work / "untarred"


def _decrypt_untar(enc: Path, dest: Path) -> None:
    dec = subprocess.Popen(["openssl", "enc", "-d", "-aes-256-ctr", "-pbkdf2", "-pass",
                            f"file:{KEY}", "-in", str(enc)], stdout=subprocess.PIPE)  # fmt: skip
    subprocess.run(["tar", "-C", str(dest), "-xf", "-"], stdin=dec.stdout, check=True)
    assert dec.wait() == 0


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
        _warm(python=False)
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


def concurrent_starts(count: int = 20) -> dict[str, Any]:
    """Figure 7: `count` containers started at once from one image, as processes."""
    work = WORK / "concurrent"
    tree = work / "tree"
    make_tree(tree, 32 * MiB, 2)
    image = work / "img"
    build(sorted(tree.iterdir()), image)
    used = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            info = dict(
                line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()
            )
            used.append(int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0]))
            time.sleep(0.05)

    drop_caches()
    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(0.3)
    base = min(used)
    begin = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*CLI, "start", "--keep", "--key-file", str(KEY), "--name", f"c{i}", str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(count)
    ]
    errors = [p.stderr.read().decode() for p in procs if p.wait() != 0 and p.stderr]
    total = time.perf_counter() - begin
    stop.set()
    sampler.join()
    for i in range(count):
        try:
            container.stop(f"c{i}")
        except Exception as err:  # report it, and keep stopping the others
            errors.append(str(err))
    shutil.rmtree(work)
    return {
        "containers": count,
        "total_s": total,
        "peak_memory_mib": (max(used) - base) / 1024,
        "failures": errors,
    }


def main() -> None:
    global SIZES, RUNS, LAYERS, CONCURRENT, SHRED_S_PER_MIB
    import argparse

    numbers = lambda text: [int(n) for n in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=numbers, default=SIZES)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--layers", type=numbers, default=LAYERS)
    parser.add_argument("--concurrent", type=int, default=CONCURRENT)
    parser.add_argument(
        "--shred-rate",
        type=float,
        default=0.0,
        help="seconds per MiB of one shred pass, from an earlier run",
    )
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=" ".join(SECTIONS))
    args = parser.parse_args()
    if set(args.sections) - set(SECTIONS):
        parser.error(f"sections are {', '.join(SECTIONS)}")
    SIZES, RUNS, LAYERS, CONCURRENT = args.sizes, args.runs, args.layers, args.concurrent
    SHRED_S_PER_MIB = args.shred_rate
    sections = set(args.sections or SECTIONS)
    WORK.mkdir(parents=True, exist_ok=True)
    sh(*CLI, "keygen", str(KEY))
    try:
        record("machine_vm", machine())
        startup = cli_startup()
        record("cli_startup_vm", startup)
        if "unlock" in sections:
            record("unlock", unlock_cost())
        if "limit" in sections:
            record("dm_crypt_limit", dm_crypt_limit())
        for size in SIZES if "sizes" in sections else []:
            record(f"size_{size}", start_latency_and_friends(size, startup["help"]["median_s"]))
        if "read" in sections:
            record("read", read_throughput(min(256, max(SIZES))))
        if "concurrent" in sections:
            record("concurrent", concurrent_starts(CONCURRENT))
        if "verity" in sections:
            record("verity", verity_cost(min(256, max(SIZES))))
        if "process" in sections:
            record("process", start_as_process())
    finally:
        KEY.unlink()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
