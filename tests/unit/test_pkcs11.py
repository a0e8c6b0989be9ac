"""Identities in a PKCS#11 token (keys/pkcs11.py), against SoftHSM 2, and the OAEP decoding that
both hardware identities share (keys/heldkey.py)."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from clirunner import invoke
from copyfixtures import one_line
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from hwfixtures import SOFTHSM_MODULE, USER_PIN, Token, softhsm_conf, softhsm_import, softhsm_token
from luksfixtures import fake_image
from terminal import in_pty

from cryptlayer.errors import ExitCode, UsageError, WrongKeyError
from cryptlayer.image import envelope
from cryptlayer.keys.heldkey import HeldKey
from cryptlayer.keys.recipients import KeyKind, Recipient, load_identity, load_recipient
from cryptlayer.keys.sources import Credential
from cryptlayer.secret import Secret

KEY = b"k" * 32  # fake_image's


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Token, Path]]:
    """A SoftHSM token `tok` holding an RSA key `mykey` (id 01); the key's public PEM.

    SoftHSM reads its configuration once per process (C_Initialize), so the file's tokens are
    all made here, before anything loads the module."""
    base = tmp_path_factory.mktemp("softhsm")
    conf = softhsm_conf(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        token = softhsm_token(conf, "tok")
        softhsm_token(conf, "empty")
        code, _, err = invoke("keygen", "--rsa", str(base / "rsa"))
        assert code == 0, err
        softhsm_import(token, base / "rsa", "mykey", "01")
        (base / "rsa").unlink()  # from here on, the private key is only in the token
        yield token, base / "rsa.pub"


def _pin_file(tmp_path: Path, pin: str) -> str:
    path = tmp_path / f"pin{pin}"
    path.write_text(pin + "\n")
    path.chmod(0o600)
    return f"pin-source=file:{path}"


def _wrap(public: Path) -> tuple[bytes, list[envelope.Entry]]:
    with Secret.random() as image_key, image_key.view() as data:
        return bytes(data), [envelope.for_recipient(image_key, load_recipient(str(public)))]


def test_the_token_unwraps_what_build_wraps_to_its_public_key(
    hsm: tuple[Token, Path], tmp_path: Path
) -> None:
    token, public = hsm
    wanted, entries = _wrap(public)
    uri = token.uri("mykey", _pin_file(tmp_path, USER_PIN))
    identity = load_identity(uri)
    assert identity.id == load_recipient(str(public)).id
    assert identity.path == uri
    with (
        Credential(identity=identity) as credential,
        envelope.unlock(tmp_path, entries, credential) as got,
        got.view() as data,
    ):
        assert bytes(data) == wanted
    by_id = f"pkcs11:token=tok;id=%01?module-path={SOFTHSM_MODULE}&{_pin_file(tmp_path, USER_PIN)}"
    assert load_identity(by_id).id == identity.id


def test_rekey_opens_an_image_with_the_pin_on_stdin(
    hsm: tuple[Token, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole opener (statement MAC included), the PIN read from standard input."""
    monkeypatch.setattr("cryptlayer.tools.cryptsetup.test_key", lambda *_: None)  # fake layer
    token, public = hsm
    image = fake_image(tmp_path / "img", key=KEY)
    key, other = tmp_path / "key", tmp_path / "other"
    for path, data in ((key, KEY), (other, b"o" * 32)):
        path.write_bytes(data)
        path.chmod(0o600)
    code, _, err = invoke("rekey", str(image), "-k", str(key), "--add-recipient", str(public))
    assert code == 0, err
    uri = token.uri("mykey")
    args = ("rekey", str(image), "--identity", uri, "--add-key", str(other))
    code, _, err = invoke(*args, input=USER_PIN + "\n")
    assert code == 0, err
    assert len(json.loads((image / "keys.json").read_text())["entries"]) == 3
    code, _, err = invoke(*args[:4], "--remove", str(key), input="9999\n")
    assert code == ExitCode.KEY
    assert one_line(err) == (
        "error: the PIN for token tok is wrong: try again (a token locks itself after a few"
        " wrong PINs)"
    )


PROMPT_CHILD = """
import sys
from cryptlayer.keys.recipients import load_identity
print("ID", load_identity(sys.argv[1]).id)
"""


