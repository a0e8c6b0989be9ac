"""Publisher signatures over the image statement (manifest.json's exact bytes), as OpenSSH makes
them: `ssh-keygen -Y sign -n cryptlayer-image` and `cryptlayer sign` write the same thing.

One armored SSHSIG file per signer under IMAGE/signatures/ (NAME.sig), outside the statement,
so signing never changes the image digest. Format: OpenSSH's PROTOCOL.sshsig. Trust: OpenSSH's
allowed_signers format (ssh-keygen(1), ALLOWED SIGNERS): `PRINCIPALS [OPTIONS] KEYTYPE BASE64`,
read as OpenSSH's sshsig.c reads it (fields apart by spaces or tabs; `namespaces="..."` a
pattern list; `valid-after`/`valid-before` held against the current time), so that a line means
to cryptlayer what it means to `ssh-keygen -Y verify`; a line it cannot read so (an unknown
option, `cert-authority`, a bad time) refuses the whole file. Keys: Ed25519, and RSA (signed
with rsa-sha2-512).
Checking needs no image key and no device-mapper, so a mirror or a CI job can do it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptlayer.errors import TamperedImageError, UsageError, printable
from cryptlayer.fsutil import (
    DIR_FLAGS,
    UntrustedFileError,
    open_dir,
    read_untrusted,
    write_atomic_at,
)

NAMESPACE = "cryptlayer-image"
DIR = "signatures"
SUFFIX = ".sig"
MAGIC = b"SSHSIG"
ARMOR = ("-----BEGIN SSH SIGNATURE-----", "-----END SSH SIGNATURE-----")
MAX_SIGNATURES = 64
MAX_SIGNATURE_BYTES = 16384
MAX_TRUST_BYTES = 1 << 20
HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
KEY_TYPES = ("ssh-ed25519", "ssh-rsa")


# ---- the SSH wire format (RFC 4251) --------------------------------------------------------------


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def raw(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("it is cut short")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.raw(4))[0]
        return value

    def string(self) -> bytes:
        return self.raw(self.uint32())

    def end(self) -> None:
        if self.at != len(self.data):
            raise ValueError("it has trailing bytes")


def _mpint(value: int) -> bytes:
    data = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return _string(data)


@dataclass(frozen=True)
class PublicKey:
    """An SSH public key: its wire blob (what fingerprints and allowed_signers compare)."""

    blob: bytes

    @property
    def kind(self) -> str:
        return _Reader(self.blob).string().decode("ascii", "replace")

    @property
    def fingerprint(self) -> str:
        """As `ssh-keygen -l` prints it: SHA256:base64 without padding."""
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")
        return f"SHA256:{digest}"

    def verifier(self) -> Any:
        """The `cryptography` public key."""
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        reader = _Reader(self.blob)
        kind = reader.string()
        if kind == b"ssh-ed25519":
            raw = reader.string()
            reader.end()
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
        if kind == b"ssh-rsa":
            e = int.from_bytes(reader.string(), "big")
            n = int.from_bytes(reader.string(), "big")
            reader.end()
            if n.bit_length() < 2048:
                raise ValueError(f"an RSA key of {n.bit_length()} bits is too weak")
            return rsa.RSAPublicNumbers(e, n).public_key()
        raise ValueError(f"key type {kind.decode('ascii', 'replace')!r} is not supported")


def public_key_of(private: Any) -> PublicKey:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return PublicKey(_string(b"ssh-ed25519") + _string(raw))
    if isinstance(private, rsa.RSAPrivateKey):
        numbers = private.public_key().public_numbers()
        return PublicKey(_string(b"ssh-rsa") + _mpint(numbers.e) + _mpint(numbers.n))
    raise UsageError("only Ed25519 and RSA keys can sign images", "use ssh-keygen -t ed25519")


# ---- signatures --------------------------------------------------------------------------------


def _signed_data(namespace: bytes, hash_name: bytes, message: bytes) -> bytes:
    digest = HASHES[hash_name.decode()](message).digest()
    return MAGIC + _string(namespace) + _string(b"") + _string(hash_name) + _string(digest)


def sign(private: Any, message: bytes) -> str:
    """An armored SSHSIG signature of `message` in our namespace, as ssh-keygen -Y sign makes."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding

    public = public_key_of(private)
    data = _signed_data(NAMESPACE.encode(), b"sha512", message)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        inner = _string(b"ssh-ed25519") + _string(private.sign(data))
    else:
        raw = private.sign(data, padding.PKCS1v15(), hashes.SHA512())
        inner = _string(b"rsa-sha2-512") + _string(raw)
    blob = (
        MAGIC + struct.pack(">I", 1) + _string(public.blob) + _string(NAMESPACE.encode())
        + _string(b"") + _string(b"sha512") + _string(inner)
    )  # fmt: skip
    text = base64.b64encode(blob).decode()
    lines = [text[i : i + 70] for i in range(0, len(text), 70)]
    return "\n".join([ARMOR[0], *lines, ARMOR[1]]) + "\n"


