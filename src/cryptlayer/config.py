"""The host's settings: /etc/cryptlayer/config.toml ($CRYPTLAYER_CONFIG), all optional.

trust = "/etc/cryptlayer/allowed_signers"   # run/start/verify --trust when not given
allow-unsigned = false                       # cryptlayer-runtime: run images no one signed
quiet-warnings = ["core-pattern"]            # warnings this host's operator has accepted
block-cache-size = "4G"                      # lazy start's ciphertext cache: bytes, or K/M/G/T
[runtime]                                    # cryptlayer-runtime's (docs/engines.md):
runtime = "crun"                             # the OCI runtime it hands over to (runc, a path)
[[keys]]                                     # cryptlayer-runtime's keys, first match wins:
image = "/srv/images/app*"                   # an image directory, or a glob of them
key-file = "/etc/cryptlayer/keys/app.key"    # or identity = "/etc/cryptlayer/keys/id.pem"
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptlayer.errors import UsageError, printable

DEFAULT = Path("/etc/cryptlayer/config.toml")
KNOWN = ("allow-unsigned", "block-cache-size", "keys", "quiet-warnings", "runtime", "trust")
RUNTIME_KNOWN = ("runtime",)  # the [runtime] table's
KEY_MATCH = ("image",)  # what a [[keys]] entry matches
KEY_SOURCES = ("identity", "key-file")  # and where its key is: exactly one of these
KEYS_EXAMPLE = '[[keys]] image = "/srv/images/app" key-file = "/etc/cryptlayer/keys/app.key"'

# Every warning cryptlayer prints, by the name it carries (`warning: ... [NAME]`) and that
# quiet-warnings takes. --strict still refuses on the host's, silenced or not.
WARNINGS = {
    "swap": "swap that is not on dm-crypt (run, start)",
    "zram-writeback": "zram swap that writes idle pages to a disk (run, start)",
    "core-pattern": "a core_pattern that writes core dumps to files (run, start)",
    "hibernation": "hibernation to a device that is not on dm-crypt (run, start)",
    "erase-storage": "an image on copy-on-write or flash storage, where old copies of erased"
    " keyslots may survive (run, start, shred)",
    "signature": "a signature that does not verify, beside a trusted one (verify)",
}


def _path() -> Path:
    return Path(os.environ.get("CRYPTLAYER_CONFIG", DEFAULT))


def _settings() -> tuple[Path, dict[str, Any]]:
    """The config file's path and its settings (none when it does not exist)."""
    path = _path()
    try:
        settings = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return path, {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}", "fix or remove the file") from None
    unknown = sorted(set(settings) - set(KNOWN))
    if unknown:
        which = "setting" if len(unknown) == 1 else "settings"
        raise UsageError(
            f"{path}: unknown {which} {printable(', '.join(unknown))}"
            f" (known: {', '.join(sorted(KNOWN))})",
            "fix or remove it" if len(unknown) == 1 else "fix or remove them",
        )
    _runtime(path, settings)  # every command holds the whole file to its rules
    _keys(path, settings)
    _allow_unsigned(path, settings)
    _block_cache_size(path, settings)
    return path, settings


def trust(given: Path | None) -> Path | None:
    """The allowed_signers file to hold images to: `given`, else the config's, else none."""
    if given is not None:
        return given
    path, settings = _settings()
    value = settings.get("trust")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"{path}: trust is not a path", 'e.g. trust = "/etc/cryptlayer/signers"')
    return Path(value)


def quiet_warnings() -> frozenset[str]:
    """The warnings (names of WARNINGS) this host's operator silenced."""
    path, settings = _settings()
    value = settings.get("quiet-warnings", [])
    example = 'e.g. quiet-warnings = ["core-pattern"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{path}: quiet-warnings is not a list of names", example)
    unknown = [v for v in value if v not in WARNINGS]
    if unknown:
        raise UsageError(
            f"{path}: quiet-warnings names no warning {printable(unknown[0])}",
            f"the warnings are {', '.join(WARNINGS)}",
        )
    return frozenset(value)


def oci_runtime() -> str:
    """The OCI runtime cryptlayer-runtime hands over to: "crun" (the default), "runc", or an
    absolute path (`[runtime] runtime`)."""
    return _runtime(*_settings())


def _runtime(path: Path, settings: dict[str, Any]) -> str:
    table = settings.get("runtime", {})
    example = '[runtime] runtime = "runc" (or "crun", or the runtime\'s absolute path)'
    if not isinstance(table, dict):
        raise UsageError(f"{path}: runtime is not a table", f"write it as {example}")
    unknown = sorted(set(table) - set(RUNTIME_KNOWN))
    if unknown:
        raise UsageError(
            f"{path}: unknown setting {printable(unknown[0])} in [runtime]"
            f" (known: {', '.join(RUNTIME_KNOWN)})",
            "fix or remove it",
        )
    value = table.get("runtime", "crun")
    if not isinstance(value, str) or not (value in ("crun", "runc") or value.startswith("/")):
        shown = printable(value) if isinstance(value, str) else type(value).__name__
        raise UsageError(f"{path}: [runtime] runtime {shown} is not crun, runc or an absolute path",
                         f"e.g. {example}")  # fmt: skip
    if "\0" in value:
        raise UsageError(f"{path}: [runtime] runtime holds a NUL byte", f"e.g. {example}")
    return value


