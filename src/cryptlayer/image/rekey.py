"""Change who may open an image without re-encrypting it: only keys.json is rewritten.

The caller proves access with any current key, passphrase or identity; the image key it unwraps
is checked against every layer's LUKS header before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptlayer.errors import UsageError
from cryptlayer.image import envelope
from cryptlayer.image.opener import OpenedImage, Policy, open_image
from cryptlayer.keys.sources import Credential
from cryptlayer.tools.system import require_tools


@dataclass(frozen=True)
class Change:
    added: tuple[str, ...]
    removed: tuple[str, ...]


def _resolve(entries: list[envelope.Entry], who: str, image: Path) -> str:
    """The id of the entry `who` names: an id as `inspect` prints it, or a key, public key or
    identity file."""
    ids = {e.id for e in entries}
    if who in ids:
        return who
    path = Path(who)
    if path.is_file():
        from cryptlayer.keys.recipients import load_identity, load_recipient
        from cryptlayer.keys.sources import read_key

        for load in (load_recipient, load_identity):
            try:
                return load(who).id
            except UsageError:
                continue
        with read_key(who) as key:
            return envelope.key_id(key)
    raise UsageError(
        f"{who} is neither an id nor a key file",
        f"`cryptlayer inspect {image}` lists the ids of who can open it",
    )


def rekey(
    image: Path,
    credential: Credential,
    add: envelope.Principals,
    remove: list[str],
    *,
    allow_shared: bool = False,
) -> Change:
    """Add `add` and remove `remove` (ids or files) from who may open IMAGE.

    A directory that users other than root may write is refused unless `allow_shared`, as for
    every command that changes an image (files.check_private)."""
    require_tools("cryptsetup")
    with open_image(image, Policy(allow_shared=allow_shared)) as opened:
        opened.require_intact()
        return _rekey(opened, credential, add, remove)


def _rekey(
    opened: OpenedImage,
    credential: Credential,
    add: envelope.Principals,
    remove: list[str],
) -> Change:
    image, keys = opened.image, opened.keys
    entries = keys.entries
    doomed = {_resolve(entries, who, image) for who in remove}
    missing = doomed - {e.id for e in entries}
    if missing:
        raise UsageError(
            f"{', '.join(sorted(missing))} cannot open {image} anyway",
            f"`cryptlayer inspect {image}` lists who can",
        )
    with opened.unlock(credential) as image_key:
        opened.test_key(image_key)
        new = add.wrap(image_key)
    known = {e.id for e in entries if e.id not in doomed}
    again = [e.id for e in new if e.id in known and e.kind != "passphrase"]
    if again:
        raise UsageError(
            f"{', '.join(again)} can already open {image}",
            "nothing to add; --remove it first to replace it",
        )
    kept = [e for e in entries if e.id not in doomed]
    if not kept and not new:
        raise UsageError(
            "this would leave nobody able to open the image",
            "add a key, passphrase or recipient in the same rekey",
        )
    envelope.save(image, kept + new, keys.statement_mac, dir_fd=opened.files.dir_fd)
    return Change(tuple(e.id for e in new), tuple(sorted(doomed)))
