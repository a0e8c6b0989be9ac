"""What the sections share: the settings from the command line, the work directory and key,
building an image and timing a start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import drop_caches, sh

from cryptlayer.build.builder import build_image
from cryptlayer.image import envelope
from cryptlayer.keys.sources import Credential, Secret
from cryptlayer.runtime import container


@dataclass
class Settings:
    """devices.py's options; shred_s_per_mib is also learnt during the run."""

    sizes: list[int] = field(default_factory=lambda: [64, 256, 1024])  # MiB
    runs: int = 3
    layers: list[int] = field(default_factory=lambda: [1, 5, 20])
    concurrent: int = 20
    shred_s_per_mib: float = 0.0  # one pass of GNU shred, measured at the largest size < 1 GiB


settings = Settings()
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


def empty(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()


def encrypted_tar(tree: Path, work: Path) -> tuple[Path, Path]:
    """The baseline's input: `tree` as an AES-256-CTR encrypted tar; and where it untars to."""
    tar, enc = work / "tree.tar", work / "tree.tar.enc"
    sh("tar", "-C", str(tree), "-cf", str(tar), ".")
    sh("openssl", "enc", "-aes-256-ctr", "-pbkdf2", "-pass", f"file:{KEY}", "-in", str(tar),
       "-out", str(enc))  # fmt: skip
    tar.unlink()
    return enc, work / "untarred"


def decrypt_untar(enc: Path, dest: Path) -> None:
    dec = subprocess.Popen(["openssl", "enc", "-d", "-aes-256-ctr", "-pbkdf2", "-pass",
                            f"file:{KEY}", "-in", str(enc)], stdout=subprocess.PIPE)  # fmt: skip
    subprocess.run(["tar", "-C", str(dest), "-xf", "-"], stdin=dec.stdout, check=True)
    assert dec.wait() == 0


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


def warm_caches(python: bool) -> None:
    """Read the programs (and with `python`, cryptlayer's interpreter and modules) into the page
    cache, untimed, after a cache drop."""
    for argv in WARM_PROGRAMS:
        subprocess.run(argv, capture_output=True, check=False)
    if python:
        subprocess.run([sys.executable, "-c", WARM_PYTHON], check=True)


def process_start(image: Path, warm: bool = False) -> float:
    drop_caches()
    if warm:
        warm_caches(python=True)
    begin = time.perf_counter()
    sh(*CLI, "start", "--keep", "--key-file", str(KEY), "--name", "bench", str(image))
    took = time.perf_counter() - begin
    container.stop("bench")
    return took
