"""Every key source opens a real image: file, standard input, a command, the kernel keyring."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import MARKER_LOWER, Cli

from cryptlayer.errors import ExitCode


def test_each_key_source_opens_the_image(cli: Cli, image: Path, key_file: Path) -> None:
    key = key_file.read_bytes()
    sources = {
        "file": ["--key-file", str(key_file)],
        "stdin": ["--key-file", "-"],
        "command": ["--key-command", f"cat {key_file}"],
        "keyring": ["--keyring", "cryptlayer-test"],
    }
    subprocess.run(["keyctl", "padd", "user", "cryptlayer-test", "@u"], input=key, check=True,
                   capture_output=True)  # fmt: skip
    try:
        for name, args in sources.items():
            out = cli.ok("run", "--keep", *args, str(image), input=key if name == "stdin" else None)
            assert out == f"{MARKER_LOWER}\n", name
    finally:
        subprocess.run(
            ["keyctl", "purge", "user", "cryptlayer-test"], check=False, capture_output=True
        )
    code, _, err = cli("run", "--keyring", "cryptlayer-test", str(image))
    assert code == ExitCode.USAGE
    assert err.startswith("error: no user key 'cryptlayer-test' in the user or session keyring")
