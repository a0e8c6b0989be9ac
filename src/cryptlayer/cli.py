"""The command line: parse, call one function of the core, render. Heavy modules load lazily."""

import dataclasses
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core
from typer._click.core import Context
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperCommand, TyperGroup

from cryptlayer.errors import CryptlayerError, ExitCode, UsageError, printable
from cryptlayer.image import DEFAULT_ITER_TIME_MS
from cryptlayer.runtime import DEFAULT_SCRATCH, DEFAULT_STOP_TIMEOUT

if TYPE_CHECKING:
    from cryptlayer.keys.node import NodeKeys
    from cryptlayer.keys.sources import Credential
    from cryptlayer.runtime.container import StartOptions
    from cryptlayer.runtime.lazy import LazyLayers


def _command_path(ctx: Context | None) -> str:
    """`cryptlayer SUBCOMMAND` as a user types it (whatever argv[0] or the test runner says)."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["cryptlayer", *reversed(names)])


def usage_error_line(err: ClickUsageError) -> str:
    """click's usage error as the one `error:` line the README promises, with where to look."""
    text = err.format_message().strip().rstrip(".")
    if text[:1].isupper() and not text[1:2].isupper():
        text = text[:1].lower() + text[1:]
    return f"error: {printable(text)}: see `{_command_path(err.ctx)} --help`"


class _Group(TyperGroup):
    """The command group, with click's usage errors as one `error:` line (not its three-line
    Usage/Try/Error box) and exit 2, and cryptlayer's own errors mapped by `_handled`."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        global _command
        _command = _subcommand(list(sys.argv[1:] if args is None else args))
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as err:
            err.show()
            sys.exit(err.exit_code)
        except ClickUsageError as err:
            typer.echo(usage_error_line(err), err=True)
            sys.exit(_own_status(ExitCode.USAGE))
        except ClickException as err:
            typer.echo(f"error: {printable(err.format_message())}", err=True)
            sys.exit(_own_status(err.exit_code))
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(_own_status(ExitCode.FAILURE))
        sys.exit(status if isinstance(status, int) else 0)

    def invoke(self, ctx: Context) -> Any:
        """The one error handler: every command (and the options before it) runs in it."""
        return _handled(lambda: super(_Group, self).invoke(ctx))


class _Command(TyperCommand):
    """A subcommand whose usage line reads `IMAGE`, not typer's `{IMAGE}`."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as err:
            err.ctx = err.ctx or ctx  # the parser's own errors carry none: say which command
            raise

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def _go_bool(value: str) -> str:
    """--tls-verify=VALUE as skopeo and podman parse it (Go's strconv.ParseBool)."""
    if value not in _TRUE + _FALSE:
        raise typer.BadParameter(f"{value!r} is not true or false", param_hint="--tls-verify")
    return "true" if value in _TRUE else "false"


class _GoFlags(_Command):
    """Boolean options as skopeo and podman take them (Go's pflag): a bare `--tls-verify` is
    true, `--tls-verify=false` sets it (click flags take no value); `--no-tls-verify` kept, and
    `--tls-verify false` (as --help shows it; any of ParseBool's words) read as =false."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Declared (hidden, never set: parse_args spells it --tls-verify=false) so that whatever
        # looks at the command's options finds it.
        old = typer.core.TyperOption
        self.params.append(old(param_decls=["--no-tls-verify"], is_flag=True, hidden=True,
                               expose_value=False))  # fmt: skip

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        valued = self._valued()
        if not ctx.allow_interspersed_args:  # `run IMAGE COMMAND...`: the command's are its own
            i = 0
            while i < end and args[i].startswith("-") and args[i] != "-":
                bare = args[i] == "--tls-verify" and i + 1 < end and args[i + 1] in _TRUE + _FALSE
                i += 2 if args[i] in valued or bare else 1
            end = min(end, i)
        out: list[str] = []
        i = 0
        while i < end:
            arg = args[i]
            if arg in valued:  # its value is the user's, whatever it looks like
                out += args[i : i + 2]
                i += 2
                continue
            if arg == "--no-tls-verify":
                arg = "--tls-verify=false"
            elif arg == "--tls-verify":
                value = args[i + 1] if i + 1 < end and args[i + 1] in _TRUE + _FALSE else ""
                i += bool(value)
                arg = f"--tls-verify={value or 'true'}"
            out.append(arg)
            i += 1
        return list(super().parse_args(ctx, out + args[end:]))

    def _valued(self) -> set[str]:
        """The options that take their value as the next argument."""
        return {opt for p in self.params if isinstance(p, typer.core.TyperOption)
                and not p.is_flag and not p.count and p.name != "tls_verify"
                for opt in p.opts}  # fmt: skip


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Run containers straight from LUKS2-encrypted layer images; no plaintext lands on disk.",
)
_debug = False

KeyFile = Annotated[
    str | None,
    typer.Option(
        "--key-file", "-k", metavar="PATH", help="File holding the key; '-' reads standard input."
    ),
]
KeyCommand = Annotated[
    str | None,
    typer.Option(
        metavar="CMD", help="Program whose standard output is the key (Vault, a KMS, a keyscript)."
    ),
]
Keyring = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="Name of a user key in the kernel keyring (keyctl)."),
]
Passphrase = Annotated[
    bool, typer.Option("--passphrase", help="Ask for a passphrase (no echo; a pipe gives a line).")
]
IdentityOpt = Annotated[
    str | None,
    typer.Option(
        "--identity",
        metavar="PRIVATE_KEY",
        help="Private key of a recipient (keygen --x25519/--rsa), tpm2:FILE, a pkcs11: URI, or"
        " provider:NAME[:PARAMS] (an ocicrypt key provider; docs/keys.md).",
    ),
]
IterTime = Annotated[
    int,
    typer.Option(
        min=1,
        metavar="MS",
        help="Milliseconds a new passphrase's Argon2id should take (cryptsetup's).",
    ),
]
ImageArg = Annotated[
    Path, typer.Argument(metavar="IMAGE", help="Image directory (the --output of build).")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ScratchSize = Annotated[str, typer.Option(help="Size of the writable layer (sparse).")]
KeepFlag = Annotated[
    bool, typer.Option("--keep", help="Do not shred the image when the container stops.")
]


# Warnings wait here until the command hands the terminal over (run's container) or ends, and
# go out before any error line: a refusal's cause is always the last line a user or script sees.
_pending_warnings: list[str] = []


def warn(kind: str, text: str) -> None:
    """A `warning: TEXT [KIND]` line, unless the host's config.toml silences KIND."""
    from cryptlayer.config import WARNINGS, quiet_warnings

    assert kind in WARNINGS, kind
    if kind not in quiet_warnings():
        _pending_warnings.append(f"warning: {printable(text)} [{kind}]")


