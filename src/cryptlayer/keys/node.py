"""The node's keys: the Credential a `[[keys]]` entry of /etc/cryptlayer/config.toml gives an
image (config.py reads and checks the entries).

An entry may choose the image by its signer or its digest, which mean something only once the
image was opened and those were checked: so `NodeKeys` is handed to runtime/container.py in
place of a Credential, and `choose` is called there between image/opener.py's checks and the
unlock (never before the signatures were verified, never with a key of the pod's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptlayer import config
from cryptlayer.errors import UsageError, printable
from cryptlayer.keys.sources import Credential, KeySource, credential


@dataclass(frozen=True)
class NodeKeys:
    """The key `[[keys]]` gives the image, to be chosen once it is open and checked. A context
    manager, as a Credential is (it holds nothing to wipe: the chosen Credential is wiped by
    whoever chose it)."""

    repository: str | None = None  # the repository the image was pulled from at create
    otherwise: str = ""  # ends the hint when no entry matches (the command line's options)

    def choose(self, image: Path, *, signers: Sequence[str], digest: str) -> Credential:
        """The first matching entry's Credential for `image`, whose trusted `signers`
        (OpenedImage.signers) and `digest` (its statement's) were checked."""
        entry = config.key_for(image, signers=signers, digest=digest,
                               repository=self.repository, otherwise=self.otherwise)  # fmt: skip
        return entry_credential(image, entry)

    def wipe(self) -> None:
        """Nothing to wipe (as Credential.wipe, for callers that hold either)."""

    def __enter__(self) -> NodeKeys:
        return self

    def __exit__(self, *_: object) -> None:
        pass


def entry_credential(image: Path, entry: config.ImageKey) -> Credential:
    """The Credential of `entry`: its key file, identity (read by the loader `--identity`
    uses, whatever its kind), command or keyring key. A file it names must be root's (the
    runtime's user's) own, writable by no one else: whoever can write it chooses the key."""
    for path in entry.paths:
        try:
            st = os.lstat(path)
        except OSError as err:
            raise UsageError(
                f"cannot read the key {printable(path)} that {config._path()} names: {err.strerror}"
            ) from None
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UsageError(
                f"the key {printable(path)} is not root's own file, writable by no one else",
                f"chown root {path}; chmod 600 {path}",
            )
    if entry.key_command is not None:
        _check_program(entry.key_command)
    source = KeySource(entry.key_file, entry.key_command, entry.keyring)
    return credential(image, source, False, entry.identity)


def _check_program(command: str) -> None:
    """UsageError when another user could change the key command's program (found as the runner
    finds it) or replace it: it, or an entry above it up to /, as named and where its symbolic
    links lead, owned by someone other than root and us or writable by group or others (a
    sticky directory such as /tmp excepted). It runs as root, and its output is the key."""
    import shlex
    import stat

    from cryptlayer.tools.runner import which

    program = which(shlex.split(command)[0])
    mine = (0, os.geteuid())
    pending = [os.path.realpath(program), os.path.abspath(program)]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        while name not in seen and len(seen) < 1000:
            seen.add(name)
            try:
                st = os.lstat(name)
                if stat.S_ISLNK(st.st_mode):
                    here = os.path.realpath(os.path.dirname(name))
                    pending.append(os.path.normpath(os.path.join(here, os.readlink(name))))
            except OSError as err:
                raise UsageError(f"cannot examine the key command's {printable(name)}:"
                                 f" {err.strerror}") from None  # fmt: skip
            sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
            why = None
            if st.st_uid not in mine:
                why = f"{printable(name)} is owned by uid {st.st_uid}"
            elif not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022 and not sticky:
                why = f"{printable(name)} is writable by group or others"
            if why is not None:
                raise UsageError(
                    f"{why}: another user could change the key command {printable(program)} that"
                    f" {config._path()} names, and so the key and what runs as {_who()}",
                    f"make it, and the directories above it, {_who()}'s and writable by their"
                    f" owner only (chown root; chmod go-w)",
                )
            name = os.path.dirname(name)


def _who() -> str:
    return "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
