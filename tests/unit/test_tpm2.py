"""Identities in a TPM (keys/tpm2.py), against swtpm: keygen --tpm2, unwrap through the TPM with
the same envelope code keys.json uses, PCR policies, and each failure as one clear line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from clirunner import invoke
from copyfixtures import one_line
from hwfixtures import swtpm, tpm2
from luksfixtures import fake_image

from cryptlayer.errors import ExitCode, UsageError, WrongKeyError
from cryptlayer.image import envelope
from cryptlayer.keys.recipients import load_identity, load_recipient
from cryptlayer.keys.sources import Credential
from cryptlayer.secret import Secret

KEY = b"k" * 32  # fake_image's


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One swtpm for the file; its TCTI."""
    with swtpm(tmp_path_factory.mktemp("swtpm")) as tcti:
        yield tcti


@pytest.fixture
def tcti(tpm: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("TPM2TOOLS_TCTI", tpm)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the work directories would be left
    return tpm


def _keygen(path: Path, *more: str) -> str:
    code, _, err = invoke("keygen", "--tpm2", *more, str(path))
    assert code == 0, err
    return err


def _wrap_and_unwrap(identity: str, public: Path, tmp_path: Path) -> bytes:
    """Wrap a new image key to `public` (as build does), unwrap it with `identity`."""
    with Secret.random() as image_key, image_key.view() as data:
        wanted = bytes(data)
        entries = [envelope.for_recipient(image_key, load_recipient(str(public)))]
    with (
        Credential(identity=load_identity(identity)) as credential,
        envelope.unlock(tmp_path, entries, credential) as got,
        got.view() as data,
    ):
        assert bytes(data) == wanted
        return wanted


def _no_work_left(tmp_path: Path, tcti: str) -> None:
    assert not list(tmp_path.glob("cryptlayer-tpm2-*"))  # blobs and contexts removed
    assert tpm2(tcti, "tpm2_getcap", "handles-transient").strip() == ""  # nothing left loaded


def test_keygen_tpm2_key_unwraps_what_build_wraps(tcti: str, tmp_path: Path) -> None:
    out = tmp_path / "tpmkey"
    err = _keygen(out)
    assert f"use it as --identity tpm2:{out}" in err and "rsa:SHA256:" in err
    assert out.stat().st_mode & 0o777 == 0o600
    doc = json.loads(out.read_text())
    assert doc["format"] == "cryptlayer.tpm2.v1" and doc["pcrs"] == ""
    # the .pub is an ordinary RSA recipient: build --recipient takes it as it is
    assert load_recipient(f"{out}.pub").id == load_identity(f"tpm2:{out}").id
    _wrap_and_unwrap(f"tpm2:{out}", Path(f"{out}.pub"), tmp_path)
    _no_work_left(tmp_path, tcti)
    code, _, err = invoke("keygen", "--tpm2", str(out))
    assert code == ExitCode.USAGE
    assert err == f"error: {out} already exists: choose another name; keygen never overwrites\n"


def test_the_image_key_is_never_in_argv_or_the_log(
    tcti: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "tpmkey"
    _keygen(out)
    caplog.set_level(logging.DEBUG, logger="cryptlayer.run")
    key = _wrap_and_unwrap(f"tpm2:{out}", Path(f"{out}.pub"), tmp_path)
    logged = caplog.text
    assert "tpm2_rsadecrypt" in logged and "-o /proc/self/fd/1" in logged
    assert "(output is a secret)" in logged
    for form in (key.hex(), repr(key)):
        assert form not in logged


def test_a_pcr_policy_holds_until_a_pcr_changes(tcti: str, tmp_path: Path) -> None:
    out = tmp_path / "sealed"
    _keygen(out, "--pcrs", "sha256:0,7")
    assert json.loads(out.read_text())["pcrs"] == "sha256:0,7"
    _wrap_and_unwrap(f"tpm2:{out}", Path(f"{out}.pub"), tmp_path)
    tpm2(tcti, "tpm2_pcrextend", "7:sha256=" + "01" * 32)
    with pytest.raises(WrongKeyError) as caught:
        _wrap_and_unwrap(f"tpm2:{out}", Path(f"{out}.pub"), tmp_path)
    assert str(caught.value).startswith(
        f"the TPM's PCRs (sha256:0,7) no longer match the values {out} was bound to: the"
        " machine's boot chain or state changed since `keygen --tpm2`: open the image with"
        " another key"
    )
    _no_work_left(tmp_path, tcti)


def test_rekey_opens_an_image_through_the_tpm(
    tcti: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole opener (statement MAC included) with the key unwrapped by the TPM; after a PCR
    changes, the CLI says so in one line with the wrong-key status."""
    monkeypatch.setattr("cryptlayer.tools.cryptsetup.test_key", lambda *_: None)  # fake layer
    image = fake_image(tmp_path / "img", key=KEY)
    key, other = tmp_path / "key", tmp_path / "other"
    for path, data in ((key, KEY), (other, b"o" * 32)):
        path.write_bytes(data)
        path.chmod(0o600)
    out = tmp_path / "sealed"
    _keygen(out, "--pcrs", "sha256:1")
    code, _, err = invoke("rekey", str(image), "-k", str(key), "--add-recipient", f"{out}.pub")
    assert code == 0, err
    code, _, err = invoke("rekey", str(image), "--identity", f"tpm2:{out}", "--add-key", str(other))
    assert code == 0, err
    tpm2(tcti, "tpm2_pcrextend", "1:sha256=" + "02" * 32)
    code, _, err = invoke("rekey", str(image), "--identity", f"tpm2:{out}", "--remove", str(key))
    assert code == ExitCode.KEY
    assert one_line(err).startswith(
        f"error: the TPM's PCRs (sha256:1) no longer match the values {out} was bound to"
    )


def test_a_key_from_another_tpm_is_refused(tcti: str, tmp_path: Path) -> None:
    out = tmp_path / "tpmkey"
    _keygen(out)
    with swtpm(tmp_path / "other-tpm") as other, pytest.MonkeyPatch.context() as mp:
        mp.setenv("TPM2TOOLS_TCTI", other)
        with pytest.raises(WrongKeyError) as caught:
            _wrap_and_unwrap(f"tpm2:{out}", Path(f"{out}.pub"), tmp_path)
    assert str(caught.value).startswith(
        f"the TPM did not load the key in {out}: it was made by another TPM"
    )


def test_no_tpm_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hwfixtures import _free_port

    tcti = f"swtpm:host=127.0.0.1,port={_free_port()}"
    monkeypatch.setenv("TPM2TOOLS_TCTI", tcti)
    code, _, err = invoke("keygen", "--tpm2", str(tmp_path / "k"))
    assert code == ExitCode.FAILURE
    assert one_line(err).startswith(f"error: the TPM ({tcti}) failed while making the key: ")
    assert "TPM2TOOLS_TCTI" in err
    assert not (tmp_path / "k").exists() and not (tmp_path / "k.pub").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pcrs", "sha256:0,7"], "--pcrs binds a TPM key: give it with --tpm2"),
        (["--tpm2", "--rsa"], "give one of --x25519, --rsa and --tpm2"),
        (["--tpm2", "--pcrs", "md5:0"], "--pcrs md5:0 is not a PCR selection"),
        (["--tpm2", "--pcrs", "sha256:0,24"], "--pcrs sha256:0,24 names a PCR twice or beyond"),
    ],
)
def test_bad_keygen_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    code, _, err = invoke("keygen", *args, str(tmp_path / "k"))
    assert code == ExitCode.USAGE
    assert err.startswith(f"error: {message}")


def test_bad_identity_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text('{"format": "cryptlayer.tpm2.v1", "parent": "ecc256:aes128cfb"}')
    bad.chmod(0o600)
    with pytest.raises(UsageError, match=f"TPM identity {bad} is malformed: pcrs is not a string"):
        load_identity(f"tpm2:{bad}")
    bad.chmod(0o644)
    with pytest.raises(UsageError, match="is accessible by others"):
        load_identity(f"tpm2:{bad}")
    with pytest.raises(UsageError, match=f"TPM identity {tmp_path}/none does not exist"):
        load_identity(f"tpm2:{tmp_path}/none")


def test_a_fifo_as_the_identity_is_refused_not_waited_on(tmp_path: Path) -> None:
    """tpm2:FIFO: open() waited for a writer for ever (run in a child with a deadline so the
    test itself cannot hang). Failed before: the child hung."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "id"
    os.mkfifo(fifo, 0o600)
    code = f"from cryptlayer.keys import tpm2; tpm2.load_key('tpm2:{fifo}')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"TPM identity {fifo} is not a regular file" in done.stderr