def flush_warnings() -> None:
    """Print the warnings held so far."""
    for line in _pending_warnings:
        typer.echo(line, err=True)
    _pending_warnings.clear()


def _fail(message: str, code: int) -> typer.Exit:
    flush_warnings()
    typer.echo(f"error: {printable(message)}", err=True)
    return typer.Exit(code)


# The subcommand being run (`run`'s own failures have statuses of their own), set by main.
_command: str | None = None


def _subcommand(args: list[str]) -> str | None:
    """The subcommand `args` name: the first word not an option (the group's are all flags)."""
    return next((a for a in args if not a.startswith("-")), None)


def _own_status(code: int) -> int:
    """The exit status of cryptlayer's own failure `code`: as it is, except in `run`, which exits
    with its container's status and so, as podman, with 125 for its own failures (126 when the
    container's command cannot be run, 127 when it is not there): a script tells "the image was
    tampered with" from "the job exited 8". Ctrl-C and a closed reader keep their signal's."""
    kept = (ExitCode.CANNOT_INVOKE, ExitCode.NOT_FOUND, ExitCode.INTERRUPTED, ExitCode.READER_GONE)
    return code if _command != "run" or code in kept else ExitCode.RUN_FAILED


def _handled(call: Callable[[], Any]) -> Any:
    """`call()`, with CryptlayerError as one `error:` line and its exit code (warnings first);
    tracebacks only with --debug."""
    try:
        result = call()
        flush_warnings()
        return result
    except CryptlayerError as err:
        if _debug:
            traceback.print_exc()
        raise _fail(str(err), _own_status(err.exit_code)) from err
    except KeyboardInterrupt:
        raise _fail("interrupted", ExitCode.INTERRUPTED) from None
    except BrokenPipeError as err:
        if not _reader_gone():
            raise _fail(f"{err.strerror or err}", _own_status(ExitCode.FAILURE)) from err
        raise typer.Exit(ExitCode.READER_GONE) from None
    except OSError as err:
        if _debug:
            traceback.print_exc()
        where = f" ({err.filename})" if err.filename else ""
        raise _fail(f"{err.strerror or err}{where}", _own_status(ExitCode.FAILURE)) from err
    except (typer.Exit, typer.Abort, ClickException):
        flush_warnings()  # before click's own line (run's exit status, a usage error)
        raise
    except Exception as err:  # the last line of defence: still one line, no traceback
        if _debug:
            traceback.print_exc()
        raise _fail(
            f"unexpected {type(err).__name__}: {err}: run again with --debug for the"
            " traceback, and report it",
            _own_status(ExitCode.FAILURE),
        ) from err


def _reader_gone() -> bool:
    """Whether our standard output is a pipe its reader closed (`cryptlayer ps | head -1`): not
    an error, as for any tool; then nothing more goes to it. A broken pipe to a program we run
    is an error all the same."""
    import os
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, 0)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # (no descriptor: under a test's runner)
        return False
    if gone:  # so that the interpreter's last flush at exit has nowhere to fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def _show_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version

        typer.echo(f"cryptlayer {version('cryptlayer')}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[
        bool, typer.Option("--debug", help="Log every command run; show tracebacks.")
    ] = False,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_show_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    global _debug
    _debug = debug
    if debug:
        # Only our loggers: sh's own debug logging is very chatty and can echo argv internals.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log = logging.getLogger("cryptlayer")
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)


def _credential(
    image: Path,
    key_file: str | None,
    key_command: str | None,
    keyring: str | None,
    passphrase: bool,
    identity: str | None,
) -> "Credential":
    """What opens the image (keys.credential checks that exactly one was given)."""
    from cryptlayer.keys.sources import KeySource, credential

    return credential(image, KeySource(key_file, key_command, keyring), passphrase, identity)


def _key_or_node(
    image: Path,
    key_file: str | None,
    key_command: str | None,
    keyring: str | None,
    passphrase: bool,
    identity: str | None,
) -> "Credential | NodeKeys":
    """run/start: the key given, else the node's `[[keys]]` for the image (chosen once it is
    open and checked); neither: the options' error, as before the config had keys."""
    from cryptlayer.config import image_keys
    from cryptlayer.keys.node import NodeKeys

    given = (key_file, key_command, keyring, identity)
    if passphrase or any(g is not None for g in given) or not image_keys():
        return _credential(image, key_file, key_command, keyring, passphrase, identity)
    return NodeKeys(otherwise=", or give --key-file (or --key-command, --keyring, --passphrase,"
                    " --identity)")  # fmt: skip


