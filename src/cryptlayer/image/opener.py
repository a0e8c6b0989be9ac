"""Opening an image: the one way every command gets at an image, in the one correct order.

Anyone who can write an image directory decides what it holds, so what is read from it is
proven before it is used, and each proof comes before anything that relies on it:

1. the path the user gave is resolved; below it, nothing is followed;
2. the directory is opened (O_DIRECTORY|O_NOFOLLOW) and, unless the policy allows a shared one,
   must not be writable by others (files.check_private); everything below is read relative to
   that descriptor, so a directory renamed or swapped for a symlink meanwhile changes nothing;
3. manifest.json, the statement: the pinned digest (`--digest`) checked over its bytes before
   anything is parsed (another statement is that, whatever it holds), then parsed once (its
   exact bytes kept);
4. the publishers' signatures against the trust file, before any key is read;
5. each layer file and hash tree, by descriptor (files.open_layer), and, for an erase that a
   container owed, each the very file the container opened (its recorded identity, as many);
then, only through `OpenedImage.unlock`: keys.json, the image key unwrapped, the statement's
MAC under it, and every layer's LUKS2 header against the statement (luksheader.py). No caller
gets a key without the MAC and the header checks, and none reaches a key before the digest and
the signatures were checked.

Each command asks only for what it needs (`Policy`): `run`/`start` everything; `rekey` the
directory, the files and the key; `verify` the signatures and headers without a key; `shred`
the files (of any size: a damaged image is erased too) and their identities; `inspect` the
statement only, then each layer itself, tolerantly (it reports damage rather than refusing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from cryptlayer.errors import ErasedImageError, TamperedImageError
from cryptlayer.fsutil import FileId
from cryptlayer.image import envelope, luksheader, statement
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.image.files import (
    ImageFiles,
    LayerFile,
    check_private,
    open_dir,
    open_layer,
    require_same,
)
from cryptlayer.image.luksheader import Header
from cryptlayer.image.manifest import Manifest
from cryptlayer.keys.sources import Credential
from cryptlayer.secret import Secret
from cryptlayer.tools import cryptsetup

COPY_AGAIN = "do not use this copy; copy the image again from a source you trust"


@dataclass(frozen=True)
class Policy:
    """What a command needs of an image; each check it asks for is done in open_image's order."""

    digest: str | None = None  # --digest: the statement must be exactly this one
    trust: Path | None = None  # allowed_signers: a key of it must have signed the statement
    # every signature present is checked (verify): without `trust` one that does not verify
    # refuses the image; with it, those are reported (OpenedImage.rejected)
    all_signatures: bool = False
    allow_shared: bool = False  # a directory users other than root may write
    layers: bool = True  # open each layer file (inspect opens them itself, tolerantly)
    sizes: bool = True  # each layer of its recorded size, and its hash tree (not for an erase)
    # each layer must be the file (device, inode) recorded when a container opened the image:
    # the erase `stop` or `gc` completes for it (empty: recorded by a cryptlayer that did not)
    expected: Sequence[FileId] = ()


@dataclass
class OpenedImage:
    """An image whose statement was read and checked as its Policy asked, with its directory and
    layer files held open; a context manager that closes them."""

    manifest: Manifest
    files: ImageFiles
    signers: tuple[str, ...] = ()  # trusted principals, or (all_signatures) key fingerprints
    rejected: tuple[str, ...] = ()  # signatures that did not verify, beside a trusted one
    _keys: envelope.Keys | None = None
    _headers: list[Header] | None = None
    _stack: ExitStack = field(default_factory=ExitStack)

    @property
    def image(self) -> Path:
        """The image's path as the user gave it (resolved), for messages."""
        return self.files.image

    def __enter__(self) -> OpenedImage:
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    @property
    def keys(self) -> envelope.Keys:
        """keys.json, read from the open directory (once)."""
        if self._keys is None:
            self._keys = envelope.load(self.image, dir_fd=self.files.dir_fd)
        return self._keys

    def headers(self) -> list[Header]:
        """Every layer's LUKS2 header, read from its descriptor and checked against the
        statement (TamperedImageError naming the first that differs); checked once."""
        if len(self.files.layers) != len(self.manifest.layers):  # (Policy(layers=False))
            raise RuntimeError(f"{self.image} was opened without its layers: no header to check")
        if self._headers is None:
            self._headers = [
                luksheader.require(file.fd, self.manifest, layer, file.shown)
                for layer, file in zip(self.manifest.layers, self.files.layers, strict=True)
            ]
        return self._headers

    def unlock(self, credential: Credential) -> Secret:
        """The image key, unwrapped from keys.json with `credential`, once the statement is
        proven authentic by it (its MAC) and every layer's header is the statement's."""
        key = envelope.unlock(self.image, self.keys.entries, credential)
        try:
            statement.authenticate(self.image, self.manifest, self.keys.statement_mac, key)
            self.headers()
        except BaseException:
            key.wipe()
            raise
        return key

    def require_intact(self, *, first_only: bool = False) -> None:
        """ErasedImageError if any layer (or, `first_only`, the bottom one, which every erase
        wipes first) has no keyslot left; read from the header as it is now."""
        for layer in self.files.layers[:1] if first_only else self.files.layers:
            if keyslot_count(layer) == 0:
                raise shredded(self.image)

    def test_key(self, key: Secret) -> None:
        """UsageError unless `key` (from unlock: the headers are checked) opens every layer."""
        for file in self.files.layers:
            cryptsetup.test_key(file.path, key, file.shown)


