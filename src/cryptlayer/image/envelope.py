"""keys.json: the image key, wrapped once for each key, passphrase and recipient that may open it.

Every layer's LUKS2 header has one keyslot, for the image key: 32 random bytes that are never
stored in the clear. Because it is random, its keyslots use the cheapest PBKDF2, and a 10-layer
image unlocks with one expensive step (a passphrase's Argon2id), not ten. Each entry of keys.json
holds the image key wrapped with a standard construction from the `cryptography` package:

- key:        HKDF-SHA256 of the key -> AES-256 key wrap (RFC 3394)
- passphrase: Argon2id (RFC 9106), cost calibrated as cryptsetup does -> AES-256 key wrap
- x25519:     HPKE base mode (RFC 9180): DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM
- rsa:        RSA-OAEP with SHA-256
- provider:   an ocicrypt key provider's own wrapping (keys/providers.py): its opaque answer,
              and a 64-bit HKDF check of the image key, so that a provider answering a wrong key
              is told apart from a damaged image

Changing who may open an image (`rekey`) rewrites this one file, atomically; layer data and the
LUKS headers do not change.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlayer.errors import UsageError, WrongKeyError, printable
from cryptlayer.fsutil import json_bytes, read_image_json, write_atomic_at, write_json_atomic
from cryptlayer.image import DEFAULT_ITER_TIME_MS
from cryptlayer.image.manifest import number, text
from cryptlayer.keys.sources import KEY_SOURCES, Credential, KeySource
from cryptlayer.secret import KEY_BYTES, Secret

if TYPE_CHECKING:
    from cryptlayer.keys.providers import ProviderIdentity, ProviderRecipient
    from cryptlayer.keys.recipients import Recipient

FILE = "keys.json"
FORMAT = "cryptlayer.keys.v1"
IMAGE_KEY_BYTES = KEY_BYTES
INFO = b"cryptlayer.keys.v1"
# Argon2id: cryptsetup's defaults (4 lanes, at least 4 iterations, at most 1 GiB), calibrated to
# take --iter-time on this machine; a floor of 8 MiB keeps slow machines usable.
LANES = 4
MIN_ITERATIONS = 4
MIN_MEMORY_KIB = 8 * 1024
MAX_MEMORY_KIB = 1024 * 1024
MAX_ITERATIONS = 1000  # a damaged or hostile keys.json must not make us compute for hours
# ...nor memory times passes: 64 passes over 1 GiB (about a minute on a fast CPU), at most, for
# trying a passphrase: the sum over all the passphrase entries tried, not each
MAX_WORK_KIB = 64 * MAX_MEMORY_KIB
GIB_KIB = 1024 * 1024
MAX_PASSPHRASE_ENTRIES = 8  # each costs one Argon2id run when a passphrase is tried
MAX_ENTRIES = 256


class EntryKind(StrEnum):
    """What an entry of keys.json wraps the image key for."""

    KEY = "key"
    PASSPHRASE = "passphrase"
    X25519 = "x25519"
    RSA = "rsa"
    PROVIDER = "provider"


@dataclass(frozen=True)
class Entry:
    """The image key wrapped for one key, passphrase or recipient."""

    kind: EntryKind
    id: str
    wrapped: str  # base64
    params: tuple[tuple[str, str | int], ...] = ()  # salt (base64) and KDF costs

    def param(self, name: str) -> Any:
        return dict(self.params)[name]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "id": self.id, "wrapped": self.wrapped, **dict(self.params)}


@dataclass
class Principals:
    """Who a new image (or a rekey) lets in; the secrets are wiped on exit."""

    keys: list[Secret] = field(default_factory=list)
    passphrases: list[Secret] = field(default_factory=list)
    recipients: list[Recipient | ProviderRecipient] = field(default_factory=list)
    iter_time_ms: int = DEFAULT_ITER_TIME_MS

    def __bool__(self) -> bool:
        return bool(self.keys or self.passphrases or self.recipients)

    def wrap(self, image_key: Secret) -> list[Entry]:
        """One entry each; Argon2id is calibrated once per passphrase."""
        return [
            *(for_key(image_key, key) for key in self.keys),
            *(for_passphrase(image_key, p, self.iter_time_ms) for p in self.passphrases),
            *(for_recipient(image_key, r) for r in self.recipients),
        ]

    def __enter__(self) -> Principals:
        return self

    def __exit__(self, *_: object) -> None:
        for secret in (*self.keys, *self.passphrases):
            secret.wipe()


def principals(
    image: Path,
    keys: list[KeySource],
    passphrase: bool,
    recipients: list[str],
    iter_time_ms: int,
) -> Principals:
    """Who a new image or a rekey lets in; recipients are checked before anything is asked.

    Each of `keys` names one key source (UsageError if one names several)."""
    from cryptlayer.keys.recipients import load_recipient
    from cryptlayer.keys.sources import read_passphrase

    for source in keys:
        if source.count() > 1:
            raise UsageError(
                f"give at most one of {KEY_SOURCES}",
                "add more keys later with `cryptlayer rekey --add-key`",
            )
    loaded = [load_recipient(r) for r in recipients]
    chosen = Principals(recipients=loaded, iter_time_ms=iter_time_ms)
    try:
        chosen.keys += [source.read() for source in keys]
        if passphrase:
            chosen.passphrases.append(
                read_passphrase(f"New passphrase for {image}: ", confirm=True)
            )
    except BaseException:
        chosen.__exit__()
        raise
    return chosen


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def new_image_key() -> Secret:
    return Secret.random(IMAGE_KEY_BYTES)


def key_id(key: Secret) -> str:
    """A short name for a key that says nothing about it: 64 bits of HKDF output."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    with key.view() as data:
        tag = HKDF(hashes.SHA256(), 8, salt=None, info=INFO + b" key id").derive(data)
    return f"key:{tag.hex()}"