def test_the_pin_is_asked_on_the_terminal(hsm: tuple[Token, Path]) -> None:
    token, public = hsm
    argv = [sys.executable, "-c", PROMPT_CHILD, token.uri("mykey")]
    assert os.environ["SOFTHSM2_CONF"]
    status, out = in_pty(argv, [USER_PIN], timeout=60)
    assert status == 0, out
    assert "PIN for token tok:" in out
    assert f"ID {load_recipient(str(public)).id}" in out
    assert USER_PIN not in out  # echo was off


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        (
            "pkcs11:token=nosuch;object=mykey?module-path=" + SOFTHSM_MODULE,
            UsageError,
            f"no PKCS#11 token matches token=nosuch in {SOFTHSM_MODULE}: is it plugged in?",
        ),
        (
            "pkcs11:token=tok;object=nosuch?module-path=" + SOFTHSM_MODULE + "&PIN",
            UsageError,
            "token tok has no private keys with object=nosuch: ",
        ),
        (
            "pkcs11:token=empty;object=mykey?module-path=" + SOFTHSM_MODULE + "&PIN",
            UsageError,
            "token empty has no private keys with object=mykey: ",
        ),
        (
            "pkcs11:token=tok;object=mykey?module-path=" + SOFTHSM_MODULE + "&BADPIN",
            WrongKeyError,
            "the PIN for token tok is wrong: ",
        ),
        (
            "pkcs11:token=tok;object=mykey?pin-value=1234&module-path=" + SOFTHSM_MODULE,
            UsageError,
            "the PKCS#11 URI holds pin-value: a PIN on a command line is visible",
        ),
        (
            "pkcs11:token=tok;object=mykey;slot-id=3",
            UsageError,
            "the PKCS#11 URI's attribute slot-id=3 is not one cryptlayer takes",
        ),
        ("pkcs11:token=tok", UsageError, "the PKCS#11 URI pkcs11:token=tok names no key: "),
        (
            "pkcs11:token=tok;object=k?module-path=/nonexistent.so",
            UsageError,
            "cannot load the PKCS#11 module /nonexistent.so: ",
        ),
    ],
)
def test_each_failure_is_one_clear_error(
    hsm: tuple[Token, Path], tmp_path: Path, uri: str, error: type[Exception], message: str
) -> None:
    uri = uri.replace("BADPIN", _pin_file(tmp_path, "0000"))
    uri = uri.replace("PIN", _pin_file(tmp_path, USER_PIN))
    with pytest.raises(error) as caught:
        load_identity(uri)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_pin_file_others_can_read_is_refused(hsm: tuple[Token, Path], tmp_path: Path) -> None:
    token, _ = hsm
    source = _pin_file(tmp_path, USER_PIN)
    (tmp_path / f"pin{USER_PIN}").chmod(0o644)
    with pytest.raises(UsageError, match=r"the PIN file .* is accessible by others"):
        load_identity(token.uri("mykey", source))


