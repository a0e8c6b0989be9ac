"""Opening an image (image/opener.py): the one order of its checks, on images whose layers are
LUKS2 headers written as cryptsetup writes them (luksfixtures; the VM tier opens real ones).

Each check comes before anything that relies on it: a wrong digest or an untrusted signature is
what is reported even when keys.json is damaged too (it is not read before); the directory is
read through the descriptor opened first, whatever its path means later; no key comes out of
unlock without the statement's MAC and every layer's header checked, in that order."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from clirunner import invoke
from luksfixtures import fake_image, metadata, write_layer

from cryptlayer.errors import (
    CryptlayerError,
    DamagedImageError,
    ErasedImageError,
    ExitCode,
    TamperedImageError,
    UsageError,
    WrongKeyError,
)
from cryptlayer.image import envelope, statement
from cryptlayer.image.opener import OpenedImage, Policy, open_image
from cryptlayer.keys.sources import Credential
from cryptlayer.secret import Secret

KEY = b"k" * 32  # fake_image's
SRC = Path(__file__).parents[2] / "src" / "cryptlayer"


def credential(key: bytes = KEY) -> Credential:
    return Credential(key=Secret(bytearray(key)))


def unlocked(opened: OpenedImage, key: bytes = KEY) -> bytes:
    with credential(key) as cred, opened.unlock(cred) as image_key, image_key.view() as data:
        return bytes(data)


def damage_keys_json(image: Path) -> None:
    (image / "keys.json").write_text("{not json")


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An Ed25519 key pair (ssh-keygen's) and an allowed_signers file that trusts it."""
    folder = tmp_path_factory.mktemp("publisher")
    key = folder / "ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    kind, blob = Path(f"{key}.pub").read_text().split()[:2]
    trust = folder / "allowed_signers"
    trust.write_text(f"publisher@test {kind} {blob}\n")
    return key, trust


def sign(image: Path, key: Path) -> None:
    from cryptlayer.image import signatures

    (image / "signatures").mkdir(exist_ok=True)
    raw = (image / "manifest.json").read_bytes()
    text = signatures.sign(signatures.load_signing_key(key), raw)
    (image / "signatures" / "publisher.sig").write_text(text)


# ---- the order of the checks --------------------------------------------------------------------


def test_a_good_image_opens_and_unlocks(image: Path) -> None:
    with open_image(image, Policy()) as opened:
        assert opened.image == image.resolve()
        assert [f.shown for f in opened.files.layers] == [image / "layer0.luks"]
        assert [f.shown for f in opened.files.trees] == [image / "layer0.verity"]
        assert len(unlocked(opened)) == 32
        opened.require_intact()
        fds = [opened.files.dir_fd, *(f.fd for f in opened.files.layers + opened.files.trees)]
    for fd in fds:  # closed with it
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_wrong_digest_is_reported_before_keys_json_is_read(image: Path) -> None:
    damage_keys_json(image)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(TamperedImageError) as err:
        open_image(image, Policy(digest=wrong))
    assert err.value.message.startswith(f"{image} is image sha256:")
    assert err.value.message.endswith(f"not the {wrong} that was asked for")
    # the digest right, the damage is found where the key is needed, and only there
    digest = "sha256:" + hashlib.sha256((image / "manifest.json").read_bytes()).hexdigest()
    with (
        open_image(image, Policy(digest=digest)) as opened,
        pytest.raises(UsageError, match=r"keys\.json is not valid JSON"),
        credential() as c,
    ):
        opened.unlock(c)