def _key_kek(key: Secret, salt: bytes) -> Secret:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    kek = Secret(bytearray(KEY_BYTES))
    with key.view() as data, kek.view() as out:
        HKDF(hashes.SHA256(), KEY_BYTES, salt=salt, info=INFO + b" key").derive_into(data, out)
    return kek


def _passphrase_kek(passphrase: Secret, salt: bytes, iterations: int, memory_kib: int) -> Secret:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    kek = Secret(bytearray(KEY_BYTES))
    kdf = Argon2id(
        salt=salt, length=KEY_BYTES, iterations=iterations, lanes=LANES, memory_cost=memory_kib
    )
    with passphrase.view() as data, kek.view() as out:
        kdf.derive_into(data, out)  # type: ignore[arg-type]  # any buffer works; the stub says bytes
    return kek


def _wrap(kek: Secret, image_key: Secret) -> str:
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    with kek, kek.view() as k, image_key.view() as data:
        return _b64(aes_key_wrap(k, data))


def _hpke() -> Any:
    from cryptography.hazmat.primitives import hpke

    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _oaep() -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=INFO)


def available_memory_kib() -> int:
    """Half of MemAvailable: Argon2id must not push the host into swap or the OOM killer."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 2
    except OSError:
        pass
    return MAX_MEMORY_KIB


def _probe(iterations: int, memory_kib: int) -> float:
    start = time.perf_counter()
    with Secret(bytearray(b"probe")) as probe:
        _passphrase_kek(probe, os.urandom(16), iterations, memory_kib).wipe()
    return max(time.perf_counter() - start, 1e-6)


def calibrate(iter_time_ms: int) -> tuple[int, int]:
    """Argon2id (iterations, memory KiB) that take about `iter_time_ms` here, memory first.

    Like cryptsetup's benchmark: measure, grow the memory until a run takes at least half the
    target (cost is not linear in memory: caches, and page faults in a VM), then scale the rest.
    """
    target = iter_time_ms / 1000
    ceiling = max(MIN_MEMORY_KIB, min(MAX_MEMORY_KIB, available_memory_kib()))
    memory, iterations = MIN_MEMORY_KIB, MIN_ITERATIONS
    took = _probe(iterations, memory)
    while took < target / 2 and memory < ceiling:
        memory = int(min(ceiling, memory * min(8.0, target / took)))
        took = _probe(iterations, memory)
    if memory < ceiling:
        memory = int(min(ceiling, memory * target / took))
    else:
        iterations = int(min(MAX_ITERATIONS, max(MIN_ITERATIONS, iterations * target / took)))
    memory = max(MIN_MEMORY_KIB, memory - memory % (8 * LANES))
    return min(iterations, MAX_WORK_KIB // memory), memory


def for_key(image_key: Secret, key: Secret) -> Entry:
    salt = os.urandom(16)
    wrapped = _wrap(_key_kek(key, salt), image_key)
    return Entry(EntryKind.KEY, key_id(key), wrapped, (("salt", _b64(salt)),))


def for_passphrase(image_key: Secret, passphrase: Secret, iter_time_ms: int) -> Entry:
    iterations, memory = calibrate(iter_time_ms)
    salt = os.urandom(16)
    wrapped = _wrap(_passphrase_kek(passphrase, salt, iterations, memory), image_key)
    params = (
        ("kdf", "argon2id"),
        ("salt", _b64(salt)),
        ("iterations", iterations),
        ("memory_kib", memory),
        ("lanes", LANES),
    )
    ident = f"passphrase:{os.urandom(4).hex()}"
    return Entry(EntryKind.PASSPHRASE, ident, wrapped, tuple(sorted(params)))


def _provider_check(image_key: Secret) -> str:
    """64 bits of HKDF of the image key: tells a provider's wrong answer from the right one."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    with image_key.view() as data:
        return (
            HKDF(hashes.SHA256(), 8, salt=None, info=INFO + b" provider check").derive(data).hex()
        )


