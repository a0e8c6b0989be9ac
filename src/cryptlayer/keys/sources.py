"""Keys: reading, generating and holding them so they never leak.

A key lives in a `Secret` (secret.py), prints as <redacted>, and reaches cryptsetup only
through a pipe on stdin (see runner.run).
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlayer.errors import UsageError
from cryptlayer.secret import Secret

if TYPE_CHECKING:
    from cryptlayer.keys.providers import ProviderIdentity
    from cryptlayer.keys.recipients import Identity

# cryptsetup's own limit for a key file is 8 MiB; a key for us is small, so refuse anything large
# (a wrong path pointing at a big file) before reading it into memory.
MAX_KEY_BYTES = 8192


def _checked(data: bytearray, what: str) -> Secret:
    """Wrap what was read as a Secret, refusing empty or oversized input."""
    if len(data) > MAX_KEY_BYTES:
        data[:] = bytes(len(data))
        raise UsageError(f"{what} is larger than {MAX_KEY_BYTES} bytes", "is it really a key?")
    if not data:
        raise UsageError(f"{what} is empty", "pass a key made by `cryptlayer keygen`")
    return Secret(data)


def _read_fd(fd: int, what: str) -> Secret:
    buf = bytearray(MAX_KEY_BYTES + 1)
    n = 0
    with memoryview(buf) as mv:
        while n < len(buf):
            got = os.readv(fd, [mv[n:]])
            if got == 0:
                break
            n += got
    del buf[n:]  # shrinks in place: no copy of the key is left behind
    return _checked(buf, what)


def _stdin() -> tuple[Any, int]:
    """Standard input as a binary stream and its descriptor; -1 when it has none (an
    in-process caller such as a test runner), so that the stream itself must be read."""
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    try:
        return stdin, stdin.fileno()
    except (OSError, ValueError, AttributeError):
        return stdin, -1


def read_key(source: str) -> Secret:
    """Read a key from a file path, or from standard input when `source` is '-'."""
    if source == "-":
        stdin, fd = _stdin()
        if fd < 0:
            data = stdin.read(MAX_KEY_BYTES + 1)
            raw = data.encode() if isinstance(data, str) else data
            return _checked(bytearray(raw), "the key on standard input")
        return _read_fd(fd, "the key on standard input")
    path = Path(source)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise UsageError(
            f"key file {source} does not exist", "create one with `cryptlayer keygen`"
        ) from None
    except OSError as err:
        raise UsageError(f"cannot read key file {source}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"key file {source} is not a regular file")
        if st.st_mode & 0o077:  # as ssh refuses an unprotected private key
            raise UsageError(
                f"key file {source} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod 600 {source}",
            )
        return _read_fd(fd, f"key file {source}")
    finally:
        os.close(fd)


def write_new_key(path: Path) -> None:
    """Write a new random key to `path`, mode 0600; never overwrite an existing file."""
    from cryptlayer.fsutil import write_new_file

    with Secret.random() as key, key.view() as data:
        write_new_file(path, data, 0o600)


def read_key_command(command: str) -> Secret:
    """Run COMMAND (split like a shell would, but without one) and take its stdout as the key.

    The hook for Vault, a KMS or any key service, like cryptsetup's keyscripts.
    """
    import shlex

    from cryptlayer.tools.runner import run_for_secret

    argv = shlex.split(command)
    if not argv:
        raise UsageError("--key-command is empty", "give a program that prints the key")
    return _checked(run_for_secret(argv, MAX_KEY_BYTES + 1), f"the output of {argv[0]}")


def read_keyring(name: str) -> Secret:
    """The payload of user key NAME in the kernel keyring (the user's, then the session's)."""
    from cryptlayer.tools import keyctl

    for ring in ("@u", "@s"):
        key_id = keyctl.search(ring, name)
        if key_id is not None:
            return _checked(keyctl.pipe(key_id, MAX_KEY_BYTES + 1), f"keyring key {name!r}")
    raise UsageError(
        f"no user key {name!r} in the user or session keyring",
        f"add it first, e.g. keyctl padd user {name} @u < image.key",
    )


KEY_SOURCES = "--key-file, --key-command, --keyring"


@dataclass(frozen=True)
class KeySource:
    """A key as the user named it: a file ('-': standard input), a command, a keyring name."""

    file: str | None = None
    command: str | None = None
    keyring: str | None = None

    def count(self) -> int:
        """How many of the three were given (one is right)."""
        return sum(x is not None for x in (self.file, self.command, self.keyring))

    def read(self) -> Secret:
        return read_one(self.file, self.command, self.keyring)


def stdin_once(source: KeySource, *passphrases: bool) -> None:
    """UsageError when the key and a passphrase both want standard input."""
    if source.file == "-" and any(passphrases):
        raise UsageError(
            "--key-file - and --passphrase both want standard input", "put the key in a file"
        )


def credential(
    image: Path, source: KeySource, passphrase: bool, identity: str | None
) -> Credential:
    """What opens the image: exactly one key, passphrase or identity."""
    from cryptlayer.keys.recipients import load_identity

    if source.count() + (identity is not None) + passphrase != 1:
        raise UsageError(
            f"give exactly one of {KEY_SOURCES}, --passphrase and --identity",
            "e.g. --key-file image.key, or --key-file - to read standard input",
        )
    stdin_once(source, passphrase)
    if identity is not None:
        return Credential(identity=load_identity(identity))
    if passphrase:
        return Credential(passphrase=read_passphrase(f"Passphrase for {image}: ", confirm=False))
    return Credential(key=source.read())


def read_one(key_file: str | None, key_command: str | None, keyring: str | None) -> Secret:
    """The key from the one source given (callers check that exactly one is)."""
    if key_file is not None:
        return read_key(key_file)
    if key_command is not None:
        return read_key_command(key_command)
    assert keyring is not None
    return read_keyring(keyring)


def _read_line(fd: int) -> bytearray:
    """One line from `fd`, byte by byte (nothing read past it), without the newline."""
    line = bytearray()
    while len(line) <= MAX_KEY_BYTES:
        byte = os.read(fd, 1)
        if not byte or byte == b"\n":
            break
        line += byte
    return line


def _prompt(fd: int, prompt: str) -> bytearray:
    """Ask on the terminal `fd` with echo off, as cryptsetup and ssh do."""
    import termios

    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    sys.stderr.write(prompt)
    sys.stderr.flush()
    termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
    try:
        return _read_line(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
        sys.stderr.write("\n")


def read_passphrase(prompt: str, *, confirm: bool) -> Secret:
    """A passphrase typed at the terminal without echo (twice when `confirm`), or, when standard
    input is not a terminal, its first line (as cryptsetup reads one from a pipe)."""
    stdin, fd = _stdin()
    if fd < 0:
        raw = stdin.readline(MAX_KEY_BYTES + 1)
        line = bytearray(raw.encode() if isinstance(raw, str) else raw)
        if line.endswith(b"\n"):
            del line[-1:]
        return _checked_passphrase(line)
    if not os.isatty(fd):
        return _checked_passphrase(_read_line(fd))
    first = _checked_passphrase(_prompt(fd, prompt))
    if confirm:
        again = Secret(_prompt(fd, "Verify passphrase: "))
        with again, again.view() as b, first.view() as a:
            same = a == b
        if not same:
            first.wipe()
            raise UsageError("the passphrases do not match", "try again")
    return first


class NoPassphraseError(UsageError):
    """No passphrase came: an empty line, or standard input at its end."""


def stdin_is_terminal() -> bool:
    """Whether a passphrase would be asked for on a terminal (not read from a pipe)."""
    fd = _stdin()[1]
    return fd >= 0 and os.isatty(fd)


def _checked_passphrase(data: bytearray) -> Secret:
    if not data:
        raise NoPassphraseError("the passphrase is empty", "type one, or use --key-file")
    if len(data) > MAX_KEY_BYTES:
        data[:] = bytes(len(data))
        raise UsageError(f"the passphrase is longer than {MAX_KEY_BYTES} bytes")
    return Secret(data)


@dataclass
class Credential:
    """What the user gave to open an image: one key, passphrase or identity. Wiped on exit."""

    key: Secret | None = None
    passphrase: Secret | None = None
    identity: Identity | ProviderIdentity | None = None

    def wipe(self) -> None:
        for secret in (self.key, self.passphrase):
            if secret is not None:
                secret.wipe()

    def __enter__(self) -> Credential:
        return self

    def __exit__(self, *_: object) -> None:
        self.wipe()
