"""An image changed by someone without its key is refused (exit 8) before anything of theirs
runs or is opened, and nothing is erased: the statement's MAC, the LUKS2 header checks and the
pinned digest, against real cryptsetup. Each of these attacks worked before part 6."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MARKER_LOWER, Cli, image_key_of, keyslots, loop_device, own_status, slots

from cryptlayer import paths
from cryptlayer.errors import ExitCode
from cryptlayer.runtime import state

CHANGED = (
    "was changed by someone without the image key (its MAC does not match): do not run it;"
    " copy the image again from a source you trust\n"
)


def _edit(image: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((image / "manifest.json").read_text())
    change(doc)
    (image / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _swap_layers(doc: dict[str, Any]) -> None:
    doc["layers"].reverse()


EDITS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("command", lambda d: d["config"].update(cmd=["echo", "pwned"])),
    ("entrypoint", lambda d: d["config"].update(entrypoint=["echo", "pwned"])),
    ("environment", lambda d: d["config"].update(env=["LD_PRELOAD=/tmp/evil.so"])),
    ("user", lambda d: d["config"].update(user="0:0")),
    ("layers reordered", _swap_layers),
    ("top layer dropped", lambda d: d["layers"].pop()),
]


def test_changed_statement_runs_nothing(cli: Cli, image: Path, key_file: Path) -> None:
    """Every field `run` takes from manifest.json: run refuses each change; start and rekey
    (which share the check) the first."""
    pristine = (image / "manifest.json").read_bytes()
    for i, (what, change) in enumerate(EDITS):
        _edit(image, change)
        commands = [("run", "-k", str(key_file), str(image))]
        if i == 0:
            commands += [("start", "--name", "t", "-k", str(key_file), str(image)),
                         ("rekey", str(image), "-k", str(key_file), "--add-key", str(key_file))]  # fmt: skip
        for args in commands:
            code, out, err = cli(*args)
            assert (code, out, err) == (own_status(ExitCode.TAMPERED, args), "", f"error: {image}/manifest.json {CHANGED}"), (what, args)  # fmt: skip
        (image / "manifest.json").write_bytes(pristine)
    assert slots(image) == [1, 1]  # nothing erased
    assert cli.ok("run", "-k", str(key_file), str(image)) == f"{MARKER_LOWER}\n"


def test_duplicated_layer_is_refused(cli: Cli, image: Path, key_file: Path) -> None:
    _edit(image, lambda d: d["layers"].append(d["layers"][0]))
    code, _, err = cli("run", "-k", str(key_file), str(image))
    assert code == ExitCode.RUN_FAILED  # USAGE for the other commands
    assert err.startswith(
        f"error: {image}/manifest.json is malformed: a layer file is listed twice"
    )
    assert slots(image) == [1, 1]


def _null_header(path: Path, uuid: str, size: int) -> None:
    """A layer file whose header any key opens: a LUKS1 cipher_null volume converted to LUKS2
    (the 2025 header-swap attack), with the UUID of the layer it replaces."""
    with open(path, "wb") as f:
        f.truncate(max(size, 4 << 20))  # room for LUKS1's header; cut to `size` below
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1",
                    "--cipher", "cipher_null-ecb", "--key-size", "0", "--uuid", uuid,
                    "--pbkdf-force-iterations", "1000", "--key-file", "-", str(path)],
                   input=b"attacker", check=True)  # fmt: skip
    subprocess.run(["cryptsetup", "convert", "--batch-mode", "--type", "luks2", str(path)],
                   check=True)  # fmt: skip
    opened = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-",
                             str(path)], input=b"any key at all")  # fmt: skip
    assert opened.returncode == 0, "the crafted header must open with any key (the attack)"
    os.truncate(path, size)


def _layer(image: Path, index: int) -> dict[str, Any]:
    layer: dict[str, Any] = json.loads((image / "manifest.json").read_text())["layers"][index]
    return layer


def test_header_any_key_opens_is_refused(cli: Cli, image: Path, key_file: Path) -> None:
    """A layer swapped for a cipher_null one (manifest untouched, so its MAC still holds)."""
    top = _layer(image, 1)
    _null_header(image / "layer1.luks", top["uuid"], top["size"])
    code, out, err = cli("run", "-k", str(key_file), str(image))
    assert (code, out) == (ExitCode.RUN_FAILED, "")  # TAMPERED for the other commands
    assert err.startswith(
        f"error: the LUKS2 header of {image}/layer1.luks is not the one the image was built with:"
        " its data segment is "
    )
    assert "cipher_null-ecb" in err and err.count("\n") == 1
    assert keyslots(image / "layer0.luks") == 1  # the genuine layer was not erased


def test_layer_of_another_image_is_refused(
    cli: Cli, image: Path, key_file: Path, one_layer: tuple[Path, Path]
) -> None:
    """A genuine layer of another image, cut to this one's size: not the layer built here."""
    bottom = image / "layer0.luks"
    size = bottom.stat().st_size
    shutil.copyfile(one_layer[0] / "layer0.luks", bottom)
    with open(bottom, "r+b") as f:
        f.truncate(size)
    code, _, err = cli("run", "-k", str(key_file), str(image))
    assert code == ExitCode.RUN_FAILED  # TAMPERED for the other commands
    assert err.startswith(
        f"error: the LUKS2 header of {bottom} is not the one the image was built with: its UUID is"
    )