def for_recipient(image_key: Secret, recipient: Recipient | ProviderRecipient) -> Entry:
    from cryptlayer.keys import providers

    if isinstance(recipient, providers.ProviderRecipient):
        annotation = providers.wrap(recipient, image_key)
        params = (("check", _provider_check(image_key)),)
        return Entry(EntryKind.PROVIDER, recipient.id, _b64(annotation), params)
    with image_key.view() as data:
        if recipient.kind == "x25519":
            wrapped = _hpke().encrypt(data, recipient.key, info=INFO)
        else:
            wrapped = recipient.key.encrypt(bytes(data), _oaep())  # type: ignore[union-attr]
    return Entry(EntryKind(recipient.kind), recipient.id, _b64(wrapped))


def _unwrap_aes(kek: Secret, wrapped: bytes) -> Secret | None:
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    with kek, kek.view() as k:
        try:
            return Secret(bytearray(aes_key_unwrap(k, wrapped)))
        except InvalidUnwrap:
            return None


def _unwrap(entry: Entry, credential: Credential) -> Secret | None:
    """The image key if `credential` opens `entry`, else None."""
    from cryptography.exceptions import InvalidTag

    wrapped = base64.b64decode(entry.wrapped)
    if entry.kind == "key" and credential.key is not None:
        salt = base64.b64decode(entry.param("salt"))
        return _unwrap_aes(_key_kek(credential.key, salt), wrapped)
    if entry.kind == "passphrase" and credential.passphrase is not None:
        iterations, memory = argon2_cost(entry)
        salt = base64.b64decode(entry.param("salt"))
        return _unwrap_aes(
            _passphrase_kek(credential.passphrase, salt, iterations, memory), wrapped
        )
    identity = credential.identity
    if identity is None or identity.id != entry.id or entry.kind != str(identity.kind):
        return None  # (an entry of another kind under its id: a hostile keys.json's)
    from cryptlayer.keys import providers

    if isinstance(identity, providers.ProviderIdentity):
        return _unwrap_provider(entry, identity, wrapped)
    from cryptlayer.keys.heldkey import HeldKey

    if isinstance(identity.key, HeldKey):  # in a TPM or token, whose raw RSA does the unwrap
        return identity.key.decrypt_oaep(wrapped, INFO) if entry.kind == "rsa" else None
    try:
        if entry.kind == "x25519":
            raw = _hpke().decrypt(wrapped, identity.key, info=INFO)
        else:
            raw = identity.key.decrypt(wrapped, _oaep())  # type: ignore[union-attr]
    except (InvalidTag, ValueError):
        return None
    return Secret(bytearray(raw))


def _unwrap_provider(entry: Entry, identity: ProviderIdentity, annotation: bytes) -> Secret:
    """The image key from the provider; ProviderError (naming it) when its answer is not."""
    from cryptlayer.keys import providers

    image_key = providers.unwrap(identity, annotation)
    if len(image_key) != IMAGE_KEY_BYTES or _provider_check(image_key) != entry.param("check"):
        image_key.wipe()
        raise providers.ProviderError(
            f"key provider {printable(identity.name)} answered a key that does not open this image",
            "is it the provider (and are they the parameters) the image was built for?",
        )
    return image_key


