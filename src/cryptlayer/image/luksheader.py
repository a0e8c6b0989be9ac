"""A layer's LUKS2 header, read and checked in Python before any key touches it.

A layer file is an attacker's until proven otherwise, and a LUKS2 header is not authenticated:
one whose segment or keyslot area uses `cipher_null` opens with *any* key and yields content of
the attacker's choosing (CVE-2025-59054 and the 2025 header-swap write-ups). So before cryptsetup
is handed the image key, each header must carry exactly what the authenticated statement records
(statement.py): the cipher, key size, sector size, data offset and UUID, one segment, at most one
keyslot of our own kind, no tokens and no requirements.

The on-disk format (cryptsetup's docs/on-disk-format-luks2.pdf): a 4 KiB binary header and a
JSON area, twice (the second copy right after the first), each with a SHA-256 checksum over both
parts. cryptsetup uses the valid copy with the higher sequence number, so both copies must be
valid and alike: then the JSON checked here is the JSON cryptsetup uses. Reading it here also
spares a `cryptsetup luksDump` process per layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptlayer.errors import TamperedImageError, printable
from cryptlayer.image.manifest import Layer, Manifest

BINARY_BYTES = 4096
MAGIC = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")  # primary, secondary
HEADER_SIZES = tuple(16384 << i for i in range(9))  # 16 KiB .. 4 MiB, as LUKS2 allows
MAX_BACKUP = 2 * HEADER_SIZES[-1] + (128 << 20)  # two copies and LUKS2's largest keyslots area
MAX_ITERATIONS = 1 << 22  # a keyslot's PBKDF2 rounds; ours take 1000
# The volume key's digest: cryptsetup benchmarks its rounds (a fraction of a second's worth); a
# header asking for billions would make every open compute for hours.
MAX_DIGEST_ITERATIONS = 1 << 24
DAMAGED = "the image is damaged or was tampered with; copy it again from a source you trust"


@dataclass(frozen=True)
class Header:
    """The metadata of one LUKS2 header: its binary fields and its JSON."""

    uuid: str
    seqid: int
    metadata: dict[str, Any]
    size: int  # of one copy (binary header and JSON area)

    @property
    def keyslots(self) -> int:
        slots = self.metadata.get("keyslots")
        return len(slots) if isinstance(slots, dict) else 0


def _copy(fd: int, offset: int, primary: bool) -> tuple[Header, bytes]:
    binary = os.pread(fd, BINARY_BYTES, offset)
    if len(binary) < BINARY_BYTES or binary[:6] != MAGIC[0 if primary else 1]:
        raise ValueError("no LUKS2 header" if primary else "no second header copy")
    version, size, seqid = struct.unpack_from(">HQQ", binary, 6)
    if version != 2:
        raise ValueError(f"LUKS version {version}, not 2")
    if size not in HEADER_SIZES:
        raise ValueError(f"header size {size} is not one LUKS2 allows")
    if binary[72:104].rstrip(b"\0") != b"sha256":
        raise ValueError("the header's checksum is not SHA-256")
    if struct.unpack_from(">Q", binary, 256)[0] != offset:
        raise ValueError("a header copy says it is elsewhere")
    whole = binary + os.pread(fd, size - BINARY_BYTES, offset + BINARY_BYTES)
    if len(whole) != size:
        raise ValueError("the header is cut short")
    blank = whole[:448] + bytes(64) + whole[512:]
    if hashlib.sha256(blank).digest() != whole[448:480]:
        raise ValueError("a header copy's checksum does not match")
    area = whole[BINARY_BYTES:].split(b"\0", 1)[0]
    try:
        metadata = json.loads(area.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"its metadata is not JSON ({err})") from None
    if not isinstance(metadata, dict):
        raise ValueError("its metadata is not an object")
    uuid = binary[168:208].rstrip(b"\0").decode("ascii", "replace")
    return Header(uuid, seqid, metadata, size), area


def read(fd: int, shown: Path) -> Header:
    """The header of the open layer file `fd`; TamperedImageError unless both copies are valid
    and alike."""
    try:
        primary, area = _copy(fd, 0, primary=True)
        size = struct.unpack_from(">Q", os.pread(fd, 16, 0), 8)[0]
        secondary, second_area = _copy(fd, size, primary=False)
        if (primary.seqid, primary.uuid, area) != (secondary.seqid, secondary.uuid, second_area):
            raise ValueError("its two header copies differ")
    except ValueError as err:
        raise TamperedImageError(
            f"{shown} is not a readable LUKS2 layer ({err})", DAMAGED
        ) from None
    except OSError as err:
        raise TamperedImageError(f"{shown} cannot be read ({err.strerror})", DAMAGED) from None
    return primary


def backup(source: Path, copy: Path) -> None:
    """Write the LUKS2 header of `source` (both metadata copies and the keyslots area) to the new
    file `copy`, read-only to its owner: the file `cryptsetup luksHeaderBackup` writes, which
    cryptsetup takes as a detached header, without starting it. TamperedImageError unless the
    header is a valid one."""
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = read(fd, source)
        keyslots = _only(header.metadata.get("config"), "config").get("keyslots_size")
        if not (isinstance(keyslots, str) and keyslots.isdigit()):
            raise TamperedImageError(f"{source}: its keyslots area has no size", DAMAGED)
        size = 2 * header.size + int(keyslots)
        if size > MAX_BACKUP:
            raise TamperedImageError(f"{source}: its header claims {size} bytes", DAMAGED)
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if len(data) != size:
        raise TamperedImageError(f"{source}: its header is cut short", DAMAGED)
    page = os.sysconf("SC_PAGESIZE")
    data += bytes(-size % page)  # cryptsetup writes whole pages
    out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out, view) :]
    finally:
        os.close(out)


def _only(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _shown(value: Any) -> str:
    """A header's value as a person reads it (not as Python prints a dict or a tuple), control
    characters escaped: the header is the attacker's."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return printable(value) if value else '""'
    if isinstance(value, (list, tuple)):
        return ", ".join(_shown(v) for v in value) if value else "none"
    if isinstance(value, dict):
        if not value:
            return "none"
        parts = (f"{printable(str(k))} " + (f"({_shown(v)})" if isinstance(v, dict) else _shown(v))
                 for k, v in value.items())  # fmt: skip
        return "; ".join(parts)
    return printable(json.dumps(value) if isinstance(value, (bool, int, float)) else repr(value))