def test_header_copy_in_run_changed_while_running(
    cli: Cli, image: Path, key_file: Path, images: Path
) -> None:
    """A joiner proves its key against the header copy in /run (the disk's is erased): a copy
    swapped for one any key opens must not let a second container in."""
    cli.ok("start", "--name", "first", "-k", str(key_file), str(image))
    try:
        opening = state.load_opening(str(image))
        assert opening is not None and opening.erased
        evil = images / "evil.luks"
        _null_header(evil, _layer(image, 0)["uuid"], _layer(image, 0)["offset"] + (1 << 20))
        shutil.copyfile(evil, paths.header_copy(opening.id, 0))
        code, _, err = cli("start", "--name", "second", "-k", str(key_file), str(image))
        assert code == ExitCode.TAMPERED
        assert err.startswith(
            f"error: the LUKS2 header of {paths.header_copy(opening.id, 0)} is not the one the"
            " image was built with: its data segment is "
        )
        assert [r.name for r in state.all_records()] == ["first"]
    finally:
        cli.ok("stop", "first")
    assert slots(image) == [0, 0]


def test_pinned_digest(cli: Cli, image: Path, key_file: Path, tmp_path: Path) -> None:
    """`--digest` from inspect: that image runs (rekeyed too), another one does not."""
    digest = json.loads(cli.ok("inspect", "--json", str(image)))["digest"]
    other = tmp_path / "other.key"
    cli.ok("keygen", str(other))
    cli.ok("rekey", str(image), "-k", str(key_file), "--add-key", str(other))
    assert json.loads(cli.ok("inspect", "--json", str(image)))["digest"] == digest
    wrong = "sha256:" + "0" * 64
    code, _, err = cli("run", "--digest", wrong, "-k", str(key_file), str(image))
    assert (code, err) == (ExitCode.RUN_FAILED, (  # TAMPERED for the other commands
        f"error: {image} is image {digest}, not the {wrong} that was asked for: it may be an"
        " older or another image; copy the one you pinned\n"))  # fmt: skip
    out = cli.ok("run", "--keep", "--digest", digest, "-k", str(other), str(image))
    assert out == f"{MARKER_LOWER}\n"
    assert slots(image) == [1, 1]


@pytest.mark.parametrize("mac", ["", "AAAA"])
def test_keys_json_without_a_valid_mac(cli: Cli, image: Path, key_file: Path, mac: str) -> None:
    keys = json.loads((image / "keys.json").read_text())
    keys["statement_mac"] = mac
    (image / "keys.json").write_text(json.dumps(keys))
    code, _, err = cli("run", "-k", str(key_file), str(image))
    assert code == ExitCode.RUN_FAILED  # TAMPERED for the other commands
    assert ("carries no MAC" in err) == (mac == "")
    assert slots(image) == [1, 1]