@dataclass(frozen=True)
class Signature:
    """A signature file that verifies over the statement, and the key that made it."""

    file: str
    key: PublicKey


def verify(armored: bytes, message: bytes) -> PublicKey:
    """The key that signed `message` with `armored` in our namespace; ValueError saying why not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    text = armored.decode("ascii", "replace").strip().splitlines()
    if len(text) < 3 or text[0].strip() != ARMOR[0] or text[-1].strip() != ARMOR[1]:
        raise ValueError("it is not an armored SSH signature")
    try:
        blob = base64.b64decode("".join(line.strip() for line in text[1:-1]), validate=True)
    except binascii.Error:
        raise ValueError("its armor is not base64") from None
    reader = _Reader(blob)
    if reader.raw(6) != MAGIC or reader.uint32() != 1:
        raise ValueError("it is not an SSHSIG version 1 signature")
    public = PublicKey(reader.string())
    namespace, _reserved, hash_name, inner = (reader.string() for _ in range(4))
    reader.end()
    if namespace != NAMESPACE.encode():
        raise ValueError(f"it was made for namespace {namespace.decode('ascii', 'replace')!r}")
    if hash_name.decode("ascii", "replace") not in HASHES:
        raise ValueError(f"its hash {hash_name.decode('ascii', 'replace')!r} is not supported")
    sig = _Reader(inner)
    algorithm, raw = sig.string(), sig.string()
    sig.end()
    key = public.verifier()
    data = _signed_data(namespace, hash_name, message)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            chosen = {b"rsa-sha2-512": hashes.SHA512(), b"rsa-sha2-256": hashes.SHA256()}
            if algorithm not in chosen:
                name = printable(algorithm.decode("ascii", "replace"))
                raise ValueError(f"RSA signature algorithm {name} is not accepted")
            key.verify(raw, data, padding.PKCS1v15(), chosen[algorithm])
        else:
            if algorithm != b"ssh-ed25519":
                raise ValueError("its algorithm does not match its key")
            key.verify(raw, data)
    except InvalidSignature:
        raise ValueError("it does not match the statement (changed since it was signed)") from None
    return public


@dataclass(frozen=True)
class Rejected:
    """A signature file that does not verify, and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{DIR}/{self.file}: {self.reason}"