AllowSharedDir = Annotated[
    bool,
    typer.Option(
        "--allow-shared-dir",
        help="Use an image directory that users other than root may write (unsafe: they can"
        " swap its files while root works on them).",
    ),
]
Digest = Annotated[
    str | None,
    typer.Option(
        metavar="sha256:HEX",
        help="Refuse any image but this one (its digest from `inspect`): pins against an older"
        " or another image.",
    ),
]
Trust = Annotated[
    Path | None,
    typer.Option(
        metavar="ALLOWED_SIGNERS",
        help="Refuse any image that no key of this file (OpenSSH allowed_signers) signed;"
        " default: trust in /etc/cryptlayer/config.toml.",
    ),
]
SignKey = Annotated[
    Path | None,
    typer.Option(metavar="PRIVATE_KEY", help="Sign the image with this SSH key (Ed25519 or RSA)."),
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Refuse to start where decrypted memory could reach the disk (unencrypted swap,"
        " zram writeback, core dumps to files, hibernation); without it, a warning.",
    ),
]


def _check_host(strict: bool) -> None:
    """Warn (or with --strict refuse) where this host may write decrypted memory to disk."""
    from cryptlayer.runtime.hostcheck import problems

    found = problems()
    if found and strict:
        raise UsageError(
            f"this host may write decrypted memory to disk: {'; '.join(map(str, found))}",
            "encrypt swap (or swapoff), pipe core dumps to a handler that drops them, or leave"
            " out --strict (docs/threat-model.md)",
        )
    for problem in found:
        warn(problem.kind, f"{problem}: decrypted memory may reach the disk")


def _warn_if_erase_may_not_hold(image: Path, lazy: bool = False) -> None:
    """A `warning:` line when the image's storage may keep old copies of erased keyslots: for a
    lazy start's image, the block cache's (the header chunks it dropped; docs/lazy.md)."""
    from cryptlayer.paths import block_cache_dir
    from cryptlayer.runtime.hostcheck import erase_caveat

    where = block_cache_dir() if lazy else image
    if where.is_dir() and (caveat := erase_caveat(where)):
        warn("erase-storage", caveat)


RunImage = Annotated[
    str,
    typer.Argument(
        metavar="IMAGE",
        help="Image directory, or docker://HOST/REPO[:TAG|@DIGEST]: started before its layers"
        " are downloaded, read block by block from the registry (docs/lazy.md).",
    ),
]


@contextmanager
def _image_for_start(
    image: str, digest: str | None, trust: Path | None, tls_verify: str, cert_dir: Path | None,
    authfile: Path | None, creds: str | None, password_stdin: bool, erase: bool,
) -> "Iterator[tuple[Path, LazyLayers | None]]":  # fmt: skip
    """run/start's image: a directory, or (docker://) one fetched for a lazy start into a
    private directory in /run (removed again unless an opening of its layers holds it); with
    `erase`, its headers are kept off the node's disk (docs/lazy.md). Errors name the
    reference, not that directory."""
    if not image.startswith("docker://"):
        yield Path(image), None
        return
    import shutil

    from cryptlayer.distribution import lazy
    from cryptlayer.runtime import state
    from cryptlayer.runtime.journal import crash_point
    from cryptlayer.runtime.lazy import LazyLayers, work_dir

    auth = _registry_auth(creds, password_stdin, authfile, image)
    login = auth.get("login")
    remote = lazy.Remote(image, tls_verify == "true", str(cert_dir) if cert_dir else None,
                         str(authfile) if authfile else None, login)  # fmt: skip
    with work_dir() as work:  # locked while we live: gc removes it only after we die unjournaled
        target = work / "image"
        fetched = None
        try:
            fetched = lazy.fetch_for_start(remote, target, digest=digest, trust=trust,
                                           erase=erase, warm=True)  # fmt: skip
            crash_point()  # fetched, not yet named by an opening (tests/vm/test_lazy_gc.py)
            yield target, LazyLayers(work, fetched.blobs, fetched.command, fetched.config, image,
                                     fetched.handoff, fetched.discard)  # fmt: skip
        except CryptlayerError as err:  # the copy in /run is shown as what it was fetched from
            err.message = err.message.replace(str(target), image)
            err.hint = err.hint.replace(str(target), image) if err.hint else err.hint
            raise
        finally:
            if fetched is not None and fetched.discard is not None:
                fetched.discard()  # a warm server never handed its sockets (a failed start)
            if state.load_opening(str(target)) is None:  # a failure, or `run`'s teardown is done
                shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _start_inputs(
    image: str, options: "StartOptions", keys: tuple[str | None, str | None, str | None, bool,
                                                     str | None],
    registry: tuple[str, Path | None, Path | None, str | None, bool], strict: bool,
) -> "Iterator[tuple[Path, StartOptions, Credential | NodeKeys]]":  # fmt: skip
    """What run and start assemble from: the image (fetched, for docker://), the options with its
    lazy layers, the key (the options', or the node's [[keys]]), the erase warning and the host's
    checks, in that order."""
    tls_verify, cert_dir, authfile, creds, password_stdin = registry
    with _image_for_start(image, options.digest, options.trust, tls_verify, cert_dir, authfile,
                          creds, password_stdin, options.shred) as (path, lazy_layers):  # fmt: skip
        if options.shred:
            _warn_if_erase_may_not_hold(path, lazy_layers is not None)
        options = dataclasses.replace(options, lazy=lazy_layers)
        with _key_or_node(path, *keys) as credential:
            _check_host(strict)
            yield path, options, credential


def _own_name(name: str) -> str:
    """`name` checked, and not cryptlayer-runtime's `engine-ID` (engine/cli.py NAME_PREFIX): the
    engine's delete of its container ID would tear this one down and shred its image."""
    from cryptlayer.runtime import state

    state.check_name(name)
    if name.startswith("engine-"):
        raise UsageError(
            f"the name {name} is cryptlayer-runtime's (for the engine's container"
            f" {name.removeprefix('engine-')})",
            "choose a name that does not begin with engine-",
        )
    return name


def _digest(digest: str | None) -> str | None:
    from cryptlayer.image.statement import check_digest

    return None if digest is None else check_digest(digest)