@pytest.mark.parametrize("command", ["start", "run"])
def test_start_and_run_report_the_digest_not_keys_json(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The whole command: a wrong --digest is the error, exit 8 (125 in run), nothing made."""
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(tmp_path / "none.toml"))
    damage_keys_json(image)
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    wrong = "sha256:" + "0" * 64
    args = ["--name", "c"] if command == "start" else ["--keep"]
    code, out, err = invoke(command, *args, "-k", str(key), "--digest", wrong, str(image))
    assert (code, out) == (ExitCode.TAMPERED if command == "start" else 125, "")
    line = err.splitlines()[-1]  # (after the host's warnings, if any)
    assert line.startswith(f"error: {image} is image sha256:")
    assert f"not the {wrong} that was asked for" in line and "keys.json" not in err
    assert not (tmp_path / "root" / "containers").exists()


def test_an_image_opened_without_its_layers_gives_no_key(image: Path) -> None:
    with (
        open_image(image, Policy(layers=False)) as opened,
        pytest.raises(RuntimeError, match="opened without its layers"),
        credential() as c,
    ):
        opened.unlock(c)


def test_an_untrusted_image_is_refused_before_keys_json_is_read(
    image: Path, publisher: tuple[Path, Path]
) -> None:
    key, trust = publisher
    damage_keys_json(image)
    with pytest.raises(TamperedImageError) as err:
        open_image(image, Policy(trust=trust))
    assert err.value.message == (f"no key of {trust} signed {image} (it has no signatures/*.sig)")
    sign(image, key)
    with open_image(image, Policy(trust=trust)) as opened:
        assert opened.signers == ("publisher@test",)


def test_the_signature_check_comes_before_the_layers(
    image: Path, publisher: tuple[Path, Path]
) -> None:
    """An unsigned image with a layer missing: the signature is what is reported."""
    (image / "layer0.luks").unlink()
    with pytest.raises(TamperedImageError, match=r"no key of .* signed"):
        open_image(image, Policy(trust=publisher[1]))
    with pytest.raises(DamagedImageError, match=r"layer file .*layer0\.luks is missing"):
        open_image(image, Policy())


def test_without_a_trust_file_verify_still_refuses_a_bad_signature(image: Path) -> None:
    (image / "signatures").mkdir()
    (image / "signatures" / "x.sig").write_text("not a signature")
    with open_image(image, Policy()) as opened:  # start asks nothing of signatures
        assert opened.signers == ()
    with pytest.raises(TamperedImageError) as err:
        open_image(image, Policy(all_signatures=True))  # verify does
    assert err.value.message.startswith(f"a signature of {image} does not verify (signatures/x.sig")


def test_a_shared_directory_is_refused_before_anything_is_read(image: Path) -> None:
    (image / "manifest.json").write_text("{not json")
    image.chmod(0o777)
    with pytest.raises(UsageError, match="is writable by users other than root"):
        open_image(image, Policy())
    with pytest.raises(DamagedImageError, match=r"manifest\.json is not valid JSON"):
        open_image(image, Policy(allow_shared=True))


def test_what_is_no_directory_is_said_so(tmp_path: Path) -> None:
    for path in (tmp_path / "none", tmp_path / "file"):
        if path.name == "file":
            path.write_text("")
        with pytest.raises(UsageError) as err:
            open_image(path, Policy())
        assert (err.value.message, err.value.hint) == (
            f"{path} is not an image directory",
            "give the --output of `cryptlayer build`",
        )


# ---- files by descriptor -------------------------------------------------------------------------


def test_a_layer_swapped_for_a_symlink_is_refused(image: Path, tmp_path: Path) -> None:
    os.rename(image / "layer0.luks", tmp_path / "elsewhere.luks")
    os.symlink(tmp_path / "elsewhere.luks", image / "layer0.luks")
    with pytest.raises(DamagedImageError) as err:
        open_image(image, Policy())
    assert err.value.message == (
        f"layer file {image}/layer0.luks is a symbolic link; refusing to follow it"
    )


def test_the_directory_is_read_through_its_descriptor(image: Path, tmp_path: Path) -> None:
    """Renamed, and its path made a symlink to another image, after it was opened: keys.json
    (read when unlocking, later) still comes from the directory that was opened."""
    other = fake_image(tmp_path / "other", key=b"o" * 32)
    with open_image(image, Policy()) as opened:
        os.rename(image, tmp_path / "moved")
        os.symlink(other, image)
        assert len(unlocked(opened)) == 32  # the other image's keys.json would refuse this key
        assert opened.image == image  # messages show the path the user gave
    with (
        open_image(image, Policy()) as opened,  # (the path now leads to the other image)
        pytest.raises(WrongKeyError, match="the key does not open this image"),
        credential() as c,
    ):
        opened.unlock(c)


def test_verify_reads_the_statement_and_the_layers_of_one_directory(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory swapped for a symlink to another image right after manifest.json was read.
    Before the opener, the statement was read by path and the directory opened afterwards:
    verify then refused the image that was read (the symlink), or checked the other image's
    layers against this one's statement."""
    from cryptlayer import fsutil
    from cryptlayer.image.verify import verify_image

    other = fake_image(tmp_path / "other", size=1 << 20)
    real = fsutil.read_untrusted
    swapped: list[str] = []

    def read_then_swap(name: str, limit: int, *, dir_fd: int | None = None) -> bytes:
        data = real(name, limit, dir_fd=dir_fd)
        if name.endswith("manifest.json") and not swapped:
            os.rename(image, tmp_path / "moved")
            os.symlink(other, image)
            swapped.append(name)
        return data

    monkeypatch.setattr(fsutil, "read_untrusted", read_then_swap)
    report = verify_image(image, None)
    assert swapped
    statement_read = (tmp_path / "moved" / "manifest.json").read_bytes()
    assert report.digest == "sha256:" + hashlib.sha256(statement_read).hexdigest()


def test_rekey_writes_keys_json_into_the_directory_it_opened(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory swapped for a symlink to another image while rekey checks the key: the new
    keys.json goes to the image that was opened and checked, never to the other one. (Before the
    opener, rekey wrote it by path, into the other image; this test failed.)"""
    from cryptlayer.image.rekey import rekey

    other = fake_image(tmp_path / "other", key=b"o" * 32)
    before = (other / "keys.json").read_bytes()
    swapped: list[bool] = []

    def swap(*_: object) -> None:  # (cryptsetup's key test: the fake layer has no real keyslot)
        if not swapped:
            os.rename(image, tmp_path / "moved")
            os.symlink(other, image)
            swapped.append(True)

    monkeypatch.setattr("cryptlayer.tools.cryptsetup.test_key", swap)
    with credential() as cred, envelope.Principals(keys=[Secret(bytearray(b"n" * 32))]) as add:
        change = rekey(image, cred, add, [])
    assert swapped and len(change.added) == 1
    assert (other / "keys.json").read_bytes() == before
    assert len(envelope.load(tmp_path / "moved").entries) == 2


def test_an_erase_completed_later_takes_only_the_recorded_files(image: Path) -> None:
    with open_image(image, Policy(sizes=False)) as opened:
        recorded = opened.files.identities()
        assert opened.files.trees == []  # (an erase needs no tree)
    with open_image(image, Policy(sizes=False, expected=recorded)):
        pass
    # another file of the same name and content (made while the first exists: another inode)
    (image / "copy.luks").write_bytes((image / "layer0.luks").read_bytes())
    os.rename(image / "copy.luks", image / "layer0.luks")
    with pytest.raises(UsageError) as err:
        open_image(image, Policy(sizes=False, expected=recorded))
    assert err.value.message == (
        f"layer file {image}/layer0.luks is not the file that the container opened"
        " (it was replaced)"
    )


# ---- unlock: the key, the statement's MAC, then the headers -----------------------------------


def other_header(image: Path) -> None:
    """layer0.luks with a header of another UUID (same size: the files open)."""
    write_layer(image / "layer0.luks", metadata(), uuid="11111111-2222-3333-4444-555555555555")


def forge_mac(image: Path) -> None:
    keys = envelope.load(image)
    raw = (image / "manifest.json").read_bytes()
    with Secret.random() as other_key:
        envelope.save(image, keys.entries, statement.mac(other_key, raw))


def test_unlock_checks_the_headers(image: Path) -> None:
    other_header(image)
    with (
        open_image(image, Policy()) as opened,  # (no key needed to hold the files)
        pytest.raises(TamperedImageError) as err,
        credential() as c,
    ):
        opened.unlock(c)
    assert err.value.message.startswith(
        f"the LUKS2 header of {image}/layer0.luks is not the one the image was built with:"
        " its UUID is"
    )


def test_unlock_checks_the_mac_before_the_headers(image: Path) -> None:
    other_header(image)
    forge_mac(image)
    with (
        open_image(image, Policy()) as opened,
        pytest.raises(TamperedImageError) as err,
        credential() as c,
    ):
        opened.unlock(c)
    assert err.value.message == (
        f"{image}/manifest.json was changed by someone without the image key"
        " (its MAC does not match)"
    )


def test_unlock_wipes_the_key_it_refuses(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other_header(image)
    handed: list[Secret] = []
    real = envelope.unlock

    def keep(*args: object) -> Secret:
        key = real(*args)  # type: ignore[arg-type]
        handed.append(key)
        return key

    monkeypatch.setattr(envelope, "unlock", keep)
    with (
        open_image(image, Policy()) as opened,
        pytest.raises(TamperedImageError),
        credential() as c,
    ):
        opened.unlock(c)
    assert len(handed) == 1 and len(handed[0]) == 0  # wiped


def test_an_erased_image_is_said_so(image: Path) -> None:
    meta = metadata()
    meta["keyslots"] = {}
    meta["digests"] = {}
    write_layer(image / "layer0.luks", meta)
    with open_image(image, Policy()) as opened, pytest.raises(ErasedImageError) as err:
        opened.require_intact()
    assert err.value.message == (
        f"image {image} was shredded (crypto-erased): no key can open it any more"
    )


# ---- written once -------------------------------------------------------------------------------


def test_only_the_opener_unwraps_an_image_key() -> None:
    """No module but the opener unwraps keys.json or checks the statement's MAC; the header
    check runs there and, for a joiner's key check, in runtime/layers.py."""
    calls = {
        "envelope.unlock(": {"image/opener.py"},
        "statement.authenticate(": {"image/opener.py"},
        "luksheader.require(": {"image/opener.py", "runtime/layers.py"},
    }
    for call, allowed in calls.items():
        found = {
            str(path.relative_to(SRC))
            for path in SRC.rglob("*.py")
            if re.search(re.escape(call), path.read_text())
        }
        assert found == allowed, call


# ---- review: the digest before the statement is parsed; recorded identities, all of them ------


@pytest.mark.parametrize(
    "statement", [b"{not json", b'{"format": "cryptlayer-image/v0"}', b"[]"], ids=str
)
def test_a_pinned_digest_is_checked_before_the_statement_is_parsed(
    image: Path, statement: bytes
) -> None:
    """Another manifest.json than the pinned one is that (exit 8), whatever it holds: not a
    damaged statement (exit 2) nor another complaint about bytes nobody asked for."""
    pinned = "sha256:" + hashlib.sha256((image / "manifest.json").read_bytes()).hexdigest()
    (image / "manifest.json").write_bytes(statement)
    found = "sha256:" + hashlib.sha256(statement).hexdigest()
    with pytest.raises(TamperedImageError) as err:
        open_image(image, Policy(digest=pinned))
    assert err.value.message == f"{image} is image {found}, not the {pinned} that was asked for"
    # unpinned, what is wrong with it is said as before
    with pytest.raises(CryptlayerError) as other:
        open_image(image, Policy())
    assert "asked for" not in other.value.message


def _with_layers(image: Path, count: int) -> None:
    """The image's statement listing `count` layers: layer0.luks, then copies of it."""
    from dataclasses import replace

    from cryptlayer.image import manifest as manifest_mod

    loaded = manifest_mod.load(image)
    first = loaded.layers[0]
    listed = [first]
    for i in range(1, count):
        name = f"layer{i}.luks"
        if not (image / name).exists():
            (image / name).write_bytes((image / "layer0.luks").read_bytes())
        listed.append(replace(first, file=name, tree=f"layer{i}.verity", uuid=first.uuid))
    built = replace(loaded, layers=tuple(listed))
    manifest_mod.save(image, replace(built, raw=built.encode()))


@pytest.mark.parametrize(("recorded", "now"), [(2, 1), (1, 2)], ids=["fewer", "more"])
def test_an_erase_refuses_a_statement_of_another_layer_count(
    image: Path, recorded: int, now: int
) -> None:
    """The erase `stop` or `gc` completes takes the files the container opened, all of them and
    only them: a statement rewritten meanwhile to list fewer (an erase that leaves layers
    unerased yet says done) or more (a file nobody opened) is refused."""
    _with_layers(image, recorded)
    with open_image(image, Policy(sizes=False)) as opened:
        ids = opened.files.identities()
    assert len(ids) == recorded
    _with_layers(image, now)
    with pytest.raises(UsageError) as err:
        open_image(image, Policy(sizes=False, expected=ids))
    assert err.value.message == (
        f"{image} lists {now} layer files, not the {recorded} that the container opened"
    )
