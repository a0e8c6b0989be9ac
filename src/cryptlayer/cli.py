"""The command line: parse, call one function of the core, render. Heavy modules load lazily."""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .errors import CryptlayerError, ExitCode

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Run containers straight from LUKS2-encrypted layer images; no plaintext lands on disk.",
)
_debug = False

KeyFile = Annotated[
    str | None,
    typer.Option("--key-file", "-k", help="File holding the image key; '-' reads standard input."),
]
KeyCommand = Annotated[
    str | None,
    typer.Option(help="Program whose standard output is the key (Vault, a KMS, a keyscript)."),
]
Keyring = Annotated[
    str | None, typer.Option(help="Name of a user key in the kernel keyring (keyctl).")
]
ImageArg = Annotated[Path, typer.Argument(help="Image directory (the --output of build).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
KeepFlag = Annotated[
    bool, typer.Option("--keep", help="Do not shred the image when the container stops.")
]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handled(func: F) -> F:
    """Map CryptlayerError to one `error:` line and its exit code; tracebacks only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CryptlayerError as err:
            if _debug:
                traceback.print_exc()
            raise _fail(str(err), err.exit_code) from err
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None
        except OSError as err:
            if _debug:
                traceback.print_exc()
            where = f" ({err.filename})" if err.filename else ""
            raise _fail(f"{err.strerror or err}{where}", ExitCode.FAILURE) from err

    return wrapper  # type: ignore[return-value]


@app.callback()
def _global(
    debug: Annotated[
        bool, typer.Option("--debug", help="Log every command run; show tracebacks.")
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


def _key(key_file: str | None, key_command: str | None, keyring: str | None, action: str) -> Any:
    """Read the key, after checking root: a user who cannot proceed anyway hears that first."""
    from .keys import read_any
    from .system import require_root

    require_root(action)
    return read_any(key_file, key_command, keyring)


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("iBb"), ""
    if number and number[-1].upper() in units:
        number, unit = number[:-1], number[-1].upper()
    if not number.isdigit() or int(number) == 0:
        raise typer.BadParameter(f"{text!r} is not a size like 512M or 2G")
    return int(number) * units[unit]


@app.command()
@handled
def keygen(keyfile: Annotated[Path, typer.Argument(help="Where to write the new key.")]) -> None:
    """Write a new random 32-byte key (mode 0600); never overwrites."""
    from .keys import write_new_key

    write_new_key(keyfile)
    typer.echo(f"wrote a new key to {keyfile} (mode 0600); keep it secret", err=True)


@app.command()
@handled
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
) -> None:
    """Build an encrypted image: one LUKS2 layer per layer of each SOURCE."""
    import shlex

    from .build import build_image
    from .ocispec import merge_env

    # Only what was given overrides the config an OCI source brings.
    overrides: dict[str, Any] = {}
    if entrypoint is not None:
        overrides["entrypoint"] = tuple(shlex.split(entrypoint))
    if cmd is not None:
        overrides["cmd"] = tuple(shlex.split(cmd))
    if env:
        overrides["env"] = tuple(merge_env(tuple(env)))
    if workdir is not None:
        overrides["workdir"] = workdir
    if user is not None:
        overrides["user"] = user
    with _key(key_file, key_command, keyring, "build an image") as key:
        built = build_image(sources, output, key, squash=squash, overrides=overrides)
    for layer in built.layers:
        typer.echo(
            f"{output}/{layer.file}: {layer.size} bytes"
            f" ({layer.content_bytes} of content) from {layer.source}"
        )


@app.command()
@handled
def inspect(image: ImageArg, as_json: JsonFlag = False) -> None:
    """Show an image's layers, sizes, cipher, keyslot state and config (no key needed)."""
    from .inspect import inspect_image

    info = inspect_image(image)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"image:   {info['image']}\ncipher:  {info['cipher']}\nstate:   {info['state']}")
    typer.echo(f"created: {info['created']}")
    for i, layer in enumerate(info["layers"]):
        typer.echo(
            f"layer {i}: {layer['file']} {layer['size']} bytes,"
            f" keyslots {layer['keyslots']} ({layer['state']}), from {layer['source']}"
        )
    cfg = info["config"]
    typer.echo(f"command: {' '.join([*cfg['entrypoint'], *cfg['cmd']]) or '(none)'}")
    for item in cfg["env"]:
        typer.echo(f"env:     {item}")
    typer.echo(f"workdir: {cfg['workdir']}\nuser:    {cfg['user'] or 'root'}")


@app.command(context_settings={"allow_interspersed_args": False})
@handled
def run(
    image: ImageArg,
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
    keyring: Keyring = None,
    command: Annotated[list[str] | None, typer.Argument(help="COMMAND [ARG...] after --.")] = None,
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
    scratch_size: Annotated[str, typer.Option(help="Size of the writable layer (sparse).")] = "1G",
    stop_timeout: Annotated[
        float, typer.Option(help="Seconds after SIGINT/SIGTERM before the container is killed.")
    ] = 10.0,
) -> None:
    """Run COMMAND (or the image's default) in a container from IMAGE, then tear down and shred."""
    from . import container, ocispec, state

    if interactive and key_file == "-":
        raise CryptlayerError(
            "--interactive and --key-file - both want standard input", "use a key file"
        )
    options = container.StartOptions(
        state.check_name(name) if name else container.default_name(image),
        not keep,
        _size(scratch_size),
    )
    # Everything after IMAGE is the command (as in podman); a `--` before it is optional.
    args = command[1:] if command and command[0] == "--" else (command or [])
    overrides = ocispec.Overrides(tuple(args), tuple(env or ()), workdir, user)
    with _key(key_file, key_command, keyring, "start containers") as key:
        status = container.run(image, key, options, overrides, interactive)
    raise typer.Exit(status)


@app.command()
@handled
def start(
    image: ImageArg,
    name: Annotated[str, typer.Option(help="Container name, for `stop`.")],
    key_file: KeyFile = None,
    key_command: KeyCommand = None,
    keyring: Keyring = None,
    keep: KeepFlag = False,
    scratch_size: Annotated[str, typer.Option(help="Size of the writable layer (sparse).")] = "1G",
) -> None:
    """Assemble the root file system and print its path (for podman --rootfs, nspawn -D, crun)."""
    from . import container, state

    options = container.StartOptions(state.check_name(name), not keep, _size(scratch_size))
    with _key(key_file, key_command, keyring, "start containers") as key:
        record = container.start(image, key, options)
    typer.echo(record.rootfs)


@app.command()
@handled
def stop(
    name: Annotated[str, typer.Argument(help="Container name.")],
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Kill processes using the container's files.")
    ] = False,
) -> None:
    """Tear down a started container (and shred its image unless started with --keep)."""
    from . import container

    record = container.stop(name, force=force)
    shredded = f"; image {record.image} shredded" if record.shred else ""
    typer.echo(f"stopped {name}{shredded}", err=True)


@app.command()
@handled
def ps(as_json: JsonFlag = False) -> None:
    """List the containers that are running or assembled now."""
    from . import container, state

    rows = [container.describe(r) for r in state.all_records()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'NAME':<24} {'STATUS':<10} {'LAYERS':>6}  {'IMAGE'}")
    for row in rows:
        typer.echo(f"{row['name']:<24} {row['status']:<10} {row['layers']:>6}  {row['image']}")


@app.command()
@handled
def shred(image: ImageArg) -> None:
    """Crypto-erase IMAGE: wipe every keyslot of every layer, then verify none is left."""
    from .shred import shred_image
    from .system import require_tools

    require_tools("cryptsetup")
    count = shred_image(image)
    typer.echo(
        f"shredded {image}: {count} layer(s), no keyslot left; no key can open it now", err=True
    )


@app.command()
@handled
def gc() -> None:
    """Remove what crashed runs left behind and apply the shreds they owed."""
    from .gc import collect
    from .system import require_root

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
    if not (report.containers or report.orphans):
        typer.echo("nothing to clean up")


def main() -> None:
    """Console entry point."""
    app()
