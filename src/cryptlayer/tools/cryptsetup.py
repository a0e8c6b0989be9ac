"""cryptsetup: LUKS2 layer images and the plain dm-crypt scratch volume."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cryptlayer.errors import CommandError, UsageError, WrongKeyError
from cryptlayer.tools import BLOCK, devmapper, udev
from cryptlayer.tools.runner import run

if TYPE_CHECKING:
    from cryptlayer.secret import Secret

CIPHER = "aes-xts-plain64"
KEY_BITS = 512
HEADER_BYTES = 2 * 16 * 1024 + 256 * 1024  # where a layer's data begins; see FORMAT_OPTIONS
# Layer keys are 32 random bytes: stretching them buys nothing, so the cheapest PBKDF2 keeps an
# unlock in milliseconds (cryptsetup's default argon2id aims at 2 s and up to 1 GiB per layer).
FORMAT_OPTIONS = [
    "--type", "luks2",
    "--cipher", CIPHER,
    "--key-size", str(KEY_BITS),
    "--sector-size", str(BLOCK),
    "--hash", "sha256",
    "--pbkdf", "pbkdf2",
    "--pbkdf-force-iterations", "1000",
    # Two 16 KiB copies of the metadata and 256 KiB of keyslots (one keyslot: the image key;
    # people's keys wrap it in keys.json), and the data right after them: 288 KiB of header
    # per layer, where cryptsetup's defaults take 16 MiB (and its 1 MiB alignment, 1 MiB).
    "--luks2-metadata-size", "16k",
    "--luks2-keyslots-size", "256k",
    "--offset", str(HEADER_BYTES // devmapper.SECTOR),
]  # fmt: skip
# cryptsetup's exit status for "no key available with this passphrase"
EXIT_WRONG_KEY = 2


def format_luks(path: Path, key: Secret, label: str) -> None:
    """Write a LUKS2 header to `path` with one keyslot for `key`."""
    run(
        ["cryptsetup", "luksFormat", "--batch-mode", *FORMAT_OPTIONS, "--label", label,
         "--key-file", "-", str(path)],
        secret=key,
    )  # fmt: skip


def open_luks(device: str, name: str, key: Secret, *, readonly: bool) -> str:
    """Map LUKS2 `device` as /dev/mapper/NAME; WrongKeyError when `key` opens no keyslot."""
    argv = ["cryptsetup", "open", "--type", "luks2", "--key-file", "-"]
    if readonly:
        argv.append("--readonly")
    try:
        run([*argv, device, name], secret=key)
    except CommandError as err:
        if err.returncode == EXIT_WRONG_KEY:
            raise WrongKeyError(
                "the key does not open this image",
                "check --key-file; is it the key it was built with?",
            ) from err
        raise
    udev.wait_for_node(f"/dev/mapper/{name}")
    return f"/dev/mapper/{name}"


def test_key(path: Path, key: Secret, shown: Path | None = None) -> None:
    """Check that `key` opens a keyslot of `path` (a layer or a header copy), mapping nothing."""
    try:
        run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(path)], secret=key)
    except CommandError as err:
        if err.returncode == EXIT_WRONG_KEY:
            raise UsageError(
                f"the image key does not open {shown or path}",
                "the image is damaged; copy it again",
            ) from err
        raise


def open_plain(device: str, name: str, key: Secret) -> str:
    """Map `device` with plain dm-crypt: no header, so the key exists only in the kernel."""
    run(
        ["cryptsetup", "open", "--type", "plain", "--cipher", CIPHER, "--key-size", str(KEY_BITS),
         "--sector-size", str(BLOCK), "--key-file", "-", "--keyfile-size", str(KEY_BITS // 8),
         device, name],
        secret=key,
    )  # fmt: skip
    udev.wait_for_node(f"/dev/mapper/{name}")
    return f"/dev/mapper/{name}"


def _on_header(argv: list[str], path: Path, shown: Path | None) -> str:
    """Run a cryptsetup command on the LUKS2 header of layer file `path` (called `shown` in
    messages, when `path` is a descriptor's /proc link); its stdout."""
    try:
        return run([*argv, str(path)]).stdout
    except CommandError as err:
        detail = err.stderr.splitlines()[-1] if err.stderr else "no header"
        raise UsageError(
            f"{shown or path} is not a readable LUKS2 layer ({detail})",
            "the image is damaged or incomplete; rebuild it",
        ) from err


def erase(path: Path, shown: Path | None = None) -> None:
    """Wipe every keyslot of the LUKS header at `path` (luksErase; none left is no error)."""
    _on_header(["cryptsetup", "luksErase", "--batch-mode"], path, shown)
