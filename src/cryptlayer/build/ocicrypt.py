"""Layers that ocicrypt encrypted (`skopeo copy --encryption-key jwe:PUB.pem`), decrypted while
they stream: never written out in the clear.

ocicrypt's format, as its source has it (containers/ocicrypt: encryption.go,
blockcipher/blockcipher.go, blockcipher/blockcipher_aes_ctr.go, keywrap/jwe/keywrapper_jwe.go):
a layer whose media type ends in `+encrypted` carries two annotations,
- `org.opencontainers.image.enc.keys.jwe`: comma-separated base64 of JWE JSON serializations
  (one per `--encryption-key jwe:` run; each may have several recipients) whose payload is the
  private options, JSON `{"symkey": b64, "digest": "sha256:...", "cipheroptions": {"nonce": b64}}`
  (digest: of the blob skopeo read, which is not always the one it encrypted: skopeo 1.9
  compresses an uncompressed layer before encrypting it, and this stays the uncompressed one's;
  so it is not checked here, the diff_id is);
- `org.opencontainers.image.enc.pubopts`: base64 of JSON `{"cipher": "AES_256_CTR_HMAC_SHA256",
  "hmac": b64, "cipheroptions": {}}`.
An ocicrypt with key providers (1.1 and later) wraps the same private options through a
provider instead: `org.opencontainers.image.enc.keys.provider.NAME`, comma-separated base64 of
the provider's keywrap answers, unwrapped here by `--decryption-key provider:NAME[:PARAMS]`
through keys/providers.py (unwrap_layer_annotation, as ocicrypt's preUnwrapKey). The keys given
are tried in their order, each on the annotation of its kind, as ocicrypt tries its keywrappers.
The blob is AES-256-CTR of the plaintext blob under `symkey` and `nonce`; `hmac` is HMAC-SHA256
under `symkey` of the ciphertext, checked when the stream ends (as ocicrypt does: nothing read
from a stream counts before its end). The descriptor's digest is of the ciphertext.

Here a layer is accepted only if, at the end of its stream, the ciphertext matches the
descriptor's digest and size and the HMAC matches (and, as for any layer, the tar its diff_id);
the build that read it fails otherwise (TamperedImageError), and its cleanup removes what the
layer's volume got.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptlayer import oci
from cryptlayer.errors import TamperedImageError, UsageError, WrongKeyError, printable
from cryptlayer.keys.providers import (
    ANNOTATION,
    ProviderError,
    ProviderIdentity,
    identity,
    is_provider,
    unwrap_layer_annotation,
)

ENCRYPTED_SUFFIX = "+encrypted"
KEYS_PREFIX = "org.opencontainers.image.enc.keys."
KEYS_JWE = KEYS_PREFIX + "jwe"
PUBOPTS = "org.opencontainers.image.enc.pubopts"
CIPHER = "AES_256_CTR_HMAC_SHA256"  # the only cipher ocicrypt has
KEY_BYTES = 32
NONCE_BYTES = 16
MAX_KEY_FILE = 64 * 1024
# A JWE's payload (the private options: a key, a digest, a nonce) is some 200 bytes; one that
# says `zip: DEF` is inflated to at most this (jwcrypto's own cap is 100 MB, from 256 KB: a
# memory bomb that anyone with the public key can make).
MAX_PRIVATE_OPTIONS = 64 * 1024
# Each recipient of each JWE costs a private-key operation per --decryption-key (jwcrypto tries
# them all): a hostile manifest's 16 MB hold some 30000. One per `--encryption-key` key is
# ocicrypt's; a layer with more than this is refused before any is tried.
MAX_RECIPIENTS = 256
# What go-jose writes for ocicrypt (RSA-OAEP or ECDH-ES+A256KW, A256GCM) and its near kin;
# never RSA1_5 (padding oracles).
JWE_ALGS = ["RSA-OAEP", "RSA-OAEP-256", "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW",
            "ECDH-ES+A256KW", "A128GCM", "A192GCM", "A256GCM", "A128CBC-HS256",
            "A192CBC-HS384", "A256CBC-HS512"]  # fmt: skip


def is_encrypted(media_type: object) -> bool:
    """Whether a layer's media type says ocicrypt encrypted it."""
    return isinstance(media_type, str) and media_type.endswith(ENCRYPTED_SUFFIX)


