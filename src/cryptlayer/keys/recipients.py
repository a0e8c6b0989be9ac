"""Recipients and identities: public keys an image is wrapped to, private keys that open it.

An X25519 or RSA key pair is two PEM files, as `cryptlayer keygen --x25519/--rsa` writes them:
NAME (the private key, PKCS#8, mode 0600) and NAME.pub (SubjectPublicKeyInfo). RSA keys in
OpenSSH's formats (`ssh-rsa AAAA...` and `-----BEGIN OPENSSH PRIVATE KEY-----`) work too, so an
existing ssh host key can be a recipient. A recipient is named by the SHA-256 of its public key
(like ssh's fingerprints): `x25519:SHA256:...` or `rsa:SHA256:...`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from cryptlayer.errors import UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    from cryptlayer.keys.heldkey import HeldKey
    from cryptlayer.keys.providers import ProviderIdentity, ProviderRecipient

    PublicKey: TypeAlias = X25519PublicKey | RSAPublicKey
    PrivateKey: TypeAlias = X25519PrivateKey | RSAPrivateKey | HeldKey

RSA_BITS = 3072
MIN_RSA_BITS = 2048
MAX_KEY_FILE = 64 * 1024


class KeyKind(StrEnum):
    """The kinds of recipient key."""

    X25519 = "x25519"
    RSA = "rsa"


@dataclass(frozen=True)
class Recipient:
    """A public key the image key can be wrapped to."""

    kind: KeyKind
    key: PublicKey

    @property
    def id(self) -> str:
        return f"{self.kind}:{fingerprint(self.key)}"


@dataclass(frozen=True)
class Identity:
    """A private key that may unwrap the image key."""

    kind: KeyKind
    key: PrivateKey
    path: str

    @property
    def recipient(self) -> Recipient:
        return Recipient(self.kind, self.key.public_key())

    @property
    def id(self) -> str:
        return self.recipient.id


def fingerprint(key: PublicKey) -> str:
    """SHA256:base64 of the DER SubjectPublicKeyInfo, unpadded."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def _kind(key: object, path: str, what: str) -> KeyKind:
    from cryptography.hazmat.primitives.asymmetric import rsa, x25519

    from cryptlayer.keys.heldkey import HeldKey

    if isinstance(key, x25519.X25519PublicKey | x25519.X25519PrivateKey):
        return KeyKind.X25519
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey | HeldKey):
        if key.key_size < MIN_RSA_BITS:
            raise UsageError(
                f"{what} {path} is RSA-{key.key_size}",
                f"use at least {MIN_RSA_BITS} bits (keygen --rsa makes {RSA_BITS})",
            )
        return KeyKind.RSA
    raise UsageError(
        f"{what} {path} is a {type(key).__name__.lstrip('_')}, not an X25519 or RSA key",
        "make one with `cryptlayer keygen --x25519 NAME` (or --rsa)",
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise UsageError(
            f"{what} {path} does not exist",
            "make a key pair with `cryptlayer keygen --x25519 NAME`",
        ) from None
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror}") from err
    if len(data) > MAX_KEY_FILE:
        raise UsageError(
            f"{what} {path} is larger than {MAX_KEY_FILE} bytes", "is it really a key?"
        )
    return data


def load_recipient(path: str) -> Recipient | ProviderRecipient:
    """A public key from a PEM file or an `ssh-rsa` line; `provider:NAME[:PARAMS]` is an ocicrypt
    key provider (keys/providers.py)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from cryptlayer.keys import providers

    if providers.is_provider(path):
        return providers.recipient(path)
    data = _read(path, "recipient")
    try:
        if data.lstrip().startswith(b"ssh-"):
            key: object = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = "that is a private key; give its .pub" if b"PRIVATE" in data else "give a .pub file"
        raise UsageError(
            f"recipient {path} is not a PEM public key or an ssh-rsa line", hint
        ) from None
    return Recipient(_kind(key, path, "recipient"), key)  # type: ignore[arg-type]


def load_public_pem(data: bytes, path: str) -> RSAPublicKey:
    """An RSA public key (PEM) that a TPM or token gave; UsageError if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError(f"the public key of {path} is not an RSA public key (PEM)")
    _kind(key, path, "the key of")
    return key


def load_identity(path: str) -> Identity | ProviderIdentity:
    """A private key from a PEM (PKCS#8 or traditional) or OpenSSH file; refused if others can
    read it, as ssh refuses an unprotected private key. `provider:NAME[:PARAMS]` is an ocicrypt
    key provider that unwraps (keys/providers.py); `tpm2:FILE` and `pkcs11:URI` name keys that
    stay in a TPM or a PKCS#11 token (keys/tpm2.py, keys/pkcs11.py)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from cryptlayer.keys import providers

    if providers.is_provider(path):
        return providers.identity(path)
    if path.startswith(("tpm2:", "pkcs11:")):
        from cryptlayer.keys import heldkey

        held = heldkey.load(path)
        return Identity(_kind(held, path, "identity"), held, held.path)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        raise UsageError(
            f"identity {path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o})",
            f"chmod 600 {path}",
        )
    data = bytearray(_read(path, "identity"))
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key: object = serialization.load_ssh_private_key(bytes(data), password=None)
        else:
            key = serialization.load_pem_private_key(bytes(data), password=None)
    except TypeError:
        raise UsageError(
            f"identity {path} is protected by a password",
            "give an unencrypted private key (keep it mode 0600)",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = "that is a public key; give the private one" if b"PUBLIC" in data else None
        raise UsageError(f"identity {path} is not a PEM or OpenSSH private key", hint) from None
    finally:
        data[:] = bytes(len(data))
    return Identity(_kind(key, path, "identity"), key, path)  # type: ignore[arg-type]


def write_key_pair(path: Path, kind: KeyKind) -> str:
    """Write a new private key to PATH (0600) and its public key to PATH.pub; returns its id.

    Neither file may exist: keygen never overwrites.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa, x25519

    public_path = path.with_name(path.name + ".pub")
    for p in (path, public_path):
        if p.exists() or p.is_symlink():
            raise UsageError(f"{p} already exists", "choose another name; keygen never overwrites")
    key: x25519.X25519PrivateKey | rsa.RSAPrivateKey = (
        x25519.X25519PrivateKey.generate()
        if kind is KeyKind.X25519
        else rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    )
    private = bytearray(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    from cryptlayer.fsutil import write_new_file

    try:
        write_new_file(path, private, 0o600)
    finally:
        private[:] = bytes(len(private))
    try:
        write_new_file(public_path, public, 0o644)
    except BaseException:
        path.unlink()
        raise
    return Recipient(kind, key.public_key()).id