# ---- dm-verity: the blocks themselves --------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _block_of(image: Path, key_file: Path, index: int, inside: str) -> int:
    """The byte offset in layer file `index` of the first block of file `inside` (found through
    the layer opened by hand, without verity)."""
    layer = _layer(image, index)
    image_key = image_key_of(image, key_file.read_bytes())
    with loop_device(image / layer["file"]) as device:
        subprocess.run(["cryptsetup", "open", "--readonly", "--key-file", "-", device,
                        "cltest-peek"], input=image_key, check=True)  # fmt: skip
        try:
            out = subprocess.run(["debugfs", "-R", f"bmap {inside} 0", "/dev/mapper/cltest-peek"],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        finally:
            subprocess.run(["cryptsetup", "close", "cltest-peek"], check=True)
    return int(layer["offset"]) + int(out.strip()) * 4096


VERITY_FAILED = (
    "does not match its dm-verity hash tree: it was changed after the build (the kernel refused"
    " the changed blocks): do not use this copy; copy the image again from a source you trust\n"
)


def test_changed_data_block_is_an_io_error_never_garbage(
    cli: Cli, image: Path, key_file: Path
) -> None:
    """AES-XTS is malleable: a flipped ciphertext bit decrypts to a garbled block, which the
    container read without an error before verity. Now the read fails and run says which layer."""
    _flip(image / "layer1.luks", _block_of(image, key_file, 1, "/data/hello.txt") + 100)
    code, out, err = cli("run", "-k", str(key_file), str(image))
    assert code == ExitCode.RUN_FAILED  # TAMPERED for the other commands
    assert out == ""  # not one garbled byte reached the container's output
    assert "I/O error" in err  # cat's own complaint, from inside the container
    assert err.splitlines()[-1] == (
        f"error: layer 1 of {image} failed dm-verity's check while in use: its blocks were"
        " changed after the build, and the container got I/O errors instead of them: do not"
        " trust this copy or what the container made of it; copy the image again"
    )
    assert slots(image) == [0, 0]  # the erase it promised still happened


def test_stop_reports_a_layer_found_changed(cli: Cli, image: Path, key_file: Path) -> None:
    _flip(image / "layer1.luks", _block_of(image, key_file, 1, "/data/hello.txt"))
    rootfs = Path(cli.ok("start", "--keep", "--name", "v", "-k", str(key_file), str(image)).strip())
    with pytest.raises(OSError) as caught:
        (rootfs / "data/hello.txt").read_bytes()
    assert caught.value.errno == errno.EIO
    code, _, err = cli("stop", "v")
    assert code == ExitCode.TAMPERED
    assert err.startswith(f"error: layer 1 of {image} failed dm-verity's check while in use")
    assert slots(image) == [1, 1]  # --keep


@pytest.mark.parametrize(
    ("what", "file", "offset"),
    [("keyslot area", "layer0.luks", 150_000), ("hash tree", "layer0.verity", 0)],
)
def test_changed_header_or_tree_is_refused_at_open(
    cli: Cli, image: Path, key_file: Path, what: str, file: str, offset: int
) -> None:
    """The keyslot area has no checksum of its own; the hash tree is the file beside the layer.
    Either changed: the kernel refuses the header's blocks when cryptsetup reads them."""
    assert cli.ok("verify", str(image)).endswith("layers:  2, each as the statement records it\n")
    _flip(image / file, offset)
    code, _, err = cli("verify", str(image))
    assert code == ExitCode.TAMPERED and "does not match its dm-verity hash tree" in err
    code, out, err = cli("run", "-k", str(key_file), str(image))
    assert (code, out, err) == (ExitCode.RUN_FAILED, "", f"error: layer file {image}/layer0.luks {VERITY_FAILED}"), what  # fmt: skip
    _flip(image / file, offset)  # put back: nothing was erased
    assert slots(image) == [1, 1]


def test_signed_image_runs_under_trust(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """A publisher signs with an SSH key; a host that trusts only that key runs the image, and
    refuses it once a second, untrusted signer's signature is all that is left."""
    publisher, stranger = tmp_path / "publisher", tmp_path / "stranger"
    for path in (publisher, stranger):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    trust = tmp_path / "allowed_signers"
    trust.write_text(
        "release@example " + " ".join(Path(f"{publisher}.pub").read_text().split()[:2]) + "\n"
    )
    cli.ok("sign", str(image), "--sign-key", str(publisher), "--name", "release")
    assert (
        cli.ok("verify", "--trust", str(trust), str(image)).splitlines()[1]
        == "signed:  release@example"
    )
    out = cli.ok("run", "--keep", "--trust", str(trust), "-k", str(key_file), str(image))
    assert out == f"{MARKER_LOWER}\n"
    (image / "signatures/release.sig").unlink()
    cli.ok("sign", str(image), "--sign-key", str(stranger), "--name", "other")
    code, out, err = cli("run", "--trust", str(trust), "-k", str(key_file), str(image))
    assert (code, out) == (ExitCode.RUN_FAILED, "")  # TAMPERED for the other commands
    assert err.startswith(f"error: no key of {trust} signed {image} (signatures/other.sig: SHA256:")
    assert slots(image) == [1, 1]