# ---- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecryptionKey:
    """What --decryption-key gave: a private key, as a JWK for jwcrypto, for the layers'
    `jwe` annotations; or (`provider:NAME[:PARAMS]`) an ocicrypt key provider, for their
    `provider.NAME` annotations."""

    path: str
    jwk: Any = field(repr=False, default=None)  # jwcrypto.jwk.JWK: never in a repr
    provider: ProviderIdentity | None = None

    @property
    def annotation(self) -> str:
        """The layer annotation this key unwraps."""
        return KEYS_JWE if self.provider is None else ANNOTATION + self.provider.name


def _read_key_file(path: str) -> bytearray:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if ":" in path and os.path.exists(path.partition(":")[0]):
            raise UsageError(  # the password itself is not repeated
                f"--decryption-key {path.partition(':')[0]}:...: a password after ':' is not"
                " taken (the command line"
                " is visible to every user)",
                "decrypt the key into a file only you read: openssl pkey -in KEY -out PLAIN",
            ) from None
        raise UsageError(
            f"--decryption-key {path} does not exist", "give the private key (PEM) of a jwe: key"
        ) from None
    except OSError as err:
        raise UsageError(f"cannot read --decryption-key {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"--decryption-key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(
                f"--decryption-key {path} is accessible by others"
                f" (mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod 600 {path}",
            )
        data = bytearray(f.read(MAX_KEY_FILE + 1))
    if len(data) > MAX_KEY_FILE:
        raise UsageError(f"--decryption-key {path} is larger than {MAX_KEY_FILE} bytes")
    return data


def _parse_key(path: str, data: bytearray) -> Any:
    """A JWK from PEM, DER or JWK JSON, as ocicrypt's utils.ParsePrivateKey takes them."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from jwcrypto import jwk  # type: ignore[import-untyped]

    if data.lstrip().startswith(b"{"):
        try:
            key = jwk.JWK.from_json(bytes(data))
        except (ValueError, jwk.InvalidJWKValue, jwk.InvalidJWKType) as err:
            raise UsageError(f"--decryption-key {path} is not a valid JWK ({err})") from None
        if not key.has_private:
            raise UsageError(f"--decryption-key {path} is a public key", "give the private one")
        return key
    try:
        if b"-----BEGIN" in data:
            pyca: Any = serialization.load_pem_private_key(bytes(data), password=None)
        else:
            pyca = serialization.load_der_private_key(bytes(data), password=None)
    except TypeError:
        raise UsageError(
            f"--decryption-key {path} is protected by a password",
            "decrypt it into a file only you read: openssl pkey -in KEY -out PLAIN",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = "that is a public key; give the private one" if b"PUBLIC" in data else None
        raise UsageError(f"--decryption-key {path} is not a PEM or DER private key", hint) from None
    try:
        return jwk.JWK.from_pyca(pyca)
    except (ValueError, TypeError, jwk.InvalidJWKValue) as err:
        raise UsageError(
            f"--decryption-key {path} is a {type(pyca).__name__.lstrip('_')}, not an RSA or EC key",
            "ocicrypt's jwe: keys are RSA or EC",
        ) from err


def load_keys(texts: list[str]) -> tuple[DecryptionKey, ...]:
    """The keys given with --decryption-key (PEM, DER or JWK private keys, or configured
    `provider:NAME[:PARAMS]`), each checked, in the order given."""
    keys = []
    for text in texts:
        if is_provider(text):  # UsageError unless $OCICRYPT_KEYPROVIDER_CONFIG has it
            who = identity(text)
            keys.append(DecryptionKey(who.path, provider=who))
            continue
        data = _read_key_file(text)
        try:
            keys.append(DecryptionKey(text, _parse_key(text, data)))
        finally:
            data[:] = bytes(len(data))
    return tuple(keys)


# ---- a layer's options ----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCipher:
    """What decrypts and checks one layer: from its JWE (private) and pubopts (public)."""

    symkey: bytes = field(repr=False)  # the layer key: never in a repr, a log, a traceback
    nonce: bytes
    hmac: bytes


def _b64(value: object, what: str, where: str) -> bytes:
    if not isinstance(value, str):
        raise UsageError(f"{where}: {what} is not a base64 string", "the image is damaged")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{where}: {what} is not valid base64", "the image is damaged") from None


def _json_object(data: bytes, what: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: {what} is not a JSON object", "the image is damaged")
    return doc


def _options(doc: dict[str, Any], what: str, where: str) -> dict[str, Any]:
    opts = doc.get("cipheroptions") or {}
    if not isinstance(opts, dict):
        raise UsageError(f"{where}: {what} cipheroptions is not an object", "the image is damaged")
    return opts


def _unwrap_jwe(annotation: str, key: DecryptionKey, where: str) -> bytes | None:
    """The private options from the first JWE of the annotation that `key` opens (each JWE in
    turn, as ocicrypt's jwe keywrapper tries them); None if it opens none."""
    from jwcrypto import jwe
    from jwcrypto.common import JWException  # type: ignore[import-untyped]

    tokens = [_b64(part, f"annotation {KEYS_JWE}", where) for part in annotation.split(",")]
    count = sum(_recipients(token) for token in tokens)
    if count > MAX_RECIPIENTS:
        raise UsageError(
            f"{where}: annotation {KEYS_JWE} holds {count} JWE recipients, more than"
            f" {MAX_RECIPIENTS}",
            "the image is damaged or hostile",
        )
    for token in tokens:
        message = jwe.JWE(algs=JWE_ALGS)
        try:
            message.deserialize(token.decode("utf-8", "replace"))
        except (JWException, ValueError) as err:
            raise UsageError(
                f"{where}: annotation {KEYS_JWE} holds no JWE ({err})", "the image is damaged"
            ) from None
        try:
            message.decrypt(key.jwk, max_plaintext=MAX_PRIVATE_OPTIONS)
        except (JWException, ValueError, TypeError):
            if any("exceeds maximum" in line for line in message.decryptlog or ()):
                raise UsageError(
                    f"{where}: annotation {KEYS_JWE} holds a JWE larger than"
                    f" {MAX_PRIVATE_OPTIONS} bytes once decompressed",
                    "the image is damaged or hostile",
                ) from None
            continue
        payload: bytes = message.payload
        return payload
    return None


def _unwrap_provider(annotation: str, who: ProviderIdentity, where: str) -> dict[str, Any]:
    """The private options the provider unwraps from the layer's provider.NAME annotation;
    ProviderError when it fails or answers something that is not ocicrypt's options."""
    with unwrap_layer_annotation(who, annotation) as optsdata, optsdata.view() as data:
        try:
            doc = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError):
            doc = None
    if not isinstance(doc, dict):
        raise ProviderError(
            f"key provider {printable(who.name)} unwrapped the key of {where} to something that"
            " is not ocicrypt's layer options (JSON)",
            "is this the provider and PARAMS the image was encrypted with?",
        )
    return doc


def _wrapped_for(annotations: dict[Any, Any]) -> list[str]:
    """What a layer's key is wrapped for, as --decryption-key and skopeo name them."""
    found = []
    for name in sorted(str(k) for k in annotations if str(k).startswith(KEYS_PREFIX)):
        scheme = name.removeprefix(KEYS_PREFIX)
        if name.startswith(ANNOTATION):
            found.append("provider:" + printable(name.removeprefix(ANNOTATION)))
        else:
            found.append(printable(scheme))
    return found


def _recipients(token: bytes) -> int:
    """How many recipients a JWE (JSON serialization) has; 1 for anything else (jwcrypto then
    says what is wrong with it)."""
    try:
        doc = json.loads(token)
    except ValueError:
        return 1
    recipients = doc.get("recipients") if isinstance(doc, dict) else None
    return len(recipients) if isinstance(recipients, list) else 1


def layer_cipher(annotations: object, keys: tuple[DecryptionKey, ...], where: str) -> LayerCipher:
    """Unwrap an encrypted layer's key with the first of `keys`, in the order given, that
    opens it (a private key its `jwe` annotation, a provider its `provider.NAME` one, as
    ocicrypt tries its keywrappers); every field checked."""
    if not isinstance(annotations, dict):
        annotations = {}
    if not keys:
        raise UsageError(
            f"{where} is encrypted with ocicrypt",
            "give its private key with --decryption-key PRIVATE.pem (or provider:NAME)",
        )
    schemes = _wrapped_for(annotations)
    if not any(s == "jwe" or s.startswith("provider:") for s in schemes):
        raise UsageError(
            f"{where} is encrypted with ocicrypt for "
            + (", ".join(schemes) + " keys only" if schemes else "no recipient (no wrapped key)"),
            "cryptlayer unwraps jwe: keys and key providers' keys; encrypt it again with skopeo"
            " --encryption-key jwe:PUB",
        )
    priv: dict[str, Any] | None = None
    failure: ProviderError | None = None
    for key in keys:
        wrapped = annotations.get(key.annotation)
        if not isinstance(wrapped, str) or not wrapped:
            continue
        if key.provider is not None:
            try:
                priv = _unwrap_provider(wrapped, key.provider, where)
            except ProviderError as err:  # another key may yet open it, as in ocicrypt
                failure = err
                continue
            break
        private = _unwrap_jwe(wrapped, key, where)
        if private is not None:
            priv = _json_object(private, "the private layer options", where)
            break
    if priv is None:
        if failure is not None:
            raise failure
        raise WrongKeyError(
            f"{where}: no --decryption-key unwraps its layer key",
            f"tried {', '.join(printable(k.path) for k in keys)}; it is wrapped for"
            f" {', '.join(schemes)}: give the private key or provider it was encrypted for",
        )
    pub_text = annotations.get(PUBOPTS)
    if pub_text is None:
        raise UsageError(f"{where}: no {PUBOPTS} annotation", "the image is damaged")
    pub = _json_object(_b64(pub_text, f"annotation {PUBOPTS}", where), PUBOPTS, where)
    cipher = pub.get("cipher")
    if cipher != CIPHER:
        raise UsageError(
            f"{where}: unsupported ocicrypt cipher {str(cipher)!r}",
            f"cryptlayer decrypts {CIPHER}, the only cipher ocicrypt writes",
        )
    symkey = _b64(priv.get("symkey"), "symkey", where)
    priv_opts, pub_opts = _options(priv, "private", where), _options(pub, "public", where)
    nonce = _b64(priv_opts.get("nonce", pub_opts.get("nonce")), "nonce", where)
    mac = _b64(pub.get("hmac"), "hmac", where)
    if len(symkey) != KEY_BYTES or len(nonce) != NONCE_BYTES or len(mac) != 32:
        raise UsageError(
            f"{where}: ocicrypt options of the wrong size (key {len(symkey)}, nonce {len(nonce)},"
            f" hmac {len(mac)} bytes)",
            "the image is damaged",
        )
    return LayerCipher(symkey, nonce, mac)


# ---- the stream -----------------------------------------------------------------------------


class DecryptingReader(io.RawIOBase):
    """The plaintext of an encrypted blob, decrypted as it is read. When the ciphertext ends it
    checks the blob's digest and size and the HMAC; if any differs, the stream ends there and
    `finish` raises TamperedImageError. Reads never raise it: a reader may be a thread feeding
    `zstd -dc` (tools.runner.filtered), where an exception would leave zstd waiting for ever;
    whoever opened the stream calls `finish` (`decrypting` does). seek(0) starts over
    (compression sniffing rewinds)."""

    def __init__(
        self, raw: IO[bytes], cipher: LayerCipher, digest: str, size: int | None, where: str
    ) -> None:
        self.raw = raw
        self.cipher = cipher
        self.digest = digest
        self.size = size
        self.where = where
        self.failure: TamperedImageError | None = None
        self._start()

    def _start(self) -> None:
        ctr = Cipher(algorithms.AES(self.cipher.symkey), modes.CTR(self.cipher.nonce))
        self._decryptor = ctr.decryptor()
        self._mac = crypto_hmac.HMAC(self.cipher.symkey, hashes.SHA256())
        self._blob = oci.hasher()
        self._count = 0
        self.verified = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._count

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if (offset, whence) == (self._count, os.SEEK_SET) or (offset, whence) == (0, os.SEEK_CUR):
            return self._count
        if (offset, whence) != (0, os.SEEK_SET):
            raise io.UnsupportedOperation("a decrypting stream only rewinds to its start")
        self.raw.seek(0)
        self._start()
        return 0

    def readinto(self, buffer: Any) -> int:
        if self.failure is not None or self.verified:
            return 0
        data = self.raw.read(len(buffer))
        if not data:
            self._finish()
            return 0
        self._count += len(data)
        self._blob.update(data)
        self._mac.update(data)
        plain = self._decryptor.update(data)
        n = len(plain)
        buffer[:n] = plain
        return n

    def _finish(self) -> None:
        problem = None
        actual = oci.digest_of(self._blob)
        if self._decryptor.finalize():  # CTR: nothing held back
            problem = "the cipher returned data after the end"
        elif actual != self.digest:
            problem = f"does not match its digest {self.digest} (it is {actual})"
        elif self.size is not None and self._count != self.size:
            problem = f"has {self._count} bytes, its descriptor says {self.size}"
        elif not hmac.compare_digest(self._mac.finalize(), self.cipher.hmac):
            problem = "its HMAC does not match: the ciphertext was changed"
        if problem is None:
            self.verified = True
        else:
            self.failure = TamperedImageError(
                f"{self.where}: {problem}", "the image was changed after ocicrypt encrypted it"
            )

    def finish(self) -> None:
        """Read what is left of the ciphertext (unused) and check it all: TamperedImageError
        if it is not what ocicrypt wrote."""
        while self.read(1 << 20):
            pass
        if self.failure is not None:
            raise self.failure


@contextmanager
def decrypting(
    raw: IO[bytes], cipher: LayerCipher, digest: str, size: int | None, where: str
) -> Iterator[DecryptingReader]:
    """A DecryptingReader over `raw`, read to its end on leaving so that every use of a layer
    checks all of it. What failed on the way (a gzip stream that does not decompress, a tar
    that does not parse) is reported as the tampering it is when the HMAC says so."""
    reader = DecryptingReader(raw, cipher, digest, size, where)
    try:
        yield reader
    except TamperedImageError:
        raise
    except Exception as err:
        try:
            reader.finish()
        except TamperedImageError as tampered:
            raise tampered from err
        if isinstance(err, zlib.error):  # authentic, yet not gzip: encrypted so by its maker
            raise UsageError(
                f"{where} does not decompress ({err})", "the image is damaged"
            ) from err
        raise
    reader.finish()


def verify(raw: IO[bytes], cipher: LayerCipher, digest: str, size: int | None, where: str) -> None:
    """Check a blob's digest, size and HMAC without decrypting it to anyone."""
    with decrypting(raw, cipher, digest, size, where):
        pass
