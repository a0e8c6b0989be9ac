"""The error tree: every failure cryptlayer reports, each mapped to one exit code."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in README.md (Exit codes). `run` exits with its container's
    status, and with RUN_FAILED, CANNOT_INVOKE or NOT_FOUND for its own failures (as podman)."""

    OK = 0
    FAILURE = 1  # a tool or the kernel failed at run time
    USAGE = 2  # bad input: arguments, files, names (also typer's own usage errors)
    NOT_ROOT = 3
    MISSING_TOOL = 4  # a program or a kernel feature is missing
    KEY = 5  # wrong key, or no key that opens the image
    ERASED = 6  # the image was crypto-erased
    BUSY = 7  # a name in use, or a device still held open
    TAMPERED = 8  # the image is not what its key holder or signer made (or cannot be checked)
    RUN_FAILED = 125  # `run` only: cryptlayer failed (any of 1-8 above; the error line says which)
    CANNOT_INVOKE = 126  # `run` only: the container's command is not executable
    NOT_FOUND = 127  # `run` only: the container's command is not in the image
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it
    READER_GONE = 141  # our output's reader closed it early (128 + SIGPIPE), as `| head` does


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes, newlines, NUL...) shown as escapes:
    names and strings from an image must not forge or hide lines of our output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class CryptlayerError(Exception):
    """Base of every error cryptlayer reports as one `error:` line."""

    exit_code = ExitCode.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class UsageError(CryptlayerError):
    """Bad input: a missing or malformed file, argument or name."""

    exit_code = ExitCode.USAGE


class DamagedImageError(UsageError):
    """A file of an image is not as build wrote it: unreadable, malformed, cut short or grown, or
    missing beside the manifest that lists it. Bad input to a command that uses the image; to
    `verify` and `inspect`, which check a copy, damage to the copy (TamperedImageError, exit 8)."""


class UntrustedFileError(UsageError):
    """A file that is not what it must be: not a regular file, a symlink, too large. Bad input
    (exit 2); the modules that read an image's files turn it into their own error, naming it."""


class NotRegularError(UntrustedFileError):
    """A name that is a device, FIFO, socket or directory where a regular file must be."""

    def __init__(self, what: str, kind: str) -> None:
        super().__init__(f"{what} is not a regular file ({kind})")
        self.kind = kind


class NotRootError(CryptlayerError):
    exit_code = ExitCode.NOT_ROOT


class MissingToolError(CryptlayerError):
    """A program or kernel feature cryptlayer needs is not there."""

    exit_code = ExitCode.MISSING_TOOL


class WrongKeyError(CryptlayerError):
    exit_code = ExitCode.KEY


class ErasedImageError(CryptlayerError):
    exit_code = ExitCode.ERASED


class TamperedImageError(CryptlayerError):
    """The image was changed by someone without its key, or carries no proof that it was not."""

    exit_code = ExitCode.TAMPERED


class BusyError(CryptlayerError):
    exit_code = ExitCode.BUSY


class CannotInvokeError(CryptlayerError):
    """`run`: the container's command is in the image but cannot be executed."""

    exit_code = ExitCode.CANNOT_INVOKE


class CommandNotFoundError(CryptlayerError):
    """`run`: the container's command is not in the image."""

    exit_code = ExitCode.NOT_FOUND


class CommandError(CryptlayerError):
    """An external command failed; carries its argv and stderr."""

    exit_code = ExitCode.FAILURE

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        last = self.stderr.splitlines()[-1] if self.stderr else "no output"
        super().__init__(f"{argv[0]} failed with exit status {returncode}: {last}")
