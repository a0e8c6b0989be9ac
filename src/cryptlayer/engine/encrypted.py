"""What cryptlayer-runtime does for a container that names an encrypted image (docs/engines.md):
at `create` (and `run`), the image's layers assembled as `cryptlayer start` assembles them, under
a name derived from the engine's container id, with the key the node's config gives it; the
bundle's config.json pointed at them, the image's default process where the engine has the
placeholder's; then the real runtime. At `delete`, the real runtime's delete, then `stop`.

engine/cli.py imports this only for such a container: a pass-through never pays for it.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlayer.errors import UsageError, printable
from cryptlayer.image import markers
from cryptlayer.image.manifest import ImageConfig
from cryptlayer.image.process import DEFAULT_PATH, merge_env

if TYPE_CHECKING:
    from cryptlayer.keys.sources import Credential
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

CAPABILITY_SETS = (
    "effective",
    "permitted",
    "inheritable",
    "ambient",
)  # emptied for a non-root user


@dataclass(frozen=True)
class Request:
    """What the container's spec asks of cryptlayer: which image, pinned how, kept or not."""

    image: Path
    digest: str | None = None
    keep: bool = False


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

    if "://" in image or image.startswith("docker:"):
        raise UsageError(
            f"the image {printable(image)} is a registry reference, and pulling one at `create`"
            " is not available yet",
            "pull it on the node first (cryptlayer pull) and name its directory",
        )
    if not image.startswith("/"):
        raise UsageError(
            f"the image {printable(image)} is not an absolute path",
            "name the image directory on the node by its absolute path",
        )
    digest = _given(spec, DIGEST_ANNOTATION, DIGEST_ENV)
    keep = _given(spec, KEEP_ANNOTATION, KEEP_ENV)
    if keep not in (None, "true", "false"):
        raise UsageError(f"{KEEP_ANNOTATION} is {printable(keep)!r}", "write true or false")
    return Request(Path(image), None if digest is None else check_digest(digest), keep == "true")


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


def credential_for(image: Path) -> Credential:
    """The Credential that opens `image`: the first `[[keys]]` entry's key file or identity, a
    file of root's (the runtime's user) that no one else may write."""
    from cryptlayer import config
    from cryptlayer.keys.sources import Credential, read_key

    entry = config.key_for(image)
    source = entry.key_file or entry.identity or ""
    try:
        st = os.lstat(source)
    except OSError as err:
        raise UsageError(
            f"cannot read the key {source} that {config._path()} names: {err.strerror}"
        ) from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UsageError(
            f"the key {source} is not root's own file, writable by no one else",
            f"chown root {source}; chmod 600 {source}",
        )
    if entry.key_file is not None:
        return Credential(key=read_key(entry.key_file))
    from cryptlayer.keys.recipients import load_identity

    return Credential(identity=load_identity(source))


def trust() -> Path | None:
    """The allowed_signers file images must be signed under; None only where the node's config
    says `allow-unsigned = true` (and names no trust)."""
    from cryptlayer import config

    trusted = config.trust(None)
    if trusted is None and not config.allow_unsigned():
        raise UsageError(
            f"{config._path()} names no trust (allowed_signers) file, and cryptlayer-runtime runs"
            " signed images only",
            'set trust = "/etc/cryptlayer/allowed_signers" (or allow-unsigned = true)',
        )
    return trusted


# -- create and delete


def assemble(spec: dict[str, Any], image: str, cid: str, config_path: str, *,
             holder: Holder | None = None, warn: Callable[[str], None] | None = None,
             ) -> str:  # fmt: skip
    """Assemble the image of `spec` for the engine's container `cid` and rewrite the bundle's
    config.json; the record's name. `holder` (the real runtime, its root) is written beside the
    record first and stays locked by this process until it exits, so that `gc` tears the
    container down once this process died and the runtime does not hold it (docs/engines.md,
    "Faults"). What `cryptlayer run` warns about this host goes to `warn` first. On any failure,
    what was assembled is torn down again."""
    from cryptlayer.image import manifest as manifest_mod
    from cryptlayer.runtime import container, journal, ocispec, state

    wanted = request(spec, image)
    name = container_name(cid)
    trusted = trust()
    if warn is not None:
        for line in host_warnings(wanted.image, wanted.keep):
            warn(line)
    if holder is not None:  # (cli.create's always; released when this process ends, however)
        state.hold(name, holder)
    try:
        with credential_for(wanted.image) as credential:
            options = container.StartOptions(name, shred=not wanted.keep, digest=wanted.digest,
                                             trust=trusted)  # fmt: skip
            record = container.start(wanted.image, credential, options)
    except BaseException:
        if not state.exists(name):  # no record (the name's other container's): nothing made
            state.forget_holder(name)
        raise
    try:
        rootfs = Path(record.rootfs)
        image_config = manifest_mod.load(Path(record.image)).config
        new = rewrite(spec, str(rootfs), image_config,
                      lambda user: ocispec.resolve_user(rootfs, user))  # fmt: skip
        write_config(config_path, new)
    except BaseException:
        _stop_quietly(name)
        raise
    journal.crash_point()  # assembled, the runtime's create not begun (tests/vm)
    return name


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

    try:
        stop(name)
    except (CryptlayerError, OSError) as err:
        print(f"warning: cryptlayer-runtime: tearing down {name}: {err}", file=sys.stderr)


def spawn(runtime: str, argv: Sequence[str], env: dict[bytes, bytes]) -> int:
    """Run the real runtime as a child (its standard streams, console socket and inherited
    descriptors are ours), forwarding SIGINT, SIGTERM and SIGHUP; its exit status, or 128 + the
    signal that ended it, as a shell reports it."""
    defaults = (signal.SIGPIPE, signal.SIGXFSZ)
    pid = os.posix_spawn(runtime, [runtime, *argv], env, setsigdef=defaults)
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def forward(signum: int, _frame: object) -> None:
        os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def stop(name: str) -> None:
    """Tear down the engine's container `name` now that the runtime has deleted it (and shred
    its image unless it was kept); then forget its holder."""
    from cryptlayer.runtime import container, state

    container.stop(name)
    state.forget_holder(name)