def _trust(given: Path | None) -> Path | None:
    from cryptlayer.config import trust

    return trust(given)


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size_text(size: int) -> str:
    """`size` bytes as _size reads it back, in the largest unit that divides it (1 << 30: 1G)."""
    unit = next(u for u in reversed(SIZE_UNITS) if size % SIZE_UNITS[u] == 0)
    return f"{size // SIZE_UNITS[unit]}{unit}"


def _size(text: str) -> int:
    number, unit = text.rstrip("iBb"), ""
    if number and number[-1].upper() in SIZE_UNITS:
        number, unit = number[:-1], number[-1].upper()
    if not number.isdigit() or int(number) == 0:
        raise typer.BadParameter(f"{text!r} is not a size like 512M or 2G")
    return int(number) * SIZE_UNITS[unit]


SCRATCH = _size_text(DEFAULT_SCRATCH)  # run and start: the runtime's default, as --help shows it


@app.command()
def keygen(
    keyfile: Annotated[Path, typer.Argument(metavar="KEYFILE", help="Where to write the new key.")],
    x25519: Annotated[
        bool, typer.Option("--x25519", help="An X25519 key pair: KEYFILE and KEYFILE.pub.")
    ] = False,
    rsa: Annotated[
        bool, typer.Option("--rsa", help="An RSA-3072 key pair: KEYFILE and KEYFILE.pub.")
    ] = False,
    tpm2: Annotated[
        bool,
        typer.Option("--tpm2", help="An RSA key made in the TPM: KEYFILE (its blobs) and .pub."),
    ] = False,
    pcrs: Annotated[
        str | None,
        typer.Option(metavar="BANK:N,...", help="With --tpm2: usable only while these PCRs hold."),
    ] = None,
) -> None:
    """Write a new random 32-byte key, or a recipient key pair (mode 0600); never overwrites."""
    if x25519 + rsa + tpm2 > 1:
        raise UsageError("give one of --x25519, --rsa and --tpm2")
    if pcrs is not None and not tpm2:
        raise UsageError("--pcrs binds a TPM key: give it with --tpm2")
    if tpm2:
        from cryptlayer.keys import tpm2 as tpm

        ident = tpm.create(keyfile, tpm.parse_pcrs(pcrs) if pcrs is not None else None)
        typer.echo(
            f"wrote {keyfile} (the TPM's key blobs; use it as --identity tpm2:{keyfile}) and"
            f" {keyfile}.pub (for build --recipient): {ident}",
            err=True,
        )
        return
    if x25519 or rsa:
        from cryptlayer.keys.recipients import KeyKind, write_key_pair

        kind = KeyKind.X25519 if x25519 else KeyKind.RSA
        ident = write_key_pair(keyfile, kind)
        typer.echo(
            f"wrote {keyfile} (private, mode 0600; keep it on the machine that runs the"
            f" image) and {keyfile}.pub (for build --recipient): {ident}",
            err=True,
        )
        return
    from cryptlayer.keys.sources import write_new_key

    write_new_key(keyfile)
    typer.echo(f"wrote a new key to {keyfile} (mode 0600); keep it secret", err=True)


@app.command()
def build(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Directories, layer tars, or oci:PATH[:TAG], oci-archive:PATH[:TAG], "
            "docker-archive:PATH; bottom layer first."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image directory to create.")],
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
    keyring: Keyring = None,
    passphrase: Passphrase = False,
    recipient: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PUBLIC_KEY",
            help="Public key (PEM, or ssh-rsa) that may open the image, or"
            " provider:NAME[:PARAMS] (an ocicrypt key provider); repeatable.",
        ),
    ] = None,
    iter_time: IterTime = DEFAULT_ITER_TIME_MS,
    squash: Annotated[
        bool, typer.Option(help="Merge all layers into one (fewer devices).")
    ] = False,
    cmd: Annotated[
        str | None, typer.Option(help="Default command, e.g. '/bin/sh -c \"echo hi\"'.")
    ] = None,
    entrypoint: Annotated[
        str | None, typer.Option(help="Entrypoint, split like a shell would.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")
    ] = None,
    workdir: Annotated[
        str | None, typer.Option("--workdir", "-w", help="Working directory.")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Default USER[:GROUP].")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars (none when not a terminal).")
    ] = False,
    sign_key: SignKey = None,
    drop_devices: Annotated[
        bool,
        typer.Option(
            "--drop-devices",
            help="Leave out device nodes outside /dev too (those in /dev always are), each named.",
        ),
    ] = False,
    decryption_key: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PRIVATE_KEY",
            help="Private key (PEM, DER or JWK) of an ocicrypt jwe: key, or"
            " provider:NAME[:PARAMS] (an ocicrypt key provider), for the source's encrypted"
            " layers, as skopeo's option; repeatable (each tried, in order).",
        ),
    ] = None,
) -> None:
    """Build an encrypted image: one LUKS2 layer per layer of each SOURCE."""
    import shlex

    from cryptlayer.build.builder import build_image
    from cryptlayer.image.envelope import principals as principals_of
    from cryptlayer.image.process import Overrides, merge_env
    from cryptlayer.keys.sources import KeySource, stdin_once
    from cryptlayer.progress import for_terminal
    from cryptlayer.tools.system import require_root

    # Only what was given overrides the config an OCI source brings.
    overrides = Overrides(
        command=None if cmd is None else tuple(shlex.split(cmd)),
        env=tuple(merge_env(tuple(env))) if env else (),
        workdir=workdir,
        user=user,
        entrypoint=None if entrypoint is None else tuple(shlex.split(entrypoint)),
    )
    require_root("build an image")
    from cryptlayer.build.ocicrypt import load_keys

    decryption = load_keys(decryption_key or [])
    source = KeySource(key_file, key_command, keyring)
    stdin_once(source, passphrase)
    signer = None
    if sign_key is not None:
        from cryptlayer.image.signatures import load_signing_key

        signer = load_signing_key(sign_key)  # before the build: a wrong passphrase costs nothing
    keys = [source] if source.count() else []
    with principals_of(output, keys, passphrase, recipient or [], iter_time) as principals:
        built = build_image(
            sources, output, principals, squash=squash, overrides=overrides,
            progress=for_terminal(quiet), signer=signer, drop_devices=drop_devices,
            notice=lambda line: typer.echo(printable(line), err=True), decryption=decryption,
        )  # fmt: skip
    for layer in built.layers:
        typer.echo(
            f"{output}/{layer.file}: {layer.size} bytes"
            f" ({layer.content_bytes} of content) from {layer.source}"
        )


OutputFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        metavar="json|TEMPLATE",
        help="json (as --json), or a template of its fields, as podman's: '{{.Digest}}'.",
    ),
]


def _json_or_template(doc: Any, fmt: str | None) -> bool:
    """Print `doc` as --json or --format asked; whether it did (else the command's text)."""
    if fmt is None or fmt == "json":
        if fmt is None:
            return False
        typer.echo(json.dumps(doc, indent=2))  # JSON escapes control characters
        return True
    from cryptlayer.template import render

    typer.echo(render(fmt, doc))
    return True


@app.command(cls=_GoFlags)
def inspect(
    image: Annotated[
        str,
        typer.Argument(
            metavar="IMAGE",
            help="Image directory, or docker://HOST/REPO[:TAG|@DIGEST]: an image in a registry"
            " (its manifest, statement, keys.json and signatures; no layer is fetched).",
        ),
    ],
    as_json: JsonFlag = False,
    output_format: OutputFormat = None,
    tls_verify: "TlsVerify" = "true",
    cert_dir: "CertDir" = None,
) -> None:
    """Show an image's layers, sizes, cipher, keyslot state and config (no key needed)."""
    import shlex

    from cryptlayer.distribution.inspect import inspect_remote
    from cryptlayer.image.inspect import inspect_image

    if image.startswith("docker://"):
        from cryptlayer.distribution.registry import Registry, parse_reference

        registry = Registry(parse_reference(image), tls_verify=tls_verify == "true",
                            cert_dir=cert_dir)  # fmt: skip
        info = inspect_remote(registry)
    else:
        info = inspect_image(Path(image))
    if _json_or_template(info.to_json(), "json" if as_json else output_format):
        return
    p = printable  # every string of the manifest is the image author's: no terminal escapes
    typer.echo(f"image:   {p(info.image)}\ndigest:  {info.digest}")
    if info.manifest_digest:
        typer.echo(f"manifest: {info.manifest_digest} (the registry's manifest of it)")
    typer.echo(f"cipher:  {p(info.cipher)}")
    typer.echo(f"state:   {info.state}\ncreated: {p(info.created)}")
    for signer in info.signatures:
        typer.echo(f"signed:  {p(signer.file)} by {signer.key} ({p(signer.status)})")
    if info.state == "erased":
        typer.echo("opens:   nobody (every keyslot is erased; keys.json lists who once could)")
    for entry in [] if info.state == "erased" else info.access:
        cost = ""
        if entry["type"] == "passphrase":
            cost = (
                f" (argon2id, {entry['iterations']} iterations, {entry['memory_kib'] // 1024} MiB)"
            )
        typer.echo(f"opens:   {p(entry['id'])}{cost}")
    for i, report in enumerate(info.layers):
        layer = report.layer
        where = (
            f"keyslots {report.keyslots} ({report.state})"
            if report.keyslots is not None
            else f"{report.digest or 'no blob'} ({p(report.state)})"
        )
        typer.echo(
            f"layer {i}: {p(layer.file)} {layer.size} bytes, {where}, from {p(layer.source)}"
        )
    cfg = info.config
    typer.echo(f"command: {p(shlex.join([*cfg.entrypoint, *cfg.cmd])) or '(none)'}")
    for item in cfg.env:
        typer.echo(f"env:     {p(item)}")
    typer.echo(f"workdir: {p(cfg.workdir)}\nuser:    {p(cfg.user) or 'root'}")


@app.command()
def rekey(
    image: ImageArg,
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
    keyring: Keyring = None,
    passphrase: Passphrase = False,
    identity: IdentityOpt = None,
    add_key: Annotated[
        list[str] | None,
        typer.Option(metavar="PATH", help="Key file that may open the image; repeatable."),
    ] = None,
    add_passphrase: Annotated[
        bool, typer.Option("--add-passphrase", help="Ask for a new passphrase (twice).")
    ] = False,
    add_recipient: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PUBLIC_KEY",
            help="Public key, or provider:NAME[:PARAMS], that may open the image; repeatable.",
        ),
    ] = None,
    remove: Annotated[
        list[str] | None,
        typer.Option(
            metavar="WHO",
            help="Who may no longer open it: an id from inspect, or a key, public key"
            " or identity file; repeatable.",
        ),
    ] = None,
    iter_time: IterTime = DEFAULT_ITER_TIME_MS,
    allow_shared_dir: AllowSharedDir = False,
) -> None:
    """Change who may open IMAGE (unlock it with any current key); the layers are not touched."""
    from cryptlayer.image.envelope import principals as principals_of
    from cryptlayer.image.rekey import rekey as change_keys
    from cryptlayer.keys.sources import KeySource, stdin_once

    if not (add_key or add_passphrase or add_recipient or remove):
        raise UsageError(
            "nothing to change", "give --add-key, --add-passphrase, --add-recipient or --remove"
        )
    stdin_once(KeySource(key_file), passphrase, add_passphrase)
    if "-" in (add_key or []):
        raise UsageError("--add-key needs a file, not standard input", "cryptlayer keygen NEW.key")
    with (
        _credential(image, key_file, key_command, keyring, passphrase, identity) as credential,
        principals_of(
            image,
            [KeySource(k) for k in add_key or []],
            add_passphrase,
            add_recipient or [],
            iter_time,
        ) as principals,
    ):
        change = change_keys(
            image, credential, principals, remove or [], allow_shared=allow_shared_dir
        )
    for ident in change.added:
        typer.echo(f"added {ident}")
    for ident in change.removed:
        typer.echo(f"removed {ident}")


