"""After a job, no plaintext of the image or of what the container wrote is on the disk, and no
key (the user's or the image's, raw, hex or base64)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import MARKER_LOWER, MARKER_WRITTEN, Cli, image_key_of
from test_process import encodings

from cryptlayer.paths import state_root

CHUNK = 16 << 20


def holders_of(needles: list[bytes], path: Path) -> bool:
    """Whether any needle occurs in the bytes of `path` (a file or a whole block device)."""
    overlap = max(len(n) for n in needles)
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:]
    return False


def test_no_marker_in_any_file_or_on_the_raw_disk(cli: Cli, image: Path, key_file: Path) -> None:
    # Write the marker many times so it would certainly reach the disk if anything leaked.
    script = f"for i in $(seq 2000); do echo {MARKER_WRITTEN}; done > /root/big; sync; cat /data/hello.txt"
    secrets = encodings(key_file.read_bytes()) + encodings(
        image_key_of(image, key_file.read_bytes())
    )
    out = cli.ok("run", "--key-file", str(key_file), str(image), "--", "sh", "-c", script)
    assert out == f"{MARKER_LOWER}\n"
    subprocess.run(["sync"], check=True)
    needles = [MARKER_LOWER.encode(), MARKER_WRITTEN.encode()]
    files = [p for root in (image, state_root()) for p in root.rglob("*") if p.is_file()]
    assert files, "nothing to scan"
    assert [p for p in files if holders_of(needles + secrets, p)] == []
    device = os.environ.get("CRYPTLAYER_SCRATCH_DEVICE")
    if device:  # in the VM: the whole scratch disk, including freed blocks
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        assert not holders_of(needles + secrets, Path(device))