class SoftKey(HeldKey):
    """An RSA key whose 'hardware' is pow(): to check the OAEP decoding against cryptography."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.path = "soft"

    def public_key(self) -> RSAPublicKey:
        return self.key.public_key()

    def raw_decrypt(self, ciphertext: bytes) -> bytearray:
        numbers = self.key.private_numbers()
        m = pow(int.from_bytes(ciphertext, "big"), numbers.d, numbers.public_numbers.n)
        return bytearray(m.to_bytes(256, "big").lstrip(b"\0"))  # as a token may: no leading 0


def test_oaep_decoding_matches_the_recipient_wrapping() -> None:
    soft = SoftKey()
    with Secret.random() as image_key, image_key.view() as data:
        wanted = bytes(data)
        wrapped = envelope.for_recipient(image_key, Recipient(KeyKind.RSA, soft.public_key()))
    ciphertext = base64.b64decode(wrapped.wrapped)
    got = soft.decrypt_oaep(ciphertext, envelope.INFO)
    assert got is not None
    with got.view() as data:
        assert bytes(data) == wanted
    assert soft.decrypt_oaep(ciphertext, b"another label") is None
    for i in (0, 100, 255):
        flipped = bytearray(ciphertext)
        flipped[i] ^= 1
        assert soft.decrypt_oaep(bytes(flipped), envelope.INFO) is None
    assert soft.decrypt_oaep(ciphertext[:-1], envelope.INFO) is None
    assert soft.decrypt_oaep(b"\xff" * 256, envelope.INFO) is None  # not below the modulus


def test_a_fifo_as_the_pin_source_is_refused_not_waited_on(tmp_path: Path) -> None:
    """pin-source naming a FIFO: open() waited for a writer for ever (run in a child with a
    deadline so the test itself cannot hang). Failed before: the child hung."""
    import subprocess

    fifo = tmp_path / "pin"
    os.mkfifo(fifo, 0o600)
    code = f"from cryptlayer.keys import pkcs11; pkcs11._pin_from_file('file:{fifo}')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"the PIN file {fifo} is not a regular file" in done.stderr


@pytest.mark.parametrize("how", ["relative", "others-write", "another-owner"])
def test_a_module_others_could_change_is_refused_before_it_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """module-path= is code that runs as root with the PIN and the image key: held as a cmd
    provider's program is (absolute; root's or the user's own, writable by no one else).
    Failed before: each was dlopen()ed (the copies then asked for a PIN)."""
    import shutil

    module = tmp_path / "libsofthsm2-copy.so"
    shutil.copy(SOFTHSM_MODULE, module)
    module.chmod(0o755)
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        module = Path(module.name)
    elif how == "others-write":
        module.chmod(0o757)
    else:
        os.chown(module, 65534, 65534)
    uri = f"pkcs11:token=tok;object=mykey?module-path={module}"
    with pytest.raises(UsageError) as caught:
        load_identity(uri)
    expected = "is not an absolute path" if how == "relative" else "writable by no one else"
    assert f"the PKCS#11 module {module}" in str(caught.value)
    assert expected in str(caught.value)


def test_the_module_checked_is_the_module_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module was checked by path and then dlopen()ed by path: another user who can rename in
    its directory swaps in their own .so between the two. The swap is made here at the last
    moment (as python-pkcs11 is asked to load it), which records what file its path then is
    (python-pkcs11 loads one module per process, so nothing is loaded here). Failed before: the
    other user's file."""
    import shutil

    import pkcs11 as python_pkcs11

    from cryptlayer.keys import pkcs11

    module = tmp_path / "libcheckedhsm.so"
    shutil.copy(SOFTHSM_MODULE, module)
    module.chmod(0o755)
    theirs = tmp_path / "theirs.so"
    shutil.copy(SOFTHSM_MODULE, theirs)
    os.chown(theirs, 65534, 65534)
    ours = module.stat().st_ino
    loaded: list[int] = []

    def swap_then_load(path: str) -> object:
        theirs.rename(module)
        loaded.append(os.stat(path).st_ino)
        return object()

    monkeypatch.setattr(python_pkcs11, "lib", swap_then_load)
    monkeypatch.setattr(pkcs11, "_LIBS", {})
    pkcs11._lib(pkcs11._module({"module-path": str(module)}))
    assert loaded == [ours]


def test_a_keys_json_naming_a_held_key_many_times_is_refused_before_any_is_tried(
    tmp_path: Path,
) -> None:
    """Each entry under a hardware identity's id is a decryption in the token or TPM (a TPM:
    five tpm2-tools runs, a second or so): a hostile keys.json with 256 of them kept the
    hardware busy for minutes. rekey never writes one id twice. Failed before: all 256 were
    tried, then 'does not open this image'."""
    import dataclasses

    from cryptlayer.keys.recipients import Identity

    class CountingKey(SoftKey):
        tried = 0

        def raw_decrypt(self, ciphertext: bytes) -> bytearray:
            CountingKey.tried += 1
            return super().raw_decrypt(ciphertext)

    held = CountingKey()
    identity = Identity(KeyKind.RSA, held, "soft")  # type: ignore[arg-type]
    with Secret.random() as other_key:
        entry = envelope.for_recipient(other_key, Recipient(KeyKind.RSA, held.public_key()))
    junk = base64.b64encode(b"\0" + os.urandom(255)).decode()  # below the modulus; no OAEP
    entries = [dataclasses.replace(entry, wrapped=junk)] * 256
    with pytest.raises(UsageError, match="256 entries for identity soft"):
        envelope.unlock(tmp_path, entries, Credential(identity=identity))
    assert CountingKey.tried == 0