@app.command(cls=_GoFlags, context_settings={"allow_interspersed_args": False})
def run(
    image: RunImage,
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
    keyring: Keyring = None,
    passphrase: Passphrase = False,
    identity: IdentityOpt = None,
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="[COMMAND [ARG]...]", help="What to run instead of the default."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Container name (default: generated).")] = None,
    keep: KeepFlag = False,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")
    ] = None,
    workdir: Annotated[
        str | None, typer.Option("--workdir", "-w", help="Working directory.")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="USER[:GROUP].")] = None,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="Pass stdin in.")
    ] = False,
    scratch_size: ScratchSize = SCRATCH,
    stop_timeout: Annotated[
        float, typer.Option(help="Seconds after SIGINT/SIGTERM before the container is killed.")
    ] = DEFAULT_STOP_TIMEOUT,
    network: Annotated[
        str,
        typer.Option(
            metavar="none|host",
            help="none: a network namespace of its own with only loopback (default);"
            " host: the host's network.",
        ),
    ] = "none",
    allow_shared_dir: AllowSharedDir = False,
    strict: Strict = False,
    digest: Digest = None,
    trust: Trust = None,
    tls_verify: "TlsVerify" = "true",
    cert_dir: "CertDir" = None,
    authfile: "AuthFile" = None,
    creds: "Creds" = None,
    password_stdin: "PasswordStdin" = False,
) -> None:
    """Run COMMAND (or the image's default) in a container from IMAGE, then tear down and shred."""
    from cryptlayer.image.process import Network, Overrides
    from cryptlayer.runtime import container
    from cryptlayer.tools.system import require_root

    if interactive and (key_file == "-" or (passphrase and not sys.stdin.isatty())):
        raise UsageError(
            "--interactive and the key both want standard input", "put the key in a file"
        )
    if network not in {n.value for n in Network}:
        raise UsageError(f"unknown --network {network!r}", "use none or host")
    lazy = image.startswith("docker://")  # the node's copy is erased, not the registry's
    stem = Path(image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]) if lazy else Path(image)
    options = container.StartOptions(
        _own_name(name) if name else container.default_name(stem),
        not keep,
        _size(scratch_size),
        stop_timeout,
        allow_shared_dir,
        _digest(digest),
        _trust(trust),
    )
    # Everything after IMAGE is the command (as in podman); a `--` before it is optional.
    args = command[1:] if command and command[0] == "--" else (command or [])
    overrides = Overrides(tuple(args), tuple(env or ()), workdir, user, Network(network))
    require_root("start containers")
    with _start_inputs(image, options, (key_file, key_command, keyring, passphrase, identity),
                       (tls_verify, cert_dir, authfile, creds, password_stdin),
                       strict) as (path, options, credential):  # fmt: skip
        flush_warnings()  # before the container's own output
        status = container.run(path, credential, options, overrides, interactive)
    raise typer.Exit(status)


@app.command(cls=_GoFlags)
def start(
    image: RunImage,
    name: Annotated[str, typer.Option(help="Container name, for `stop`.")],
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
    keyring: Keyring = None,
    passphrase: Passphrase = False,
    identity: IdentityOpt = None,
    keep: KeepFlag = False,
    scratch_size: ScratchSize = SCRATCH,
    allow_shared_dir: AllowSharedDir = False,
    strict: Strict = False,
    digest: Digest = None,
    trust: Trust = None,
    tls_verify: "TlsVerify" = "true",
    cert_dir: "CertDir" = None,
    authfile: "AuthFile" = None,
    creds: "Creds" = None,
    password_stdin: "PasswordStdin" = False,
) -> None:
    """Assemble the root file system and print its path (for podman --rootfs, nspawn -D, crun)."""
    from cryptlayer.runtime import container
    from cryptlayer.tools.system import require_root

    options = container.StartOptions(
        _own_name(name),
        not keep,  # of a docker:// image, the node's copy (docs/lazy.md)
        _size(scratch_size),
        allow_shared_dir=allow_shared_dir,
        digest=_digest(digest),
        trust=_trust(trust),
    )
    require_root("start containers")
    with _start_inputs(image, options, (key_file, key_command, keyring, passphrase, identity),
                       (tls_verify, cert_dir, authfile, creds, password_stdin),
                       strict) as (path, options, credential):  # fmt: skip
        record = container.start(path, credential, options)
    typer.echo(record.rootfs)


@app.command()
def sign(
    image: ImageArg,
    sign_key: Annotated[
        Path,
        typer.Option(metavar="PRIVATE_KEY", help="SSH private key (Ed25519 or RSA) to sign with."),
    ],
    name: Annotated[
        str | None,
        typer.Option(help="Signature file name under IMAGE/signatures/ (default: from the key)."),
    ] = None,
    allow_shared_dir: AllowSharedDir = False,
) -> None:
    """Sign IMAGE's statement (manifest.json) as `ssh-keygen -Y sign -n cryptlayer-image` does."""
    from cryptlayer.image import manifest, signatures

    loaded = manifest.load(image)
    key = signatures.load_signing_key(sign_key)
    path = signatures.add(image, loaded.raw, key, name, allow_shared=allow_shared_dir)
    typer.echo(f"signed {loaded.digest}: {path}", err=True)