def argon2_cost(entry: Entry) -> tuple[int, int]:
    """(iterations, memory KiB) of a passphrase entry; UsageError when out of bounds (a hostile
    keys.json must not make us compute for hours or exhaust the host's memory)."""
    iterations, memory = entry.param("iterations"), entry.param("memory_kib")
    ceiling = max(MIN_MEMORY_KIB, min(MAX_MEMORY_KIB, available_memory_kib()))
    if (
        not 1 <= iterations <= MAX_ITERATIONS
        or not MIN_MEMORY_KIB <= memory <= ceiling
        or iterations * memory > MAX_WORK_KIB
        or entry.param("lanes") != LANES
    ):
        raise UsageError(
            f"{FILE} asks for an Argon2id cost out of bounds ({iterations} iterations,"
            f" {memory} KiB, {entry.param('lanes')} lanes; at most {MAX_ITERATIONS},"
            f" {ceiling} KiB here and {MAX_WORK_KIB} KiB of memory passes, {LANES} lanes)",
            "the image is damaged or hostile; rebuild it",
        )
    return iterations, memory


def _gib(work_kib: int) -> str:
    return f"{work_kib / GIB_KIB:.4g} GiB"


def passphrase_work(entries: list[Entry]) -> tuple[int, int]:
    """(how many passphrase entries, their Argon2id memory passes in KiB together)."""
    mine = [e for e in entries if e.kind == "passphrase"]
    return len(mine), sum(e.param("iterations") * e.param("memory_kib") for e in mine)


def check_passphrase_budget(image: Path, entries: list[Entry]) -> None:
    """UsageError, before any Argon2id runs, unless trying a passphrase on every passphrase
    entry stays within one budget: at most MAX_PASSPHRASE_ENTRIES, each within its bounds,
    MAX_WORK_KIB of memory passes in all (a hostile keys.json must not make us compute for
    hours with many entries each within bounds)."""
    candidates = [e for e in entries if e.kind == "passphrase"]
    if len(candidates) > MAX_PASSPHRASE_ENTRIES:
        raise UsageError(
            f"{image}/{FILE} has {len(candidates)} passphrase entries, more than"
            f" {MAX_PASSPHRASE_ENTRIES} (each costs an Argon2id run to try)",
            "the image is damaged or hostile; rebuild it",
        )
    for entry in candidates:
        argon2_cost(entry)
    count, work = passphrase_work(candidates)
    if work > MAX_WORK_KIB:
        raise UsageError(
            f"{image}/{FILE} asks for {_gib(work)} of Argon2id memory passes in all ({count}"
            f" passphrase entries), more than the {_gib(MAX_WORK_KIB)} cryptlayer spends on"
            " trying a passphrase",
            "the image is damaged or hostile; rebuild it",
        )


def unlock(image: Path, entries: list[Entry], credential: Credential) -> Secret:
    """The image key, unwrapped with `credential`; WrongKeyError saying who could open it."""
    if credential.identity is not None:
        candidates = [e for e in entries if e.id == credential.identity.id]
        if not candidates:
            raise WrongKeyError(
                f"identity {credential.identity.path} ({credential.identity.id})"
                " is not a recipient of this image",
                f"`cryptlayer inspect {image}` lists who can open it",
            )
        if len(candidates) > 1:  # rekey never writes an id twice; each try may be hardware's
            raise UsageError(
                f"{image}/{FILE} has {len(candidates)} entries for identity"
                f" {credential.identity.path} ({credential.identity.id})",
                "the image is damaged or hostile; rebuild it",
            )
    elif credential.key is not None:
        key = key_id(credential.key)
        candidates = [e for e in entries if e.id == key]
    else:
        candidates = [e for e in entries if e.kind == "passphrase"]
        check_passphrase_budget(image, candidates)
    for entry in candidates:
        image_key = _unwrap(entry, credential)
        if image_key is not None:
            if len(image_key) != IMAGE_KEY_BYTES:
                raise UsageError(
                    f"{image}/{FILE} holds a key of the wrong size",
                    "the image is damaged; rebuild it",
                )
            return image_key
    what = "passphrase" if credential.passphrase is not None else "key"
    raise WrongKeyError(
        f"the {what} does not open this image",
        f"`cryptlayer inspect {image}` lists the keys and recipients that can",
    )


@dataclass(frozen=True)
class Keys:
    """keys.json: the entries, and the statement's MAC under the image key (statement.py)."""

    entries: list[Entry]
    statement_mac: str = ""