def read_all(
    image: Path, message: bytes, *, dir_fd: int | None = None
) -> tuple[list[Signature], list[Rejected]]:
    """The signatures under IMAGE/signatures/ that verify over `message`, and why the others do
    not (each file an attacker's: regular, small, not followed through a symlink). With
    `dir_fd` (IMAGE, open), signatures/ is the one in that directory."""
    folder = image / DIR if dir_fd is None else DIR
    try:
        fd = os.open(folder, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return [], []
    except OSError as err:
        return [], [Rejected("", f"cannot be read ({err.strerror}; a symlink is not followed)")]
    try:
        names = sorted(n for n in os.listdir(fd) if n.endswith(SUFFIX))
        if len(names) > MAX_SIGNATURES:
            return [], [Rejected("", f"holds {len(names)} signatures, more than {MAX_SIGNATURES}")]
        good: list[Signature] = []
        bad: list[Rejected] = []
        for name in names:
            try:
                data = read_untrusted(name, MAX_SIGNATURE_BYTES, dir_fd=fd)
                good.append(Signature(name, verify(bytes(data), message)))
            except (UntrustedFileError, OSError, ValueError) as err:
                bad.append(Rejected(name, str(err)))
        return good, bad
    finally:
        os.close(fd)


# ---- trust: allowed_signers, read as OpenSSH's sshsig.c reads it --------------------------------

WHITESPACE = " \t\r\n"  # what separates the principals from the rest (OpenSSH's strdelimw)
BLANKS = " \t"  # what ends the options and separates the key's fields (sshkey_read)
MAX_PATTERN = 1023  # OpenSSH's match_pattern_list gives up on a longer pattern
MAX_PRINCIPALS = 4096  # characters of a line's principals: a few names in practice


def match_pattern(string: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: `*` any run of characters, `?` any one, all else literal.

    Matched greedily, going back only to the last `*` (time linear in both lengths: a
    backtracking matcher takes hours on `*a*a*a*a*a*a*c` against `*a*a*...*b`)."""
    at, p, star, mark = 0, 0, -1, 0
    while at < len(string):
        if p < len(pattern) and pattern[p] == "*":
            star, mark, p = p, at, p + 1
        elif p < len(pattern) and pattern[p] in ("?", string[at]):
            at, p = at + 1, p + 1
        elif star >= 0:
            mark += 1
            at, p = mark, star + 1
        else:
            return False
    return pattern[p:].strip("*") == ""


def match_pattern_list(string: str, patterns: str) -> int:
    """OpenSSH's match_pattern_list: 1 if a pattern of the comma-separated list matches, -1 if
    a negated one (`!pattern`) does (whatever else matches), 0 if none does."""
    positive = 0
    for pattern in patterns.split(",") if patterns else []:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if len(pattern) >= MAX_PATTERN:
            return 0
        if match_pattern(string, pattern):
            if negated:
                return -1
            positive = 1
    return positive


# Key types OpenSSH knows: a line's field after the principals is its key when it is one of
# these (sshkey_read succeeds), and otherwise its options.
OPENSSH_KEY_TYPE = re.compile(
    r"(ssh-(ed25519|rsa|dss|xmss@openssh\.com)|ecdsa-sha2-nistp(256|384|521)"
    r"|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)(-cert-v01@openssh\.com)?",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Signer:
    """One line of an allowed_signers file: principals (patterns), key and options."""

    principals: tuple[str, ...]
    key: PublicKey
    namespaces: str | None = None  # a pattern list; None: any
    valid_after: int | None = None  # seconds since the epoch
    valid_before: int | None = None
    line: int = 0

    def names_someone(self) -> bool:
        """Whether some `ssh-keygen -Y verify -I PRINCIPAL` can match the line: one of its
        patterns, read as a principal, is matched by the list (`""`, `!alice` or `!*,*` match
        no one, and OpenSSH then never trusts the line's key)."""
        patterns = ",".join(self.principals)
        return any(
            not p.startswith("!") and match_pattern_list(p, patterns) == 1 for p in self.principals
        )

    def refusal(self, namespace: str, now: int) -> str | None:
        """Why this line does not trust its key for `namespace` at `now`; None if it does."""
        if not self.names_someone():
            return "names no principal (ssh-keygen -Y verify -I matches none of its patterns)"
        if self.namespaces is not None and match_pattern_list(namespace, self.namespaces) != 1:
            return f"is not permitted for namespace {namespace} (namespaces={self.namespaces})"
        if self.valid_after is not None and now < self.valid_after:
            return f"is not valid before {_utc(self.valid_after)}"
        if self.valid_before is not None and now > self.valid_before:
            return f"expired at {_utc(self.valid_before)}"
        return None


def _utc(when: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_trust(path: Path) -> list[Signer]:
    """The signers of an allowed_signers file; UsageError naming the bad line (any line
    cryptlayer cannot read as OpenSSH would is refused, never half-read)."""
    try:
        text = read_untrusted(str(path), MAX_TRUST_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"trust file {path} does not exist", "give an allowed_signers file"
        ) from None
    except (OSError, UntrustedFileError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read trust file {path}: {err}") from None
    signers = []
    if "\0" in text:  # OpenSSH reads each line only up to its first NUL
        number = text.count("\n", 0, text.index("\0")) + 1
        raise UsageError(f"{path}, line {number} holds a NUL byte",
                         "write it as a text file (ssh-keygen(1), ALLOWED SIGNERS)")  # fmt: skip
    for number, line in enumerate(text.split("\n"), 1):  # getline(3): lines end at \n only
        try:
            signer = _signer(line, number)
        except (ValueError, binascii.Error) as err:
            raise UsageError(
                f"{path}, line {number}: {printable(str(err))}",
                'write PRINCIPALS [namespaces="cryptlayer-image"] ssh-ed25519 KEY (ssh-keygen(1))',
            ) from None
        if signer is not None:
            signers.append(signer)
    if not signers:
        raise UsageError(f"trust file {path} names no signer", "add a line per trusted key")
    return signers


def _delimited(text: str) -> tuple[str, str] | None:
    """(first field, the rest after its whitespace) as OpenSSH's strdelimw splits them: a
    field ends at whitespace or a double quote, a quoted part may hold spaces; None when the
    line is one field or its quote is not closed."""
    at = next((i for i, c in enumerate(text) if c in WHITESPACE + '"'), None)
    if at is None:
        return None
    if text[at] == '"':
        text = text[:at] + text[at + 1 :]
        end = text.find('"', at)
        if end < 0:
            return None
        return text[:end], text[end + 1 :].lstrip(WHITESPACE)
    return text[:at], text[at + 1 :].lstrip(WHITESPACE)


def _past_options(text: str) -> int:
    """Where the options end (the first blank outside double quotes; `\\"` does not count)."""
    quoted, i = False, 0
    while i < len(text) and (quoted or text[i] not in BLANKS):
        if text[i] == "\\" and text[i + 1 : i + 2] == '"':
            i += 1
        elif text[i] == '"':
            quoted = not quoted
        i += 1
    if quoted:
        raise ValueError("its options have an unterminated quote")
    return i


def _dequote(text: str, at: int, name: str) -> tuple[str, int]:
    """The double-quoted value starting at `at` (OpenSSH's opt_dequote), and where it ends."""
    if text[at : at + 1] != '"':
        raise ValueError(f'the value of {name} is not in double quotes ({name}="...")')
    value, i = "", at + 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\" and text[i + 1 : i + 2] == '"':
            i += 1
        value += text[i]
        i += 1
    if i == len(text):
        raise ValueError(f"the value of {name} has no closing quote")
    return value, i + 1


def parse_time(value: str) -> int:
    """OpenSSH's parse_absolute_time: YYYYMMDD[HHMM[SS]], local time, or UTC with a `Z` or
    `UTC` suffix; seconds since the epoch."""
    import calendar
    import datetime

    utc = False
    if len(value) > 1 and value[-1:].upper() == "Z":
        utc, value = True, value[:-1]
    elif len(value) > 3 and value[-3:].upper() == "UTC":
        utc, value = True, value[:-3]
    if len(value) not in (8, 12, 14) or not (value.isascii() and value.isdigit()):
        raise ValueError("a time is not YYYYMMDD[HHMM[SS]][Z]")
    digits = value.ljust(14, "0")
    year, month, day, hour, minute, second = (int(digits[i : i + 2]) for i in range(2, 14, 2))
    year += int(digits[:2]) * 100
    try:
        when = datetime.datetime(year, month, day, hour, minute, second)  # a real date?
        fields = (*when.timetuple()[:8], 0)  # tm_isdst 0, as OpenSSH's zeroed struct tm has
        seconds = calendar.timegm(fields) if utc else int(time.mktime(fields))
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"{value} is not a valid time") from None
    if seconds <= 0:
        raise ValueError(f"{value} is not after 1970")
    return seconds


def _options(text: str) -> dict[str, Any]:
    """The options of a line as OpenSSH's sshsigopt_parse reads them (names without regard to
    case; a value in double quotes; commas between; anything else refused)."""
    found: dict[str, Any] = {}
    i = 0
    while i < len(text) and text[i] not in BLANKS:
        rest = text[i:].lower()
        if rest.startswith("cert-authority"):
            found["cert-authority"] = True
            i += len("cert-authority")
        else:
            name = next((n for n in ("namespaces", "valid-after", "valid-before")
                         if rest.startswith(f"{n}=")), None)  # fmt: skip
            if name is None:
                unknown = re.split(r"[=,]", text[i:], maxsplit=1)[0]
                raise ValueError(f"unknown option {unknown}")
            if name in found:
                raise ValueError(f"it has more than one {name} option")
            value, i = _dequote(text, i + len(name) + 1, name)
            found[name] = value if name == "namespaces" else parse_time(value)
        if i == len(text) or text[i] in BLANKS:
            break
        if text[i] != ",":
            raise ValueError(f"unknown option {re.split(r'[=,]', text[i:], maxsplit=1)[0]}")
        i += 1
        if i == len(text):
            raise ValueError("its options end with a comma")
    after, before = found.get("valid-after"), found.get("valid-before")
    if after is not None and before is not None and before <= after:
        raise ValueError("its valid-before time is not after its valid-after time")
    return found


def _signer(line: str, number: int = 0) -> Signer | None:
    """One line: `PRINCIPALS [OPTIONS] KEYTYPE BASE64 [COMMENT]`; None for a blank line or a
    comment; ValueError saying what is wrong."""
    line = line.lstrip(BLANKS)
    if not line or line.startswith("#") or not line.strip(WHITESPACE):
        return None
    split = _delimited(line)
    if split is None:
        raise ValueError("it has principals but no key (or an unclosed quote)")
    principals, rest = split
    if len(principals) > MAX_PRINCIPALS:  # (they are matched against each other: names_someone)
        raise ValueError(f"its principals are longer than {MAX_PRINCIPALS} characters")
    options: dict[str, Any] = {}
    if not OPENSSH_KEY_TYPE.fullmatch(re.split(f"[{BLANKS}]", rest, maxsplit=1)[0]):
        end = _past_options(rest)
        options = _options(rest[:end])
        rest = rest[end:].lstrip(BLANKS)
        if not rest:
            raise ValueError("it has no key after its options")
    if options.get("cert-authority"):
        raise ValueError("cert-authority lines are not supported (cryptlayer checks plain keys)")
    fields = re.split(f"[{BLANKS}]+", rest.rstrip(WHITESPACE))  # (a CR before it: no type)
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        raise ValueError(f"no key of a supported type ({', '.join(KEY_TYPES)})")
    key = PublicKey(base64.b64decode(fields[1], validate=True))
    if key.kind != fields[0]:
        raise ValueError(f"the key is {key.kind}, the line says {fields[0]}")
    key.verifier()  # a key that cannot verify anything is an error here, not at run time
    return Signer(
        tuple(principals.split(",")),
        key,
        options.get("namespaces"),
        options.get("valid-after"),
        options.get("valid-before"),
        number,
    )


def trusted(signers: list[Signer], key: PublicKey, now: int | None = None) -> list[str]:
    """The principals `signers` trust `key` as, for our namespace, at `now` (default: now)."""
    when = int(time.time()) if now is None else now
    return [
        ",".join(s.principals)
        for s in signers
        if s.key.blob == key.blob and s.refusal(NAMESPACE, when) is None
    ]


EMPTY = '""'  # principals shown as written when there are none


def _untrusted(signers: list[Signer], sig: Signature, trust: Path, now: int) -> str:
    """Why the trust file does not trust a signature that verifies."""
    lines = [s for s in signers if s.key.blob == sig.key.blob]
    if not lines:
        return f"{DIR}/{sig.file}: {sig.key.fingerprint} is not in {trust}"
    why = [
        f"its key ({printable(','.join(s.principals)) or EMPTY}, {trust} line {s.line})"
        f" {s.refusal(NAMESPACE, now)}"
        for s in lines
    ]
    return f"{DIR}/{sig.file}: " + "; ".join(why)


def require_trusted(
    image: Path, message: bytes, trust: Path, *, dir_fd: int | None = None
) -> list[str]:
    """The principals of the trusted signers whose signatures verify; TamperedImageError when
    there are none (the reasons of the others in the message). `dir_fd`: as read_all's."""
    signers = load_trust(trust)
    good, bad = read_all(image, message, dir_fd=dir_fd)
    now = int(time.time())
    names = [p for sig in good for p in trusted(signers, sig.key, now)]
    if names:
        return names
    untrusted = [_untrusted(signers, s, trust, now) for s in good]
    reasons = "; ".join(untrusted + [str(b) for b in bad]) or f"it has no {DIR}/*{SUFFIX}"
    raise TamperedImageError(
        f"no key of {trust} signed {image} ({reasons})",
        "run only images your publishers signed; check with `cryptlayer verify`",
    )


# ---- signing -----------------------------------------------------------------------------------


MAX_PRIVATE_KEY_BYTES = 64 * 1024  # an 8192-bit RSA key in OpenSSH's format is under 7 KiB


def _read_private_key(path: Path) -> bytes:
    """The bytes of a private key file: a regular file, small, that only its owner can read
    (as ssh-keygen refuses an unprotected one); a public key is named as one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot read signing key {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"signing key {path} is not a regular file", "give a private key")
        if st.st_size > MAX_PRIVATE_KEY_BYTES:
            raise UsageError(f"{path} is not a private key: it is {st.st_size} bytes")
        data = os.read(fd, MAX_PRIVATE_KEY_BYTES + 1)
    finally:
        os.close(fd)
    first = data.split(None, 1)[0] if data.strip() else b""
    if OPENSSH_KEY_TYPE.fullmatch(first.decode("ascii", "replace")):
        private = path.with_suffix("") if path.suffix == ".pub" else None
        raise UsageError(
            f"{path} is a public key: give the private key (without .pub)",
            f"--sign-key {private}" if private else None,
        )
    if st.st_mode & 0o077:
        raise UsageError(
            f"permissions {stat.S_IMODE(st.st_mode):04o} for {path} are too open"
            " (a private key must not be accessible by others)",
            f"chmod 600 {path}",
        )
    return data


def _no_terminal(path: Path) -> UsageError:
    return UsageError(
        f"the signing key {path} is passphrase-protected and there is no terminal to ask for"
        " its passphrase (standard input is not one, and gave none)",
        "run it on a terminal, pipe the passphrase on standard input, or sign with ssh-keygen"
        f" (which can use ssh-agent): ssh-keygen -Y sign -n {NAMESPACE} -f {path}"
        " IMAGE/manifest.json, then move manifest.json.sig to IMAGE/signatures/NAME.sig",
    )


def load_signing_key(path: Path) -> Any:
    """An OpenSSH (or PEM) private key; asks for its passphrase when it has one."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from cryptlayer.keys.sources import NoPassphraseError, read_passphrase, stdin_is_terminal

    data = _read_private_key(path)
    if b"PRIVATE KEY-----" not in data:
        raise UsageError(
            f"{path} is not a private key",
            "give an OpenSSH or PEM private key (Ed25519 or RSA), e.g. ~/.ssh/id_ed25519",
        )
    load = (
        serialization.load_ssh_private_key
        if b"OPENSSH PRIVATE KEY" in data
        else serialization.load_pem_private_key
    )
    try:
        return load(data, None)
    except TypeError:  # encrypted
        try:
            phrase = read_passphrase(f"Passphrase for {path}: ", confirm=False)
        except NoPassphraseError:
            if stdin_is_terminal():
                raise
            raise _no_terminal(path) from None
        with phrase, phrase.view() as p:
            try:
                return load(data, bytes(p))
            except ValueError:
                raise UsageError(f"wrong passphrase for {path}") from None
            except UnsupportedAlgorithm as err:  # bcrypt missing
                raise UsageError(
                    f"cannot open {path}: {_library(err)}", "pip install bcrypt"
                ) from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise UsageError(
            f"{path} is not a private key cryptlayer can sign with ({_library(err)})",
            "give an OpenSSH or PEM private key (Ed25519 or RSA)",
        ) from None


def _library(err: Exception) -> str:
    """A library's message without its pointers to web pages (the first sentence)."""
    text = str(err).split(" See https://", 1)[0].strip()
    return printable(text.split(". ", 1)[0].rstrip(".")) or type(err).__name__


def signature_name(public: PublicKey) -> str:
    kind = public.kind.removeprefix("ssh-")
    return f"{kind}-{hashlib.sha256(public.blob).hexdigest()[:16]}"


def add(image: Path, message: bytes, private: Any, name: str | None = None, *,
        allow_shared: bool = False) -> Path:  # fmt: skip
    """Write IMAGE/signatures/NAME.sig (atomically; replaces that signer's earlier one).

    By descriptor, as opener.py opens an image: the path given resolved, the image directory
    opened once (nothing below it followed) and, unless `allow_shared`, refused if others may
    write it; its manifest.json must still be `message`; signatures/ made and opened below it
    (no symlink); the file written there by descriptor."""
    from cryptlayer.image.files import check_private
    from cryptlayer.image.manifest import MANIFEST

    public = public_key_of(private)
    name = name or signature_name(public)
    if not name or "/" in name or name.startswith(".") or not name.isprintable():
        raise UsageError(f"signature name {name!r} is not a plain name", "e.g. --name release")
    try:
        image_fd = os.open(image.resolve(), DIR_FLAGS)  # (the user's path; nothing below it)
    except OSError as err:
        raise UsageError(f"{image} is not an image directory ({err.strerror})",
                         "give the --output of `cryptlayer build`") from None  # fmt: skip
    folder = image / DIR
    try:
        if not allow_shared:
            check_private(image, os.fstat(image_fd))
        try:
            held = read_untrusted(MANIFEST, len(message) + 1, dir_fd=image_fd)
        except (OSError, UntrustedFileError):
            held = b""
        if held != message:
            raise UsageError(f"{image / MANIFEST} changed while signing", "sign again")
        try:
            dir_fd = open_dir(DIR, dir_fd=image_fd, mode=0o755, shown=folder)
        except OSError:  # ELOOP (a symlink), ENOTDIR
            raise UsageError(f"{folder} is not a directory", "remove it, then sign again") from None
        try:
            write_atomic_at(dir_fd, f"{name}{SUFFIX}", sign(private, message).encode(), 0o644)
        except OSError as err:
            raise UsageError(f"cannot write {folder / (name + SUFFIX)}: {err.strerror}") from None
        finally:
            os.close(dir_fd)
    finally:
        os.close(image_fd)
    return folder / f"{name}{SUFFIX}"
