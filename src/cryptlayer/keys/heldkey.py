"""RSA private keys held in hardware (a TPM, a PKCS#11 token): only the RSA operation happens there.

An image's `rsa` entry is RSA-OAEP with SHA-256 and the label `cryptlayer.keys.v1`
(image/envelope.py). Hardware rarely does that exact OAEP: a TPM accepts only a NUL-terminated
label, SoftHSM and many tokens only SHA-1 without a label. All of them do raw RSA (the TPM's
`null` scheme, PKCS#11's CKM_RSA_X_509), so the key decrypts there and the OAEP padding is removed
here (RFC 8017, 7.1.2), as OpenSC does on top of a card's raw RSA. Every failure is the same
None, so a hostile keys.json learns nothing from which check failed.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from cryptlayer.secret import Secret

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

HASH_LEN = 32  # SHA-256


def _mgf1(seed: bytes | bytearray, length: int) -> bytearray:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(bytes(seed) + counter.to_bytes(4, "big")).digest()
        counter += 1
    del out[length:]
    return out


def _xor_into(target: bytearray, mask: bytearray) -> None:
    for i, m in enumerate(mask):
        target[i] ^= m


def oaep_decode(block: bytearray, label: bytes, modulus_bytes: int) -> Secret | None:
    """The message in an OAEP-encoded block (EME-OAEP, SHA-256, MGF1-SHA-256), or None.

    `block` is the raw RSA output (modulus_bytes long; a leading zero may have been dropped); it
    is wiped here either way."""
    try:
        if len(block) < modulus_bytes:
            block[0:0] = bytes(modulus_bytes - len(block))
        if len(block) != modulus_bytes or modulus_bytes < 2 * HASH_LEN + 2:
            return None
        seed = bytearray(block[1 : 1 + HASH_LEN])
        db = bytearray(block[1 + HASH_LEN :])
        try:
            _xor_into(seed, _mgf1(db, HASH_LEN))
            _xor_into(db, _mgf1(seed, len(db)))
            # one verdict for all checks, in the same order whatever fails (no padding oracle)
            good = hmac.compare_digest(bytes(db[:HASH_LEN]), hashlib.sha256(label).digest())
            good &= block[0] == 0
            rest = db[HASH_LEN:]
            one = next((i for i, b in enumerate(rest) if b != 0), -1)
            good &= one >= 0 and rest[one] == 1
            if not good:
                return None
            message = bytearray(rest[one + 1 :])
            rest[:] = bytes(len(rest))
            return Secret(message)
        finally:
            seed[:] = bytes(len(seed))
            db[:] = bytes(len(db))
    finally:
        block[:] = bytes(len(block))


class HeldKey(ABC):
    """An RSA private key that never leaves its hardware."""

    path: str  # how the user named it (tpm2:FILE, a pkcs11: URI), for messages

    @abstractmethod
    def public_key(self) -> RSAPublicKey:
        """Its public key (what `build --recipient` is given)."""

    @abstractmethod
    def raw_decrypt(self, ciphertext: bytes) -> bytearray:
        """ciphertext^d mod n, computed in the hardware, in a fresh bytearray."""

    @property
    def key_size(self) -> int:
        return self.public_key().key_size

    def decrypt_oaep(self, ciphertext: bytes, label: bytes) -> Secret | None:
        """The message RSA-OAEP (SHA-256) wrapped under `label`, or None if it does not unwrap."""
        public = self.public_key().public_numbers()
        size = (public.n.bit_length() + 7) // 8
        if len(ciphertext) != size or int.from_bytes(ciphertext, "big") >= public.n:
            return None  # not an RSA ciphertext for this key: the hardware would refuse it
        return oaep_decode(self.raw_decrypt(ciphertext), label, size)


def load(spec: str) -> HeldKey:
    """The key `tpm2:FILE` or `pkcs11:URI` names."""
    if spec.startswith("tpm2:"):
        from cryptlayer.keys import tpm2

        return tpm2.load_key(spec)
    from cryptlayer.keys import pkcs11

    return pkcs11.load_key(spec)