def allow_unsigned() -> bool:
    """Whether cryptlayer-runtime may run an image no one signed (`allow-unsigned = true`) when
    no `trust` is configured: a node runs signed images only, by default."""
    return _allow_unsigned(*_settings())


def _allow_unsigned(path: Path, settings: dict[str, Any]) -> bool:
    value = settings.get("allow-unsigned", False)
    if not isinstance(value, bool):
        raise UsageError(
            f"{path}: allow-unsigned is not true or false", "e.g. allow-unsigned = true"
        )
    return value


BLOCK_CACHE_SIZE = 4 << 30  # the default: a few images' worth of what their jobs read
MIN_BLOCK_CACHE_SIZE = 64 << 20  # a few read-ahead windows of 1 MiB chunks, for each blob


def block_cache_size() -> int:
    """The bound of lazy start's block cache in bytes (`block-cache-size`: bytes, or a number
    with K, M, G or T, powers of 1024; docs/lazy.md)."""
    return _block_cache_size(*_settings())


def _block_cache_size(path: Path, settings: dict[str, Any]) -> int:
    import re

    value = settings.get("block-cache-size", BLOCK_CACHE_SIZE)
    example = 'e.g. block-cache-size = "8G"'
    if isinstance(value, str) and (m := re.fullmatch(r"([0-9]{1,15})(?:([KMGT])i?B?)?", value)):
        value = int(m[1]) << (10 * " KMGT".index(m[2] or " "))
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{path}: block-cache-size is not a size", example)
    if value < MIN_BLOCK_CACHE_SIZE:
        raise UsageError(f"{path}: block-cache-size is below"
                         f" {MIN_BLOCK_CACHE_SIZE >> 20} MiB", example)  # fmt: skip
    return value


@dataclass(frozen=True)
class ImageKey:
    """A `[[keys]]` entry: the images it is for (a path or a glob) and where their key is."""

    image: str
    key_file: str | None = None
    identity: str | None = None

    def matches(self, image: Path) -> bool:
        """Whether `image` (an absolute, resolved path) is one of this entry's: the path itself,
        or the glob's (fnmatch: `*` also matches `/`)."""
        import fnmatch

        return fnmatch.fnmatchcase(str(image), self.image)


def image_keys() -> list[ImageKey]:
    """The `[[keys]]` entries, in order. The file that names them must be root's (its owner's)
    and writable by no one else: whoever can write it chooses the key an image is opened with."""
    path, settings = _settings()
    entries = _keys(path, settings)
    if entries:
        st = path.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UsageError(
                f"{path} names keys, but it is not {_who()}'s own file, writable by no one else"
                f" (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
                f"chown root {path}; chmod go-w {path}",
            )
    return entries


def key_for(image: Path) -> ImageKey:
    """The first `[[keys]]` entry for `image` (resolved); UsageError when none is."""
    resolved = image.resolve()
    for entry in image_keys():
        if entry.matches(resolved):
            return entry
    raise UsageError(
        f"no key for the image {printable(str(resolved))} in {_path()}",
        f"add an entry for it, e.g. {KEYS_EXAMPLE}",
    )


def _who() -> str:
    return "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"


def _keys(path: Path, settings: dict[str, Any]) -> list[ImageKey]:
    value = settings.get("keys", [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{path}: keys is not a list of tables", f"write each as {KEYS_EXAMPLE}")
    entries = []
    for number, table in enumerate(value, 1):
        where = f"{path}: [[keys]] entry {number}"
        unknown = sorted(set(table) - set(KEY_MATCH) - set(KEY_SOURCES))
        if unknown:
            raise UsageError(
                f"{where}: unknown setting {printable(unknown[0])}"
                f" (known: {', '.join(KEY_MATCH + KEY_SOURCES)})",
                "fix or remove it",
            )
        for name, text in table.items():
            if not isinstance(text, str) or not text.startswith("/") or "\0" in text:
                raise UsageError(f"{where}: {name} is not an absolute path", f"e.g. {KEYS_EXAMPLE}")
        if "image" not in table:
            raise UsageError(f"{where} names no image", f"e.g. {KEYS_EXAMPLE}")
        sources = [name for name in KEY_SOURCES if name in table]
        if len(sources) != 1:
            raise UsageError(
                f"{where} must name exactly one of {' and '.join(KEY_SOURCES)}"
                f"{f' (it names {len(sources)})' if sources else ''}",
                f"e.g. {KEYS_EXAMPLE}",
            )
        pattern = table["image"]
        if len(pattern) > 1:
            pattern = pattern.rstrip("/")
        entries.append(ImageKey(pattern, table.get("key-file"), table.get("identity")))
    return entries
