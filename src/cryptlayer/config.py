"""The host's settings: /etc/cryptlayer/config.toml ($CRYPTLAYER_CONFIG), all optional.

trust = "/etc/cryptlayer/allowed_signers"   # run/start/verify --trust when not given
quiet-warnings = ["core-pattern"]            # warnings this host's operator has accepted
[runtime]                                    # cryptlayer-runtime's (docs/engines.md):
runtime = "crun"                             # the OCI runtime it hands over to (runc, a path)
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from cryptlayer.errors import UsageError, printable

DEFAULT = Path("/etc/cryptlayer/config.toml")
KNOWN = ("quiet-warnings", "runtime", "trust")
RUNTIME_KNOWN = ("runtime",)  # the [runtime] table's

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
