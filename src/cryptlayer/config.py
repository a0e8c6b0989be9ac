"""The host's settings: /etc/cryptlayer/config.toml ($CRYPTLAYER_CONFIG), all optional.

trust = "/etc/cryptlayer/allowed_signers"   # run/start/verify --trust when not given
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from .errors import UsageError, printable

DEFAULT = Path("/etc/cryptlayer/config.toml")
KNOWN = {"trust"}


def _path() -> Path:
    return Path(os.environ.get("CRYPTLAYER_CONFIG", DEFAULT))


def trust(given: Path | None) -> Path | None:
    """The allowed_signers file to hold images to: `given`, else the config's, else none."""
    if given is not None:
        return given
    path = _path()
    try:
        settings = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}", "fix or remove the file") from None
    unknown = sorted(set(settings) - KNOWN)
    if unknown:
        which = "setting" if len(unknown) == 1 else "settings"
        raise UsageError(
            f"{path}: unknown {which} {printable(', '.join(unknown))}"
            f" (known: {', '.join(sorted(KNOWN))})",
            "fix or remove it" if len(unknown) == 1 else "fix or remove them",
        )
    value = settings.get("trust")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"{path}: trust is not a path", 'e.g. trust = "/etc/cryptlayer/signers"')
    return Path(value)
