"""What needs no VM, on the host's real CPU: figure 8 (CLI start-up), and the parts of figures
2 and 4 that need no device-mapper (this host's kernel has none): the key check of `cryptsetup
open` and the erase of one layer, with the same cryptsetup calls cryptlayer makes. The cipher's
speed here puts figures 3 and 6, cipher-bound under emulation, in proportion."""

from __future__ import annotations

import re
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MiB, machine, record, sh, summary, timed

from cryptlayer.imagefiles import open_dir, open_layer
from cryptlayer.keys import Secret
from cryptlayer.shred import erase_layer
from cryptlayer.tools import cryptsetup

CLI = [sys.executable, "-m", "cryptlayer"]
RUNS = 15


def layer_without_mapping() -> dict[str, object]:
    """One layer's key check (`open --test-passphrase`) and erase (header copy, luksErase,
    luksDump check) on a LUKS2 file formatted as `build` formats layers."""
    with tempfile.TemporaryDirectory() as tmp:
        layer, copy = Path(tmp) / "layer0.luks", Path(tmp) / "layer0.hdr"
        key = Secret(bytearray(secrets.token_bytes(64)))

        def fresh() -> None:
            layer.unlink(missing_ok=True)
            copy.unlink(missing_ok=True)
            with open(layer, "wb") as f:
                f.truncate(64 * MiB)
            cryptsetup.format_luks(layer, key, label="bench")

        def erase() -> None:  # as at start: by descriptor, header copied first
            with open_dir(layer.parent) as files:
                opened = open_layer(files, layer.name, None)
                cryptsetup.header_backup(opened.path, copy)
                erase_layer(opened)

        fresh()
        out = {
            "cryptsetup_exec_only": summary(
                timed(lambda: sh("cryptsetup", "--version"), RUNS, cold=False)
            ),
            "key_check": summary(timed(lambda: cryptsetup.test_key(layer, key), RUNS, cold=False)),
            "erase": summary(timed(erase, RUNS, setup=fresh, cold=False)),
        }
        key.wipe()
    speed = sh("openssl", "speed", "-seconds", "1", "-bytes", "4096", "-evp", "aes-256-xts")
    match = re.search(r"AES-256-XTS\s+([\d.]+)k", speed)
    out["aes_256_xts_mib_s"] = float(match.group(1)) * 1000 / MiB if match else None
    return out


def main() -> None:
    record("machine_host", machine())
    figures = {
        "help": timed(lambda: sh(*CLI, "--help"), RUNS, cold=False),
        "ps": timed(lambda: sh(*CLI, "ps"), RUNS, cold=False),
        "bare_python": timed(lambda: sh(sys.executable, "-c", "pass"), RUNS, cold=False),
    }
    record("cli_startup_host", {name: summary(times) for name, times in figures.items()})
    record("layer_on_host", layer_without_mapping())


if __name__ == "__main__":
    main()
