"""Identities in a TPM 2.0: an RSA key made inside the TPM, which never leaves it.

`cryptlayer keygen --tpm2 [--pcrs sha256:0,7] NAME` makes the key under the owner hierarchy's
storage parent (tools/tpm2.py), optionally bound to a PCR policy (only while those PCRs keep the
values they have now does the TPM use it), and writes NAME, the identity file (the key's public
blob and its private blob, which only this TPM can load, and the PCR selection), and NAME.pub, an
ordinary RSA public key for `build --recipient`. `--identity tpm2:NAME` unwraps with it: the TPM
does the raw RSA, keys/heldkey.py the OAEP. The result comes back on a pipe into a bytearray;
only public data and ciphertext are ever written to (a private, temporary) disk.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlayer.errors import CommandError, CryptlayerError, UsageError, WrongKeyError, printable
from cryptlayer.keys.heldkey import HeldKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

PREFIX = "tpm2:"
FORMAT = "cryptlayer.tpm2.v1"
BANKS = ("sha1", "sha256", "sha384", "sha512")
PCR_COUNT = 24
_PCRS = re.compile(r"^[a-z0-9]+:[0-9]+(,[0-9]+)*$")
# TPM response codes in tpm2-tools' messages: a policy check failed; the object's integrity (a
# blob that another TPM made, or another owner seed)
POLICY_FAILED = ("0x99d", "0x99D", "a policy check failed")
NOT_THIS_TPM = ("integrity check failed", "0x9a2", "0x1df", "0x2df")


class TpmError(CryptlayerError):
    """The TPM could not be reached or refused an operation."""


def parse_pcrs(spec: str) -> str:
    """A PCR selection as tpm2-tools takes it (`sha256:0,7`, banks joined by `+`), checked."""
    for bank in spec.split("+"):
        if not _PCRS.match(bank) or bank.split(":")[0] not in BANKS:
            raise UsageError(
                f"--pcrs {printable(spec)} is not a PCR selection",
                f"give BANK:N[,N...] with BANK one of {', '.join(BANKS)}, e.g. sha256:0,7",
            )
        indexes = [int(i) for i in bank.split(":")[1].split(",")]
        if any(i >= PCR_COUNT for i in indexes) or len(set(indexes)) != len(indexes):
            raise UsageError(
                f"--pcrs {printable(spec)} names a PCR twice or beyond {PCR_COUNT - 1}",
                "give each PCR once, from 0 to 23",
            )
    return spec


@contextmanager
def _workdir() -> Iterator[Path]:
    """A private directory for the contexts and blobs tpm2-tools wants as files."""
    path = Path(tempfile.mkdtemp(prefix="cryptlayer-tpm2-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _tpm_failed(err: CommandError, doing: str) -> TpmError:
    from cryptlayer.tools import tpm2

    return TpmError(
        f"the TPM ({tpm2.tcti()}) failed while {doing}: {printable(err.stderr.splitlines()[-1])}"
        if err.stderr
        else f"the TPM ({tpm2.tcti()}) failed while {doing}",
        "check that it is there (/dev/tpmrm0, or set TPM2TOOLS_TCTI) and that its owner"
        " hierarchy has no password",
    )


def create(path: Path, pcrs: str | None) -> str:
    """Make a key in the TPM; write the identity file PATH (0600) and PATH.pub. Returns its id."""
    from cryptlayer.fsutil import json_bytes, write_new_file
    from cryptlayer.keys.recipients import KeyKind, Recipient, load_public_pem
    from cryptlayer.tools import tpm2

    public_path = path.with_name(path.name + ".pub")
    for p in (path, public_path):
        if p.exists() or p.is_symlink():
            raise UsageError(f"{p} already exists", "choose another name; keygen never overwrites")
    with _workdir() as work:
        try:
            tpm2.create_primary(work / "parent.ctx")
            policy = None
            if pcrs is not None:
                policy = work / "policy.digest"
                tpm2.pcr_policy(pcrs, policy, work / "trial.ctx")
            tpm2.create_child(work / "parent.ctx", work / "key.pub", work / "key.priv", policy)
            tpm2.load(work / "parent.ctx", work / "key.pub", work / "key.priv", work / "key.ctx")
            pem = tpm2.public_pem(work / "key.ctx")
        except CommandError as err:
            raise _tpm_failed(err, "making the key") from err
        doc = {
            "format": FORMAT,
            "parent": tpm2.PRIMARY,
            "public": base64.b64encode((work / "key.pub").read_bytes()).decode(),
            "private": base64.b64encode((work / "key.priv").read_bytes()).decode(),
            "pcrs": pcrs or "",
            "public_key": pem,
        }
    recipient = Recipient(KeyKind.RSA, load_public_pem(pem.encode(), str(public_path)))
    write_new_file(path, json_bytes(doc), 0o600)
    try:
        write_new_file(public_path, pem.encode(), 0o644)
    except BaseException:
        path.unlink()
        raise
    return recipient.id


@dataclass(frozen=True)
class TpmKey(HeldKey):
    """A key made by `keygen --tpm2`, as its identity file describes it."""

    path: str
    public: bytes
    private: bytes
    pcrs: str
    rsa: RSAPublicKey

    def public_key(self) -> RSAPublicKey:
        return self.rsa

    def raw_decrypt(self, ciphertext: bytes) -> bytearray:
        from cryptlayer.tools import tpm2

        with _workdir() as work:
            (work / "key.pub").write_bytes(self.public)
            (work / "key.priv").write_bytes(self.private)
            (work / "wrapped").write_bytes(ciphertext)
            session = work / "session.ctx" if self.pcrs else None
            try:
                tpm2.create_primary(work / "parent.ctx")
                tpm2.load(
                    work / "parent.ctx", work / "key.pub", work / "key.priv", work / "key.ctx"
                )
                if session is not None:
                    tpm2.start_pcr_session(session, self.pcrs)
                return tpm2.rsa_decrypt_raw(work / "key.ctx", work / "wrapped", session)
            except CommandError as err:
                raise self._error(err) from err
            finally:
                if session is not None:
                    tpm2.flush(session)

    def _error(self, err: CommandError) -> CryptlayerError:
        if any(code in err.stderr for code in POLICY_FAILED):
            return WrongKeyError(
                f"the TPM's PCRs ({self.pcrs}) no longer match the values {self.path} was bound"
                " to: the machine's boot chain or state changed since `keygen --tpm2`",
                "open the image with another key or identity; if the change is wanted, make a new"
                " TPM key and add it (`cryptlayer rekey --add-recipient`)",
            )
        if err.argv[0] == "tpm2_load" and any(code in err.stderr for code in NOT_THIS_TPM):
            return WrongKeyError(
                f"the TPM did not load the key in {self.path}: it was made by another TPM, or"
                " this TPM's owner was cleared since",
                "open the image with another key or identity",
            )
        return _tpm_failed(err, f"unwrapping with {self.path}")


def _blob(doc: dict[str, Any], name: str) -> bytes:
    value = doc[name]
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"{name} is not base64") from None


def load_key(spec: str) -> TpmKey:
    """The key `tpm2:FILE` names; UsageError saying what is wrong with FILE."""
    import os

    from cryptlayer.keys.recipients import MAX_KEY_FILE, load_public_pem
    from cryptlayer.tools import tpm2

    path = spec.removeprefix(PREFIX)
    if not path:
        raise UsageError("--identity tpm2: names no file", "give tpm2:FILE, as keygen --tpm2 made")
    try:  # O_NONBLOCK: a FIFO is opened (and refused below), not waited on
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_KEY_FILE + 1) if stat.S_ISREG(st.st_mode) else b""
    except FileNotFoundError:
        raise UsageError(
            f"TPM identity {path} does not exist", "make one with `cryptlayer keygen --tpm2 NAME`"
        ) from None
    except OSError as err:
        raise UsageError(f"cannot read TPM identity {path}: {err.strerror}") from err
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(
            f"TPM identity {path} is not a regular file", "give the file keygen --tpm2 wrote"
        )
    if st.st_mode & 0o077:
        raise UsageError(
            f"TPM identity {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o})",
            f"chmod 600 {path}",
        )
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"it is not a {FORMAT} document")
        if doc.get("parent") != tpm2.PRIMARY:
            raise ValueError(f"its parent is not {tpm2.PRIMARY}")
        pcrs = doc.get("pcrs")
        if not isinstance(pcrs, str):
            raise ValueError("pcrs is not a string")
        if pcrs:
            parse_pcrs(pcrs)
        pem = doc.get("public_key")
        if not isinstance(pem, str):
            raise ValueError("public_key is not a string")
        public, private = _blob(doc, "public"), _blob(doc, "private")
    except (ValueError, UsageError, UnicodeDecodeError) as err:
        raise UsageError(
            f"TPM identity {path} is malformed: {err}",
            "give the file keygen --tpm2 wrote (not its .pub)",
        ) from None
    return TpmKey(path, public, private, pcrs, load_public_pem(pem.encode(), path))