def _expect(found: Any, wanted: Any, what: str) -> None:
    if found == wanted:
        return
    if isinstance(found, dict) and isinstance(wanted, dict) and wanted:
        names = [*wanted, *(k for k in found if k not in wanted)]
        diff = [
            f"{printable(str(k))} {_shown(got)}, the statement says {_shown(wanted.get(k))}"
            for k in names
            if (got := found.get(k)) != wanted.get(k)
        ]
        raise ValueError(f"{what} is not the statement's ({'; '.join(diff)})")
    raise ValueError(f"{what} is {_shown(found)}, the statement says {_shown(wanted)}")


def _check(header: Header, manifest: Manifest, layer: Layer) -> None:
    meta = header.metadata
    _expect(header.uuid, layer.uuid, "its UUID")
    segments = _only(meta.get("segments"), "segments")
    if sorted(segments) != ["0"]:
        shown = " and ".join(_shown(k) for k in sorted(segments)) or "none"
        raise ValueError(f"its segment list is {shown}, the image's layers have segment 0 only")
    segment = _only(segments["0"], "segment 0")
    _expect(
        {k: segment.get(k) for k in ("type", "offset", "size", "iv_tweak", "encryption")},
        {"type": "crypt", "offset": str(layer.offset), "size": "dynamic", "iv_tweak": "0",
         "encryption": manifest.cipher},
        "its data segment",
    )  # fmt: skip
    _expect(segment.get("sector_size"), manifest.sector_size, "its sector size")
    unknown = set(segment) - {"type", "offset", "size", "iv_tweak", "encryption", "sector_size"}
    if unknown:
        raise ValueError(
            f"its segment has extra fields ({_shown(sorted(unknown))}), the image's layers have"
            " none (no integrity, no flags)"
        )
    keyslots = _only(meta.get("keyslots"), "keyslots")
    if len(keyslots) > 1:
        raise ValueError(f"it has {len(keyslots)} keyslots, the image's layers have one")
    key_bytes = manifest.key_bits // 8
    for slot in keyslots.values():
        slot = _only(slot, "a keyslot")
        _expect(slot.get("type"), "luks2", "its keyslot type")
        _expect(slot.get("key_size"), key_bytes, "its keyslot's key size")
        area = _only(slot.get("area"), "a keyslot area")
        _expect(
            {"type": area.get("type"), "cipher": area.get("encryption"),
             "key size": area.get("key_size")},
            {"type": "raw", "cipher": manifest.cipher, "key size": key_bytes},
            "its keyslot area",
        )  # fmt: skip
        offset, size = str(area.get("offset", "")), str(area.get("size", ""))
        if not (offset.isdigit() and size.isdigit()):
            raise ValueError("its keyslot area's offset or size is not a number")
        end = int(offset) + int(size)
        if end > layer.offset:
            raise ValueError("its keyslot area reaches into the data")
        kdf = _only(slot.get("kdf"), "a keyslot's KDF")
        _expect(
            {"type": kdf.get("type"), "hash": kdf.get("hash")},
            {"type": "pbkdf2", "hash": "sha256"},
            "its keyslot's KDF",
        )
        iterations = kdf.get("iterations")
        if not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"its keyslot's PBKDF2 iterations are {_shown(iterations)}")
    digests = _only(meta.get("digests", {}), "digests")
    if len(digests) > 1:
        raise ValueError(f"it has {len(digests)} digests, the image's layers have one")
    for digest in digests.values():
        digest = _only(digest, "a digest")
        _expect(
            {"type": digest.get("type"), "hash": digest.get("hash")},
            {"type": "pbkdf2", "hash": "sha256"},
            "its digest",
        )
        rounds = digest.get("iterations")
        if not isinstance(rounds, int) or not 1 <= rounds <= MAX_DIGEST_ITERATIONS:
            raise ValueError(f"its digest's PBKDF2 iterations are {_shown(rounds)}")
    tokens = _only(meta.get("tokens", {}), "tokens")
    if tokens:
        raise ValueError(f"it has tokens ({_shown(tokens)}), the image's layers have none")
    config = _only(meta.get("config", {}), "config")
    if config.get("requirements") is not None:
        raise ValueError(
            f"it has requirements ({_shown(config.get('requirements'))}), the image's layers"
            " have none"
        )


def check(header: Header, manifest: Manifest, layer: Layer, shown: Path) -> None:
    """TamperedImageError unless `header` is the header the statement describes for `layer`."""
    try:
        _check(header, manifest, layer)
    except (ValueError, TypeError, AttributeError) as err:
        raise TamperedImageError(
            f"the LUKS2 header of {shown} is not the one the image was built with: {err}",
            "do not open it; copy the image again from a source you trust",
        ) from None


def require(fd: int, manifest: Manifest, layer: Layer, shown: Path) -> Header:
    """read and check the header of the open file `fd`."""
    header = read(fd, shown)
    check(header, manifest, layer, shown)
    return header