@app.command()
def verify(image: ImageArg, trust: Trust = None) -> None:
    """Check a copy of IMAGE without its key: signatures, and each layer against the statement."""
    from cryptlayer.image.verify import verify_image

    report = verify_image(image, _trust(trust))
    for warning in report.warnings:
        warn("signature", warning)
    typer.echo(f"image:   {report.digest}")
    for signer in report.signers:
        typer.echo(f"signed:  {printable(signer)}")
    if not report.signers:
        typer.echo("signed:  nobody (no signatures/*.sig)")
    typer.echo(f"layers:  {report.layers}, each as the statement records it")


TlsVerify = Annotated[
    str,
    typer.Option(
        "--tls-verify",
        metavar="true|false",
        callback=_go_bool,
        help="Require HTTPS and a trusted certificate (default); false: HTTPS without checking"
        " the certificate, or plain HTTP where the registry speaks only that (as skopeo).",
    ),
]
AuthFile = Annotated[
    Path | None,
    typer.Option("--authfile", metavar="PATH", help="Read (and login: write) only this auth file."),
]
Creds = Annotated[
    str | None,
    typer.Option(
        "--creds",
        metavar="USER",
        help="Log in as USER for this command (password asked, or --password-stdin).",
    ),
]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


def _password(username: str, registry: str, password_stdin: bool) -> bytes:
    """The password for USER, typed without echo or (--password-stdin) its first line on stdin."""
    from cryptlayer.keys.sources import read_passphrase

    if not password_stdin and not sys.stdin.isatty():
        raise UsageError("no terminal to ask the password on", "pass --password-stdin")
    secret = read_passphrase(f"Password for {username}@{registry}: ", confirm=False)
    with secret, secret.view() as data:
        return bytes(data)


def _registry_auth(
    creds: str | None, password_stdin: bool, authfile: Path | None, where: str
) -> dict[str, Any]:
    """Registry(...)'s auth options from --creds and --authfile."""
    auth: dict[str, Any] = {"authfile": authfile}
    if creds is not None and not where.startswith("oci:"):
        from cryptlayer.distribution.registry import parse_reference

        parse_reference(where)  # before the prompt shows it: it may hold USER:PASS@
    if creds is not None:
        if ":" in creds:
            raise UsageError(
                "--creds takes USER only: a password on the command line is visible to every"
                " user (ps, /proc)",
                "use --creds USER and type the password when asked, or pipe it with"
                " --password-stdin",
            )
        auth["login"] = (creds, _password(creds, where, password_stdin).decode())
    elif password_stdin:
        raise UsageError("--password-stdin needs --creds USER")
    return auth