def keyslot_count(layer: LayerFile) -> int:
    """How many keyslots the LUKS2 header of the open layer file still has."""
    return luksheader.read(layer.fd, layer.shown).keyslots


def shredded(image: Path) -> ErasedImageError:
    """The error for an image whose keyslots are gone."""
    return ErasedImageError(
        f"image {image} was shredded (crypto-erased): no key can open it any more",
        "build or copy a fresh image",
    )


def changed_layer(shown: Path, *, against: str = "", found: str = "") -> TamperedImageError:
    """The error for a layer file whose blocks do not match its dm-verity hash tree (`against`
    what, `found` how: by `verify`, or by the kernel)."""
    return TamperedImageError(
        f"layer file {shown} does not match its dm-verity hash tree{against}: it was changed"
        f" after the build{found}",
        COPY_AGAIN,
    )


def open_image(image: Path, policy: Policy) -> OpenedImage:
    """Open `image` as `policy` asks, every check in the order above; the first that fails
    raises (UsageError, DamagedImageError, TamperedImageError), and nothing stays open."""
    image = image.resolve()  # the path the user gave; below it, nothing is followed
    stack = ExitStack()
    try:
        files = stack.enter_context(open_dir(image))
        if not policy.allow_shared:
            check_private(image, os.fstat(files.dir_fd))
        # the pinned digest over the statement's bytes, before they are parsed
        manifest = manifest_mod.load(
            image,
            dir_fd=files.dir_fd,
            check=lambda data: statement.require_digest(image, data, policy.digest),
        )
        signers, rejected = _signatures(files, manifest, policy)
        if policy.layers:
            for layer in manifest.layers:
                size = layer.size if policy.sizes else None
                files.layers.append(open_layer(files, layer.file, size))
                if policy.sizes:  # (an erase needs no tree)
                    files.trees.append(open_layer(files, layer.tree, layer.tree_size))
            require_same(files, policy.expected, "that the container opened")
    except BaseException:
        stack.close()
        raise
    return OpenedImage(manifest, files, signers, rejected, _stack=stack)


def _signatures(
    files: ImageFiles, manifest: Manifest, policy: Policy
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The signers and the rejected signatures, as the policy asks (before any key is read)."""
    if policy.trust is None and not policy.all_signatures:
        return (), ()
    # only here: its import is a cost every start would pay
    from cryptlayer.image import signatures

    image, raw, dir_fd = files.image, manifest.raw, files.dir_fd
    if policy.trust is not None:
        names = signatures.require_trusted(image, raw, policy.trust, dir_fd=dir_fd)
        bad = signatures.read_all(image, raw, dir_fd=dir_fd)[1] if policy.all_signatures else []
        return tuple(names), tuple(map(str, bad))
    good, bad = signatures.read_all(image, raw, dir_fd=dir_fd)
    if bad:
        raise TamperedImageError(
            f"a signature of {image} does not verify ({'; '.join(map(str, bad))})",
            "the image changed since it was signed, or the signature is damaged",
        )
    return tuple(f"{s.key.fingerprint} ({s.file})" for s in good), ()
