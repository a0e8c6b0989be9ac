"""The one place cryptlayer runs external programs (built on `sh`).

Argv is always a list; `+ argv` is logged under --debug; children get a minimal environment and
an empty stdin unless a secret is handed over on a pipe; failures raise CommandError with stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from cryptlayer.errors import CommandError, MissingToolError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cryptlayer.secret import Secret

log = logging.getLogger("cryptlayer.run")

TPM2_TOOLS: tuple[str, ...] = ("createprimary", "create", "load", "readpublic")
TPM2_TOOLS += ("startauthsession", "policypcr", "rsadecrypt", "flushcontext")

# Which Debian package brings each program, for the "not found: install X" message.
PACKAGES = {
    "cryptsetup": "cryptsetup-bin",
    "veritysetup": "cryptsetup-bin",
    "mkfs.ext4": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "cp": "coreutils",
    "crun": "crun",
    "runc": "runc",
    "modprobe": "kmod",
    "zstd": "zstd",
    "fuser": "psmisc",
    "keyctl": "keyutils",
    "udevadm": "udev",
    "podman": "podman",
    "docker": "docker.io",
    "ctr": "containerd",
    **{f"tpm2_{tool}": "tpm2-tools" for tool in TPM2_TOOLS},
}

# Children see only this: no inherited variables, so nothing of ours (or the user's shell)
# leaks into a tool, and tools behave the same everywhere.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


# Accept every status (signals are negative): callers decide what a failure is.
ANY_EXIT = list(range(-64, 256))


@dataclass(frozen=True)
class Result:
    """What a finished command returned."""

    returncode: int
    stdout: str
    stderr: str


def have(program: str) -> bool:
    """Whether `program` is installed (where the runner looks)."""
    return shutil.which(program, path=BASE_ENV["PATH"]) is not None


def which(program: str) -> str:
    """Full path of `program`, or MissingToolError naming the package to install."""
    path = shutil.which(program, path=BASE_ENV["PATH"])
    if path is None:
        package = PACKAGES.get(program, program)
        raise MissingToolError(
            f"{program} not found", f"install it (apt-get install {package}) and try again"
        )
    return path


@contextmanager
def _stdin_pipe(secret: Secret | None) -> Iterator[int | None]:
    """A pipe read end holding `secret`, so it reaches the child without a bytes copy or argv."""
    if secret is None:
        yield None
        return
    read_fd, write_fd = os.pipe()
    try:
        with secret.view() as data:
            os.write(write_fd, data)  # keys are tiny; a pipe holds 64 KiB
        os.close(write_fd)
        write_fd = -1
        yield read_fd
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)


def _spawn(argv: Sequence[str], *, note: str = "", **options: Any) -> Any:
    """The one place a program starts (through `sh`): found on the runner's PATH (or
    MissingToolError), logged under --debug, with the base environment unless `_env` is given,
    every exit status accepted (callers decide what a failure is)."""
    import sh

    argv = list(argv)
    command = sh.Command(which(argv[0]))
    log.debug("+ %s%s", shlex.join(argv), note)
    options.setdefault("_env", BASE_ENV)
    return command(*argv[1:], _ok_code=ANY_EXIT, **options)


def run(
    argv: Sequence[str],
    *,
    secret: Secret | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run argv to completion, capturing output; stdin is `secret` or empty."""
    argv = list(argv)
    with _stdin_pipe(secret) as stdin_fd:
        # sh dups an int fd straight into the child: the key never becomes a Python bytes object.
        stdin: Any = stdin_fd if stdin_fd is not None else b""
        proc: Any = _spawn(
            argv,
            note=" <secret on stdin>" if secret else "",
            _in=stdin,
            _env={**BASE_ENV, **(env or {})},
            _tty_out=False,  # the output is captured: through a pipe, not sh's default pty
            _return_cmd=True,
            _decode_errors="replace",
        )
    stdout = proc.stdout.decode(errors="replace")
    stderr = proc.stderr.decode(errors="replace")
    for line in stderr.splitlines():
        log.debug("  %s: %s", argv[0], line)
    result = Result(proc.exit_code, stdout, stderr)
    if check and result.returncode != 0:
        raise CommandError(argv, result.returncode, stderr)
    return result


@dataclass(frozen=True)
class Attached:
    """A program running in the background with our stdout and stderr (run_attached)."""

    pid: int
    _proc: Any

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; whether it has ended."""
        import sh

        try:
            self._proc.wait(timeout=timeout)
        except sh.TimeoutException:
            return False
        return True

    @property
    def status(self) -> int:
        """Its exit status once ended, as a shell shows it (128 + N when killed by signal N)."""
        code = int(self._proc.exit_code)
        return 128 - code if code < 0 else code


def run_attached(
    argv: Sequence[str], *, stdin: IO[bytes] | None, env: Mapping[str, str] | None = None
) -> Attached:
    """Start argv with our stdout/stderr (and optionally stdin), in the background."""
    proc: Any = _spawn(
        argv,
        _in=stdin if stdin is not None else b"",
        _out=_binary(sys.stdout),
        _err=_binary(sys.stderr),
        _env={**BASE_ENV, **(env or {})},
        _bg=True,
        _bg_exc=False,
        _new_session=False,
    )
    return Attached(proc.pid, proc)


def _binary(stream: IO[str]) -> Any:
    """The byte stream behind a text stream, so child output passes through unchanged."""
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None else stream


@contextmanager
def filtered(argv: Sequence[str], source: IO[bytes]) -> Iterator[IO[bytes]]:
    """Run argv as a filter fed from `source`; yields its standard output as a stream."""
    argv = list(argv)
    read_fd, write_fd = os.pipe()
    try:
        proc: Any = _spawn(
            argv,
            _in=iter(lambda: source.read(1 << 20), b""),
            _out=write_fd,
            _bg=True,
            _bg_exc=False,
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as stream:
        yield stream
        stopped_early = stream.read(1) != b""
    # Our end is closed now: a filter we stopped reading from ends on EPIPE, which is no error.
    proc.wait()
    if proc.exit_code != 0 and not stopped_early:
        raise CommandError(argv, proc.exit_code, proc.stderr.decode(errors="replace"))


def run_for_secret(
    argv: Sequence[str], limit: int, *, env: Mapping[str, str] | None = None
) -> bytearray:
    """Run argv and take (at most `limit` bytes of) its stdout into a bytearray, never str/bytes.

    Its stdout is a pipe read straight into a bytearray; nothing of it is logged.
    """
    argv = list(argv)
    read_fd, write_fd = os.pipe()
    try:
        proc: Any = _spawn(argv, note="  (output is a secret)", _in=b"", _out=write_fd, _bg=True,
                           _bg_exc=False, _env={**BASE_ENV, **(env or {})})  # fmt: skip
    finally:
        os.close(write_fd)
    buf = bytearray(limit)
    n = 0
    try:
        with memoryview(buf) as mv:
            while n < limit and (got := os.readv(read_fd, [mv[n:]])):
                n += got
    finally:
        os.close(read_fd)  # a program printing more than `limit` gets EPIPE
    proc.wait()
    if proc.exit_code != 0:
        buf[:] = bytes(limit)
        raise CommandError(argv, proc.exit_code, proc.stderr.decode(errors="replace"))
    del buf[n:]
    return buf