def load(image: Path, *, dir_fd: int | None = None) -> Keys:
    """IMAGE/keys.json (with `dir_fd`: in that open directory); UsageError saying what is wrong."""
    path = image / FILE
    raw = read_image_json(
        path,
        FORMAT,
        "the image is incomplete (or older than cryptlayer keys v1); rebuild it",
        dir_fd=dir_fd,
    )
    try:
        items = raw["entries"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_ENTRIES:
            raise ValueError(f"entries is not a list of 1 to {MAX_ENTRIES} entries")
        unknown = set(raw) - {"format", "entries", "statement_mac"}
        if unknown:
            raise ValueError(f"it has unknown fields {printable(', '.join(sorted(unknown)))}")
        entries = [_entry(item, i) for i, item in enumerate(items)]
        return Keys(entries, text(raw.get("statement_mac", ""), "statement_mac"))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
        raise UsageError(
            f"{path} is malformed: {detail}", "the image is damaged; rebuild it"
        ) from err


def _entry(item: Any, index: int) -> Entry:
    """One entry of keys.json, every field checked for type and form."""
    where = f"entry {index}"
    if not isinstance(item, dict):
        raise ValueError(f"{where} is not an object")
    kind = text(item["type"], f"{where}'s type")
    if kind not in {k.value for k in EntryKind}:
        raise ValueError(f"{where}'s type {printable(kind)} is not one of {', '.join(EntryKind)}")
    _b64_field(item["wrapped"], f"{where}'s wrapped")
    params: list[tuple[str, str | int]] = []
    for name, value in item.items():
        if name in ("type", "id", "wrapped"):
            continue
        if name == "salt":
            _b64_field(value, f"{where}'s salt")
        elif name in ("iterations", "memory_kib", "lanes"):
            number(value, f"{where}'s {name}", 1 << 32)
        elif name == "check" and not (
            isinstance(value, str) and len(value) == 16 and set(value) <= set("0123456789abcdef")
        ):
            raise ValueError(f"{where}'s check is not 16 hex digits")
        elif name == "kdf" and value != "argon2id":
            raise ValueError(f"{where}'s kdf {printable(json.dumps(value))} is not argon2id")
        params.append((text(name, "a field name"), value))
    needed = {
        "key": {"salt"},
        "passphrase": {"salt", "iterations", "memory_kib", "lanes"},
        "provider": {"check"},
    }
    missing = needed.get(kind, set()) - {name for name, _ in params}
    if missing:
        raise ValueError(f"{where} ({kind}) lacks {', '.join(sorted(missing))}")
    ident = text(item["id"], f"{where}'s id")
    return Entry(EntryKind(kind), ident, item["wrapped"], tuple(sorted(params)))


def _b64_field(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text(value, what), validate=True)
    except binascii.Error as err:
        raise ValueError(f"{what} is not base64 ({err})") from None


def save(
    image: Path, entries: list[Entry], statement_mac: str, *, dir_fd: int | None = None
) -> None:
    """Write IMAGE/keys.json atomically: a crash leaves the old set of entries or the new one.

    With `dir_fd` (IMAGE, open), it is written in that directory, whatever IMAGE names now."""
    if not entries:
        raise UsageError("nobody could open the image", "keep at least one key or recipient")
    # what would be refused when a passphrase is tried is not written: an image nobody opens
    count, work = passphrase_work(entries)
    if count > MAX_PASSPHRASE_ENTRIES:
        raise UsageError(
            f"{image}/{FILE} would have {count} passphrase entries, more than"
            f" {MAX_PASSPHRASE_ENTRIES} (each costs an Argon2id run to try)",
            "remove a passphrase first (rekey --remove)",
        )
    if work > MAX_WORK_KIB:
        raise UsageError(
            f"{image}/{FILE} would ask for {_gib(work)} of Argon2id memory passes in all"
            f" ({count} passphrase entries), more than the {_gib(MAX_WORK_KIB)} cryptlayer"
            " spends on trying a passphrase",
            "remove a passphrase first (rekey --remove), or add it with a smaller --iter-time",
        )
    doc = {
        "format": FORMAT,
        "entries": [e.to_json() for e in entries],
        "statement_mac": statement_mac,
    }
    if dir_fd is None:
        write_json_atomic(image / FILE, doc)
    else:
        write_atomic_at(dir_fd, FILE, json_bytes(doc))
