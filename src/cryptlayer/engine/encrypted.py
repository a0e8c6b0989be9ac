"""What cryptlayer-runtime does for a container that names an encrypted image (docs/engines.md):
at `create` (and `run`), the image's layers assembled as `cryptlayer start` assembles them, under
a name derived from the engine's container id, with the key the node's config gives it; the
bundle's config.json pointed at them, the image's default process where the engine has the
placeholder's; then the real runtime. At `delete`, the real runtime's delete, then `stop`.

engine/cli.py imports this only for such a container: a pass-through never pays for it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlayer.errors import UsageError, printable

# The image's modules are imported where a container is assembled: `delete` (stop) needs none.
if TYPE_CHECKING:
    from cryptlayer.image.manifest import ImageConfig
    from cryptlayer.keys.node import NodeKeys
    from cryptlayer.runtime.lazy import LazyLayers
    from cryptlayer.runtime.state import Holder

# The placeholder's markers (distribution/placeholder.py writes them; the runtime layer does
# not import distribution: tests/unit/test_engine.py checks that both say the same).

# What names the image, besides cli.ANNOTATION / cli.ENV: pinned digest, keep the copy.
DIGEST_ANNOTATION = "org.cryptlayer.digest"
DIGEST_ENV = "CRYPTLAYER_DIGEST"
KEEP_ANNOTATION = "org.cryptlayer.keep"
KEEP_ENV = "CRYPTLAYER_KEEP"
# Removed from the container's environment before its process starts (as nvidia-container-runtime
# removes NVIDIA_VISIBLE_DEVICES): they are the node's business, not the job's.
NAMING_ENV = ("CRYPTLAYER_IMAGE", DIGEST_ENV, KEEP_ENV)

# A registry as a reference names it (as registry.registry_host takes one): what
# parse_reference leaves is anything before the first `/`.
REGISTRY_HOST = r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(:[0-9]+)?"

CAPABILITY_SETS = (
    "effective",
    "permitted",
    "inheritable",
    "ambient",
)  # emptied for a non-root user


@dataclass(frozen=True)
class Request:
    """What the container's spec asks of cryptlayer: which image (a directory on the node, or a
    registry reference to start lazily or pull into the node's store), pinned how, kept or
    not."""

    image: Path | None
    digest: str | None = None
    keep: bool = False
    reference: str | None = None  # docker://REGISTRY/REPO[:TAG|@sha256:...]


def _given(spec: dict[str, Any], annotation: str, env_name: str) -> str | None:
    """The value of `annotation`, or of `env_name` in process.env; Refused-worthy when both are
    given and differ (UsageError)."""
    annotations = spec.get("annotations") or {}
    values = {annotations[annotation]} if annotation in annotations else set()
    for entry in (spec.get("process") or {}).get("env") or []:
        key, _, value = entry.partition("=")
        if key == env_name:
            values.add(value)
    if any(not isinstance(v, str) for v in values):
        raise UsageError(f"the annotation {annotation} is not a string")
    if len(values) > 1:
        raise UsageError(
            f"the annotation {annotation} and the environment variable {env_name} differ",
            "give one",
        )
    return next(iter(values), None)


def request(spec: dict[str, Any], image: str) -> Request:
    """The request in `spec` (already checked by cli.encrypted_image) for `image`."""
    from cryptlayer.image.statement import check_digest

    reference = None
    if image.startswith("docker://"):
        from cryptlayer.distribution.registry import parse_reference

        try:  # UsageError for what is not a repository's reference; the spec's text escaped
            host = parse_reference(image).host
        except UsageError as err:
            hint = None if err.hint is None else printable(err.hint)
            raise UsageError(printable(err.message), hint) from None
        if not re.fullmatch(REGISTRY_HOST, host):  # (what the connection would make of it)
            raise UsageError(
                f"the registry {printable(host)} of {printable(image)} is not HOST[:PORT]",
                "name the registry image as docker://REGISTRY[:PORT]/REPO:TAG",
            )
        reference = image
    elif not image.startswith("/"):
        raise UsageError(
            f"the image {printable(image)} is neither an absolute path nor a docker:// reference",
            "name the image directory on the node by its absolute path, or a registry image as"
            " docker://REGISTRY/REPO:TAG",
        )
    digest = _given(spec, DIGEST_ANNOTATION, DIGEST_ENV)
    keep = _given(spec, KEEP_ANNOTATION, KEEP_ENV)
    if keep not in (None, "true", "false"):
        raise UsageError(f"{KEEP_ANNOTATION} is {printable(keep)!r}", "write true or false")
    pinned = None if digest is None else check_digest(digest)
    if reference is not None:
        return Request(None, pinned, keep == "true", reference)
    return Request(Path(image), pinned, keep == "true")


def container_name(cid: str) -> str:
    """The cryptlayer name (state.check_name) of the engine's container `cid`: `engine-ID` for a
    short id of name characters; else `engine-PREFIX-HASH`, 63 characters, which no short form
    has (podman's, Docker's and the CRI's ids are 64 hex digits)."""
    from cryptlayer.engine import cli

    return cli.container_name(cid)


def strip_env(env: Sequence[str]) -> list[str]:
    """`env` without the variables that named the image for cryptlayer."""
    return [e for e in env if e.partition("=")[0] not in NAMING_ENV]


def is_placeholder_process(process: dict[str, Any]) -> bool:
    """Whether the engine left the placeholder's entrypoint: the user gave no command of their
    own (arguments after the image may follow it, as Docker's and Kubernetes' `args`)."""
    from cryptlayer.image import markers  # (where a process is rewritten: a delete needs none)

    args = process.get("args") or []
    return bool(args) and args[0] == markers.ENTRYPOINT


def rewrite(
    spec: dict[str, Any],
    rootfs: str,
    config: ImageConfig,
    resolve_user: Callable[[str], tuple[int, int]],
) -> dict[str, Any]:
    """The engine's config.json with `root.path` at the assembled `rootfs` and the image's own
    default process where the engine wrote the placeholder's markers (docs/engines.md, "The
    default process"); everything else the engine wrote is kept. Core dumps are off
    (RLIMIT_CORE 0, as `cryptlayer run` has it: a crash must not write plaintext to a disk)."""
    new = copy.deepcopy(spec)
    root = new.get("root")
    new["root"] = {**(root if isinstance(root, dict) else {}), "path": rootfs}
    process = new.get("process") or {}
    if not isinstance(process, dict):
        raise UsageError("the container's process is not an object")
    new["process"] = rewrite_process(process, config, resolve_user)
    return new


def rewrite_process(
    process: dict[str, Any],
    config: ImageConfig,
    resolve_user: Callable[[str], tuple[int, int]],
) -> dict[str, Any]:
    """rewrite's of the process (changed in place and returned): also what an engine's `exec`
    gives (podman's exec takes the container's cwd, environment and user: the markers)."""
    from cryptlayer.image import markers
    from cryptlayer.image.process import DEFAULT_PATH, merge_env

    args = process.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise UsageError("the container's process.args is not a list of strings")
    if is_placeholder_process(process):
        args = [*config.entrypoint, *(args[1:] or config.cmd)]
        if not args:
            raise UsageError("the image has no default command", "give the engine a command to run")
        process["args"] = args
    if process.get("cwd") == markers.WORKDIR:
        process["cwd"] = config.workdir or "/"
    env = [e for e in strip_env(process.get("env") or []) if e != markers.PATH_ENV]
    merged = merge_env(config.env, tuple(env))
    if not any(e.startswith("PATH=") for e in merged):
        merged.insert(0, DEFAULT_PATH)
    process["env"] = merged
    user = process.get("user") or {}
    if not isinstance(user, dict):
        raise UsageError("the container's process.user is not an object")
    if user.get("uid", 0) == 0 and user.get("gid", 0) == 0 and config.user:
        uid, gid = resolve_user(config.user)
        if (uid, gid) != (0, 0):
            # the engine's supplementary groups and the name were root's: not the image's user's
            kept = {k: v for k, v in user.items() if k not in ("additionalGids", "username")}
            process["user"] = {**kept, "uid": uid, "gid": gid}
            capabilities = process.get("capabilities")
            if uid != 0 and isinstance(capabilities, dict):  # as engines give a non-root user
                for name in CAPABILITY_SETS:
                    if name in capabilities:
                        capabilities[name] = []
    rlimits = [r for r in process.get("rlimits") or [] if (r or {}).get("type") != "RLIMIT_CORE"]
    process["rlimits"] = [*rlimits, {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]
    return process


def write_config(path: str, spec: dict[str, Any]) -> None:
    """Replace the bundle's config.json at once (a runtime reading it sees one or the other),
    with the engine's file's mode."""
    import json

    from cryptlayer.fsutil import write_atomic

    mode = os.stat(path, follow_symlinks=False).st_mode & 0o777
    write_atomic(Path(path), json.dumps(spec).encode(), mode, durable=False)


# -- the key, from the node


def credential_for(image: Path | None, repository: str | None = None) -> NodeKeys:
    """What opens `image`: the first `[[keys]]` entry that matches it, chosen by container.start
    once the image is open and its digest and signatures are checked (keys/node.py), never from
    the pod spec. `repository`: the one this create pulled the image from, only then (a
    `repository` entry must not match a node's image whose spec merely names one)."""
    from cryptlayer.keys.node import NodeKeys

    return NodeKeys(repository)


def trust() -> Path | None:
    """The allowed_signers file images must be signed under; None only where the node's config
    says `allow-unsigned = true` (and names no trust)."""
    from cryptlayer import config
    from cryptlayer.engine import cli

    trusted = config.trust(None)
    if trusted is None and not config.allow_unsigned():
        raise UsageError(
            f"{config._path()} names no trust (allowed_signers) file, and cryptlayer-runtime runs"
            " signed images only",
            'set trust = "/etc/cryptlayer/allowed_signers" (or allow-unsigned = true)',
        )
    # whoever could change it would choose what runs as root, and a `signer` entry's key
    why = None if trusted is None or not trusted.exists() else cli._replaceable(str(trusted))
    if why is not None:
        raise UsageError(
            f"{why}: another user could change the trust file {printable(str(trusted))}, and so"
            " which images cryptlayer-runtime runs",
            f"make it, and the directories above it, root's and writable by their owner only"
            f" (chown root {trusted}; chmod go-w {trusted})",
        )
    return trusted


# -- create and delete


def assemble(spec: dict[str, Any], image: str, cid: str, config_path: str, *,
             holder: Holder | None = None, warn: Callable[[str], None] | None = None,
             ) -> str:  # fmt: skip
    """Assemble the image of `spec` for the engine's container `cid` and rewrite the bundle's
    config.json; the record's name. A registry image is started lazily (its small files fetched
    and checked, its layers read through NBD devices: docs/lazy.md), or, where the node's config
    says `[pull] lazy = false`, pulled whole into the node's store first (engine/store.py).
    `holder` (the real runtime, its root) is written first and stays locked by this process
    until it exits, so that `gc` tears the container down once this process died and the
    runtime does not hold it (docs/engines.md, "Faults"). What `cryptlayer run` warns about this
    host goes to `warn` first. On any failure, what was assembled is torn down and what was
    pulled or fetched removed."""
    from cryptlayer import config
    from cryptlayer.engine import cli, store
    from cryptlayer.image import manifest as manifest_mod
    from cryptlayer.runtime import container, journal, ocispec, state

    wanted = request(spec, image)
    name = container_name(cid)
    trusted = trust()
    path, repository, keep, lazy = wanted.image, None, wanted.keep, False
    if wanted.reference is not None:
        from cryptlayer.distribution.registry import parse_reference

        ref = parse_reference(wanted.reference)
        repository = f"{ref.host}/{ref.repository}"
        settings = config.pull_settings()
        keep, lazy = keep or settings.keep, settings.lazy
        if not lazy:
            path = store.target(name)  # (the store checked before its path chooses a key)
    else:
        assert path is not None
        path = outside_store(path)
    pulled: store.Pulled | None = None
    lazy_layers: LazyLayers | None = None
    started = False
    if warn is not None:
        for line in host_warnings(wanted.image, keep):
            warn(line)
    if holder is not None:  # (cli.create's always; released when this process ends, however)
        state.hold(name, holder)
    try:
        with credential_for(path, repository=repository) as credential:
            if wanted.reference is not None:
                with _interruptible():
                    if lazy:
                        lazy_layers = fetch_lazily(wanted.reference, wanted.digest, trusted,
                                                   erase=not keep)  # fmt: skip
                        path = lazy_layers.work / "image"
                    else:
                        pulled = store.pull(wanted.reference, name, wanted.digest, trusted)
            assert path is not None
            # (a lazy image's erase is the node's copy's: its header chunks; as `cryptlayer run`)
            options = container.StartOptions(name, shred=not keep, digest=wanted.digest,
                                             trust=trusted, lazy=lazy_layers)  # fmt: skip
            record = container.start(path, credential, options)
            started = True
        rootfs = Path(record.rootfs)
        image_config = manifest_mod.load(Path(record.image)).config
        new = rewrite(spec, str(rootfs), image_config,
                      lambda user: ocispec.resolve_user(rootfs, user))  # fmt: skip
        write_config(config_path, new)
    except BaseException:
        if started:
            _stop_quietly(name)
        elif not state.exists(name):  # no record (the name's other container's): nothing made
            state.forget_holder(name)
        if pulled is not None and pulled.new and not cli.has_record(name):
            store.discard_quietly(name)
        if lazy_layers is not None:
            if lazy_layers.discard is not None:
                lazy_layers.discard()  # a warm server never handed its sockets
            discard_fetched(lazy_layers.work)
        raise
    journal.crash_point()  # assembled, the runtime's create not begun (tests/vm)
    return name


_HELD = contextlib.ExitStack()  # fetched directories' locks, released when the process ends


def fetch_lazily(reference: str, digest: str | None, trusted: Path | None,
                 erase: bool) -> LazyLayers:  # fmt: skip
    """Fetch `reference` for a lazy start (distribution/lazy.py: manifest, statement, keys.json,
    signatures and verity trees whole and checked, each layer's header through the block cache)
    into a new private directory in /run, under the node's registry settings: `[registries]`'s
    TLS and CA, `[pull] auth-file`; `digest` pins it, `trusted` vouches for it (None: the node
    allows unsigned images); `erase`: the start erases the node's copy (its headers never stored
    in the block cache). On a failure nothing of it is left."""
    import shutil

    from cryptlayer import config
    from cryptlayer.distribution import lazy
    from cryptlayer.distribution.registry import parse_reference
    from cryptlayer.runtime.lazy import LazyLayers, work_dir

    registry = config.registry_settings(parse_reference(reference).host)
    auth_file = config.pull_settings().auth_file
    remote = lazy.Remote(reference, registry.tls_verify,
                         None if registry.cert_dir is None else str(registry.cert_dir),
                         None if auth_file is None else str(auth_file))  # fmt: skip
    # Locked (flock) for as long as this process lives: `gc` leaves it alone until the opening
    # names it, and removes it if create dies before (runtime/lazy.py work_dir).
    work = _HELD.enter_context(work_dir())
    try:
        fetched = lazy.fetch_for_start(remote, work / "image", digest=digest, trust=trusted,
                                       erase=erase, warm=True)  # fmt: skip
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return LazyLayers(work, fetched.blobs, fetched.command, fetched.config, reference,
                      fetched.handoff, fetched.discard)  # fmt: skip


def discard_fetched(work: Path) -> None:
    """Remove a lazy start's fetched directory after a failure, unless an opening holds it (the
    opening's release removes it: runtime/lazy.py)."""
    import shutil

    from cryptlayer.runtime import state

    if state.load_opening(str(work / "image")) is None:
        shutil.rmtree(work, ignore_errors=True)


def outside_store(image: Path) -> Path:
    """`image` (a spec's path on the node) resolved, as it is then opened; UsageError when it is
    in the pull store: a copy there is the container's it was pulled for (another spec naming
    it would open it with the node's key, and shred it under that container at its delete)."""
    from cryptlayer.engine import store

    resolved = image.resolve()
    pulled = store.store_dir().resolve()
    if resolved == pulled or pulled in resolved.parents:
        raise UsageError(
            f"the image {printable(str(image))} is in the node's pull store {pulled}, whose copies"
            " belong to the containers they were pulled for",
            "name the registry image (docker://REGISTRY/REPO:TAG), or an image directory outside"
            " the store",
        )
    return resolved


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP (an engine giving up on a slow create) raise an error inside, as
    SIGINT raises KeyboardInterrupt, so that a pull cut short leaves nothing behind."""
    from cryptlayer.errors import CryptlayerError

    def interrupt(signum: int, _frame: object) -> None:
        raise CryptlayerError(f"interrupted by {signal.Signals(signum).name} while pulling")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def host_warnings(image: Path | None, keep: bool) -> list[str]:
    """What `cryptlayer run` would warn about for `image` on this host (runtime/hostcheck.py:
    swap, zram writeback, core dumps to files, hibernation; unless kept, an erase on
    copy-on-write or flash storage), as `TEXT [KIND]` lines, without those the node's
    config.toml silences. (None: an image not on the node yet, whose storage is not known.)"""
    from cryptlayer import config
    from cryptlayer.runtime.hostcheck import erase_caveat, problems

    found = [(p.kind, f"{p}: decrypted memory may reach the disk") for p in problems()]
    if not keep and image is not None and image.is_dir() and (caveat := erase_caveat(image)):
        found.append(("erase-storage", caveat))
    quiet = config.quiet_warnings() if found else frozenset()
    return [f"{printable(text)} [{kind}]" for kind, text in found if kind not in quiet]


def exec_process(name: str, path: str) -> None:
    """Rewrite the process file of an engine's `exec` into the container `name` as its
    config.json was rewritten: the image's workdir, environment and user where the markers are
    (podman's exec copies them from the placeholder's config)."""
    from cryptlayer.engine import cli
    from cryptlayer.image import manifest as manifest_mod
    from cryptlayer.runtime import ocispec, state

    record = state.load(name)
    image_config = manifest_mod.load(Path(record.image)).config
    directory, file_name = os.path.split(path)
    process = cli._read_config(directory or ".", file_name)
    if not process:
        return  # no such file: the runtime says so
    rootfs = Path(record.rootfs)
    new = rewrite_process(process, image_config, lambda user: ocispec.resolve_user(rootfs, user))
    write_config(path, new)


def _stop_quietly(name: str) -> None:
    """Tear down `name` after a failure, whose error is the one to show."""
    from cryptlayer.errors import CryptlayerError
    from cryptlayer.runtime import container, state

    try:
        container.stop(name)
        state.forget_holder(name)
    except (CryptlayerError, OSError) as err:
        print(f"warning: cryptlayer-runtime: tearing down {name}: {err}", file=sys.stderr)


def stop(name: str) -> None:
    """Tear down the engine's container `name` now that the runtime has deleted it (and shred
    its image unless it was kept); a copy pulled for it is then removed, unless kept; then its
    holder is forgotten."""
    from cryptlayer.runtime import container, state

    record = container.stop(name)
    state.forget_holder(name)
    image = getattr(record, "image", None)  # (tests' stand-ins return nothing)
    if image is None or not record.shred:
        return  # kept: its copy too, so the store (and config.toml's [pull]) is not looked at
    from cryptlayer.engine import store

    if store.holds(image) == name:
        store.discard(name, wipe=not record.shredded)


def stop_shielded(name: str, tombstone: str) -> None:
    """`stop(name)` in a child process of its own session, waited for. An engine may kill the
    runtime's `delete` when a deadline of its own passes (containerd's CRI gives its handling of
    a container's exit 10 s, kills the runtime then with SIGKILL, and asks again later): that
    kills this process, never a teardown half done. Once torn down, the child leaves the file
    `tombstone` for the delete the engine asks again, which finds neither the container in the
    real runtime nor its record (cli.deleted_again); asked again while that teardown runs, the
    second waits for it (the state lock) and finds the container gone: deleted, no error. A
    failure of the teardown is raised here, with its message."""
    from cryptlayer.errors import CryptlayerError

    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it ends here, never returning into the caller's code
        code = 0
        try:
            os.close(read_end)
            os.setsid()  # (out of the engine's process group and session)
            _stop_unless_gone(name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            with contextlib.suppress(OSError):
                os.close(os.open(tombstone, flags, 0o600))
        except BaseException as err:  # (reported to the parent, which raises it)
            code = 1
            with contextlib.suppress(OSError):
                os.write(write_end, str(err).encode(errors="backslashreplace"))
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="backslashreplace")
    _, status = os.waitpid(pid, 0)
    if message or status != 0:
        raise CryptlayerError(message or f"tearing down {name}: the teardown failed ({status})")


def _stop_unless_gone(name: str) -> None:
    """stop(name); a container whose record is gone by then was torn down by another `delete`
    (the one an engine killed at its deadline, whose teardown went on): deleted."""
    from cryptlayer.engine import cli

    try:
        stop(name)
    except UsageError:
        if cli.has_record(name):
            raise