CertDir = Annotated[
    Path | None,
    typer.Option(metavar="DIR", help="Trust the CA certificates (*.crt) in DIR for the registry."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


@app.command(cls=_GoFlags)
def push(
    image: ImageArg,
    destination: Annotated[
        str,
        typer.Argument(metavar="REF", help="docker://HOST[:PORT]/REPO[:TAG] or oci:PATH[:TAG]."),
    ],
    tls_verify: TlsVerify = "true",
    cert_dir: CertDir = None,
    authfile: AuthFile = None,
    creds: Creds = None,
    password_stdin: PasswordStdin = False,
    quiet: Quiet = False,
    digestfile: Annotated[
        Path | None,
        typer.Option(metavar="PATH", help="Write the manifest digest to PATH (as skopeo does)."),
    ] = None,
) -> None:
    """Push IMAGE (ciphertext, keys.json's wrapped keys, signatures) to a registry or a layout."""
    from cryptlayer.distribution.transfer import open_store, push
    from cryptlayer.fsutil import write_atomic
    from cryptlayer.progress import for_terminal

    auth = _registry_auth(creds, password_stdin, authfile, destination)
    store = open_store(destination, tls_verify=tls_verify == "true", cert_dir=cert_dir, **auth)
    digest, sent = push(image, store, for_terminal(quiet))
    if digestfile is not None:
        try:
            write_atomic(digestfile, digest.encode(), durable=False)
        except OSError as err:
            raise UsageError(f"pushed, but cannot write --digestfile {digestfile}: {err.strerror}",
                             f"the manifest digest is {digest}") from None  # fmt: skip
    typer.echo(
        f"pushed {image} to {destination}: manifest digest {digest} ({sent} blob(s) sent)",
        err=True,
    )


@app.command(cls=_GoFlags)
def pull(
    source: Annotated[
        str,
        typer.Argument(
            metavar="REF", help="docker://HOST[:PORT]/REPO[:TAG|@DIGEST] or oci:PATH[:TAG]."
        ),
    ],
    image: ImageArg,
    digest: Annotated[
        str | None,
        typer.Option(
            metavar="sha256:HEX",
            help="Refuse any image but this one: its image digest, as `inspect` shows it (a"
            " manifest digest is pinned as REF@sha256:HEX).",
        ),
    ] = None,
    trust: Trust = None,
    tls_verify: TlsVerify = "true",
    cert_dir: CertDir = None,
    authfile: AuthFile = None,
    creds: Creds = None,
    password_stdin: PasswordStdin = False,
    quiet: Quiet = False,
) -> None:
    """Pull an image into the new directory IMAGE; an interrupted pull resumes."""
    from cryptlayer.distribution.transfer import open_store, pull
    from cryptlayer.progress import for_terminal

    auth = _registry_auth(creds, password_stdin, authfile, source)
    store = open_store(source, tls_verify=tls_verify == "true", cert_dir=cert_dir, **auth)
    done = pull(store, image, digest=_digest(digest), trust=_trust(trust),
                show=for_terminal(quiet))  # fmt: skip
    said = "pulled" if done.fetched else "already up to date:"
    typer.echo(f"{said} {image} from {source}: image digest {done.image_digest} (manifest"
               f" digest {done.manifest_digest})", err=True)  # fmt: skip


@app.command(cls=_GoFlags)
def login(
    registry: Annotated[str, typer.Argument(metavar="HOST[:PORT]", help="The registry.")],
    username: Annotated[str, typer.Option("--username", "-u", help="User name.")],
    password_stdin: PasswordStdin = False,
    tls_verify: TlsVerify = "true",
    cert_dir: CertDir = None,
    authfile: AuthFile = None,
) -> None:
    """Check credentials with the registry and store them as podman does (never on argv)."""
    from cryptlayer.distribution.auth import save_credentials
    from cryptlayer.distribution.registry import Reference, Registry, registry_host

    host = registry_host(registry)
    password = _password(username, host, password_stdin)
    client = Registry(Reference(host, "cryptlayer-login-check"), tls_verify=tls_verify == "true",
                      cert_dir=cert_dir, login=(username, password.decode()))  # fmt: skip
    client.ping()
    path = save_credentials(host, username, password, authfile)
    typer.echo(f"login succeeded: credentials for {host} in {path}", err=True)


@app.command()
def logout(
    registry: Annotated[str, typer.Argument(metavar="HOST[:PORT]")], authfile: AuthFile = None
) -> None:
    """Remove the stored credentials of a registry."""
    from cryptlayer.distribution.auth import save_credentials
    from cryptlayer.distribution.registry import registry_host

    host = registry_host(registry)
    path = save_credentials(host, "", None, authfile)
    typer.echo(f"removed the credentials for {host} from {path}", err=True)


@app.command()
def stop(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Container name.")],
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Kill processes using the container's files.")
    ] = False,
) -> None:
    """Tear down a started container (and shred its image unless started with --keep)."""
    from cryptlayer.runtime import container, state

    record = container.stop(name, force=force)
    said = f"; image {record.image} shredded" if record.shred else ""
    if users := state.users_of(record.image):
        said += f"; its layers stay open for {', '.join(users)}"
    typer.echo(f"stopped {name}{said}", err=True)


@app.command()
def ps(as_json: JsonFlag = False, output_format: OutputFormat = None) -> None:
    """List the containers that are running or assembled now."""
    from cryptlayer.runtime import state

    rows = [r.describe() for r in state.all_records()]
    fmt = "json" if as_json else output_format
    if fmt == "json":
        typer.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    if fmt is not None:
        from dataclasses import fields

        from cryptlayer.template import render

        render(fmt, {f.name: "" for f in fields(state.Description)})  # wrong even with no rows
        for row in rows:
            _json_or_template(row.to_json(), fmt)
        return
    typer.echo(f"{'NAME':<24} {'STATUS':<10} {'LAYERS':>6}  {'IMAGE'}")
    for row in rows:
        typer.echo(f"{row.name:<24} {row.status:<10} {row.layers:>6}  {row.image}")


@app.command()
def shred(image: ImageArg, allow_shared_dir: AllowSharedDir = False) -> None:
    """Crypto-erase IMAGE: wipe every keyslot of every layer, then verify none is left."""
    from cryptlayer.image.shred import shred_image
    from cryptlayer.tools.system import require_tools

    require_tools("cryptsetup")
    _warn_if_erase_may_not_hold(image)
    count = shred_image(image, allow_shared=allow_shared_dir)
    typer.echo(
        f"shredded {image}: {count} layer(s), no keyslot left; no key can open it now", err=True
    )


@app.command()
def gc() -> None:
    """Remove what crashed runs left behind and complete the erases they owed."""
    from cryptlayer.runtime.gc import collect
    from cryptlayer.tools.system import require_root

    require_root("collect garbage")
    report = collect()
    for name in report.containers:
        typer.echo(f"cleaned up container {name}")
    for image in report.shredded:
        typer.echo(f"shredded {image}")
    for what in report.orphans:
        typer.echo(f"removed orphan {what}")
    if report.errors:
        raise CryptlayerError("gc could not clean up everything: " + "; ".join(report.errors),
                              "fix the cause and run `cryptlayer gc` again")  # fmt: skip
    if not (report.containers or report.orphans or report.shredded):
        typer.echo("nothing to clean up")


@app.command(cls=_GoFlags)
def placeholder(
    engine: Annotated[
        str | None,
        typer.Option(
            metavar="podman|docker|containerd",
            help="Load it into this engine's image store (containerd: k8s.io).",
        ),
    ] = None,
    push: Annotated[
        str | None,
        typer.Option(
            "--push",
            metavar="REF",
            help="Push it to a registry (docker://HOST/REPO[:TAG]) or oci:PATH[:TAG].",
        ),
    ] = None,
    tls_verify: TlsVerify = "true",
    cert_dir: CertDir = None,
    authfile: AuthFile = None,
    creds: Creds = None,
    password_stdin: PasswordStdin = False,
) -> None:
    """Make the small image engines create encrypted-image containers from (docs/engines.md);
    print the reference to give the engine."""
    from cryptlayer.distribution import placeholder as made

    if engine is None and push is None:
        raise UsageError("say where the placeholder goes",
                         "give --engine podman|docker|containerd, --push REF, or both")  # fmt: skip
    if engine is not None:
        typer.echo(made.load(engine))
    if push is not None:
        from cryptlayer.distribution.transfer import open_store

        auth = _registry_auth(creds, password_stdin, authfile, push)
        store = open_store(push, tls_verify=tls_verify == "true", cert_dir=cert_dir, **auth)
        digest = made.push(store)
        typer.echo(push.removeprefix("docker://"))
        typer.echo(f"pushed the placeholder to {push}: manifest digest {digest}", err=True)


# Every command (those added later too) gets the usage line without braces.
for _info in app.registered_commands:
    if _info.cls in (None, TyperCommand):
        _info.cls = _Command


def main() -> None:
    """Console entry point."""
    app()
