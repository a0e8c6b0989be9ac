"""`cryptlayer-runtime`: an OCI runtime with runc's and crun's command line, for podman, Docker and
containerd (docs/engines.md).

Every call is handed to the real runtime (crun, or what config.toml's `[runtime]` names) by
exec: its argv, environment, descriptors, console socket, pid file, exit status and signals are
the real runtime's, with no Python left in between. The one decision is made at `create`,
`run` and `restore`: a bundle whose config.json names an encrypted image (the annotation
`org.cryptlayer.image` or `CRYPTLAYER_IMAGE` in the process's environment) is cryptlayer's to
assemble (encrypted.py), and its `delete` tears it down; a failure is one `error:` line, on
stderr and in the runtime's log.

A pass-through imports nothing but what the interpreter has loaded already (os, sys, _signal):
engines call `state` often, and it must cost at most 20 ms more than crun's own
(docs/benchmarks/NOTES.md). The config file is parsed (tomllib) only when it exists; the bundle
(json, fsutil) only at create, run and restore.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs a pass-through ~8 ms of imports (re, enum...)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

# config.py's own file ($CRYPTLAYER_CONFIG, else DEFAULT), looked at without importing config.py
# and tomllib: a host without the file runs crun, and pays nothing to learn that.
CONFIG_ENV = "CRYPTLAYER_CONFIG"
CONFIG_DEFAULT = "/etc/cryptlayer/config.toml"

ANNOTATION = "org.cryptlayer.image"
ENV = "CRYPTLAYER_IMAGE"
# The image's other settings (issue 23: a pinned digest, keep the node's copy), not typos of it.
OTHER_ANNOTATIONS = ("org.cryptlayer.digest", "org.cryptlayer.keep")
OTHER_ENV = ("CRYPTLAYER_DIGEST", "CRYPTLAYER_KEEP")
# Keys come from the node's config, never from a pod spec or a command line.
KEY_ANNOTATION = "org.cryptlayer.key"
KEY_ENV = "CRYPTLAYER_KEY"

# What containerd's CRI and CRI-O call a pod's sandbox (its pause container), which receives
# the pod's annotations too and is never the encrypted image's: the type annotation, and the one
# naming the sandbox's id. The type alone is an annotation anyone can write (podman --annotation);
# the engine's own sandbox is created under its sandbox's id, which the engine chose (at random)
# after the annotations were written, so a sandbox is one whose sandbox id is its container id.
SANDBOX = (("io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"),  # containerd
           ("io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"))  # fmt: skip

# The runtime's own failures (never a container's status: `run` passes that through): podman's
# and `cryptlayer run`'s code for "the runtime failed". Engines show the log's message, not this.
FAILED = 125

# A bundle's config.json is the engine's, but its annotations and environment come from whoever
# wrote the pod spec or the command line. Kubernetes keeps a whole object under ~1.5 MiB; an
# environment file may be larger. Beyond this the container is refused, not passed through.
MAX_CONFIG = 16 << 20

# Where engines look for a runtime when PATH does not have it (containers.conf's defaults).
SEARCH = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/sbin", "/bin",
          "/usr/lib/cri-o-runc/sbin", "/run/current-system/sw/bin")  # fmt: skip

# The global options of runc (urfave/cli: --flag VALUE, --flag=VALUE, -flag VALUE) and crun
# (argp: the same, and unambiguous abbreviations), by whether they take a value.
GLOBAL_VALUE = ("root", "log", "log-format", "log-level", "criu", "rootless", "cgroup-manager")
GLOBAL_FLAG = ("debug", "systemd-cgroup", "help", "version", "usage")
# The commands that make a container from a bundle: `restore` too (conmon's and go-runc's
# checkpoint/restore: `restore --bundle B --pid-file P --detach --image-path DIR ...`).
FROM_BUNDLE = ("create", "run", "restore")
# Their options (both runtimes'; -f/--config is crun's): only --bundle and --config matter here,
# the rest are known so that their values are never taken for them.
BUNDLE_VALUE = {"bundle": "b", "config": "f", "console-socket": "", "pid-file": "",
                "preserve-fds": "", "pidfd-socket": "", "image-path": "", "work-path": "",
                "parent-path": "", "manage-cgroups-mode": "", "empty-ns": "", "page-server": "",
                "lsm-profile": "", "lsm-mount-context": "", "status-fd": ""}  # fmt: skip
# exec's options that take a value (runc's and crun's), for its container id and --process
EXEC_VALUE = {"process": "p", "console-socket": "", "pid-file": "", "cwd": "", "env": "e",
              "user": "u", "additional-gids": "g", "cap": "c", "process-label": "",
              "apparmor": "", "preserve-fds": "", "cgroup": "", "pidfd-socket": ""}  # fmt: skip
BUNDLE_FLAG = {"detach": "d", "keep": "", "no-pivot": "", "no-new-keyring": "",
               "no-subreaper": ""}  # fmt: skip
COMMANDS = ("checkpoint", "create", "delete", "events", "exec", "features", "help", "kill",
            "list", "pause", "ps", "restore", "resume", "run", "spec", "start", "state",
            "update")  # fmt: skip


class Refused(Exception):
    """A container this runtime will not pass through, and why (one line)."""


class Invocation:
    """What the engine asked for: the global options that matter here and the command."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._argv = list(argv)
        self.log: str | None = None
        self.log_format = "text"
        self.root: str | None = None
        self.command: str | None = None
        self.args: list[str] = []  # the command's own arguments
        i = 0
        while i < len(argv):
            token = argv[i]
            if token == "--" or not token.startswith("-") or token == "-":
                if token == "--":
                    i += 1
                break
            name, has_value, value = token.lstrip("-").partition("=")
            name = _expand(name, GLOBAL_VALUE + GLOBAL_FLAG)
            if name in GLOBAL_VALUE:
                takes_value = True
            else:  # an unknown long option (a newer runtime's) takes a value unless a command
                # follows it: never mistake its value for the command, nor `create` for a value
                known = name in GLOBAL_FLAG or len(token) <= 2
                follows = argv[i + 1] if i + 1 < len(argv) else ""
                takes_value = not known and follows not in COMMANDS
            if takes_value and not has_value:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if name == "log":
                self.log = value
            elif name == "root":
                self.root = value
            elif name == "log-format":
                self.log_format = value
            i += 1
        if i < len(argv):
            self.command = argv[i]
            self.args = list(argv[i + 1 :])

    def globals(self) -> list[str]:
        """The global options, as given (everything before the command)."""
        return self._argv[: len(self._argv) - len(self.args) - 1]

    def container_id(self) -> str | None:
        """The container's id: the command's first argument that is no option nor an option's
        value (create, run: after --bundle DIR and the like; exec: after --process FILE;
        delete: after --force)."""
        return self._scan()[0]

    def process_file(self) -> str | None:
        """exec's --process FILE (-p), the process's JSON the engine wrote, if given."""
        return self._scan()[1]

    def _scan(self) -> tuple[str | None, str | None]:
        """The container's id and exec's --process value, as runc and crun read the command's
        options (--opt VALUE, --opt=VALUE, -opt VALUE, argp's -xVALUE and grouped letters)."""
        args = self.args
        table = {"delete": {}, "exec": EXEC_VALUE}.get(self.command or "", BUNDLE_VALUE)
        values = tuple(table)
        shorts = {s: long for long, s in table.items() if s}
        process: str | None = None
        i = 0
        while i < len(args):
            token = args[i]
            i += 1
            if token == "--":
                return (args[i] if i < len(args) else None), process
            if not token.startswith("-") or token == "-":
                return token, process
            name, has_value, value = token.lstrip("-").partition("=")
            if token.startswith("--") or (len(name) > 1 and name in values):
                name = _expand(name, values)
                if name in values and not has_value:
                    value = args[i] if i < len(args) else ""
                    i += 1
            else:  # argp's grouped short options: -dp FILE; -pFILE holds its value
                for j, letter in enumerate(token[1:]):
                    if letter in shorts:
                        name, value = shorts[letter], token[j + 2 :].removeprefix("=")
                        if not value:
                            value = args[i] if i < len(args) else ""
                            i += 1
                        break
            if name == "process":
                process = value
        return None, process

    def bundle_config(self) -> tuple[str, str]:
        """The bundle directory and the config file that `create`/`run` would read, as crun
        resolves them: config.json inside the bundle (default, and for an empty --bundle as
        runc reads it: the working directory); a --config other than config.json relative to
        the working directory."""
        bundle, config, _ = self._bundle_args()
        return bundle, config

    def operands(self) -> list[str]:
        """The command's arguments that are not options: the container's id (runc and crun take
        one; the unknown option of a newer runtime may add its value)."""
        return self._bundle_args()[2]

    def _bundle_args(self) -> tuple[str, str, list[str]]:
        bundle, config = ".", "config.json"
        operands: list[str] = []
        i = 0
        args = self.args
        while i < len(args):
            token = args[i]
            i += 1
            if token == "--":
                operands += args[i:]
                break
            if not token.startswith("-") or token == "-":
                operands.append(token)  # the container's id
                continue
            if token.startswith("--") or token.lstrip("-").partition("=")[0] in _long_names():
                name, has_value, value = token.lstrip("-").partition("=")
                name = _expand(name, tuple(BUNDLE_VALUE) + tuple(BUNDLE_FLAG))
                if name not in BUNDLE_VALUE:
                    continue
                if not has_value:
                    value = args[i] if i < len(args) else ""
                    i += 1
            else:  # argp's short options, grouped: -db DIR, -bDIR, -f FILE
                name, value = "", ""
                letters = token[1:]
                for j, letter in enumerate(letters):
                    long = _short(letter)
                    if long in BUNDLE_VALUE:
                        name, value = long, letters[j + 1 :].removeprefix("=")
                        if not value:
                            value = args[i] if i < len(args) else ""
                            i += 1
                        break
            if name == "bundle":
                bundle = value or "."  # runc changes directory only to a bundle it is given
            elif name == "config":
                config = value
        if config == "config.json" or config.startswith("/"):
            return bundle, config, operands
        return bundle, os.path.abspath(config), operands


def _long_names() -> set[str]:
    return set(BUNDLE_VALUE) | set(BUNDLE_FLAG)


def _short(letter: str) -> str:
    for table in (BUNDLE_VALUE, BUNDLE_FLAG):
        for long, short in table.items():
            if short == letter:
                return long
    return ""


def _expand(name: str, known: Sequence[str]) -> str:
    """`name`, or the one known option it abbreviates (argp accepts unambiguous prefixes)."""
    if name in known or not name:
        return name
    matches = [k for k in known if k.startswith(name)]
    return matches[0] if len(matches) == 1 else name


# -- the runtime to hand over to


def configured() -> str:
    """The runtime config.toml names (`[runtime] runtime`), or crun.

    Parsing the file costs more than the whole of a pass-through otherwise (tomllib brings re,
    typing, string: ~15 ms), so the answer is kept in RUNDIR/CACHE.DEV.INODE, under the file's
    identity (path, device, inode, size, mtime and ctime: any write changes the ctime) and read
    only from a file and directory of this user's that nobody else may write."""
    path = os.environ.get(CONFIG_ENV, CONFIG_DEFAULT)
    try:
        st = os.stat(path)
    except FileNotFoundError:  # (config.py reads a dangling symlink as no file too)
        return "crun"
    except OSError:
        st = None  # config.py reports it
    else:
        _refuse_replaceable(path, "the config file")
    key = ""
    if st is not None:
        key = f"{path}\n{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    name = f"{CACHE}.{st.st_dev}.{st.st_ino}" if st is not None else ""  # one per config file
    if key and (value := _cached(name, key)) is not None:
        return value
    from cryptlayer import config

    value = config.oci_runtime()
    if key:
        _remember(name, key, value)
    return value


# paths.run_root()'s, without importing paths (pathlib) on the way to a pass-through
RUNDIR_ENV = "CRYPTLAYER_RUNDIR"
RUNDIR_DEFAULT = "/run/cryptlayer"
# (a dot first, as .images and .oci: container directories are named there, and never so)
CACHE = ".engine-runtime"


def _ours(st: os.stat_result, kind: int) -> bool:
    import stat

    return stat.S_IFMT(st.st_mode) == kind and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _cached(name: str, key: str) -> str | None:
    import stat

    rundir = os.environ.get(RUNDIR_ENV, RUNDIR_DEFAULT)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        if not _ours(os.lstat(rundir), stat.S_IFDIR):
            return None
        fd = os.open(os.path.join(rundir, name), flags)
    except OSError:
        return None
    try:
        if not _ours(os.fstat(fd), stat.S_IFREG):
            return None
        data = os.read(fd, 1 << 16)
    except OSError:
        return None
    finally:
        os.close(fd)
    stored, sep, value = data.decode(errors="replace").partition("\0")
    return value if sep and stored == key else None


def _remember(name: str, key: str, value: str) -> None:
    """Keep the answer for the next calls; nothing is lost if it cannot be kept."""
    from cryptlayer.errors import CryptlayerError
    from cryptlayer.paths import private_run_root

    try:
        root = private_run_root()
    except (OSError, CryptlayerError):
        return
    import contextlib

    tmp = str(root / f"{name}.{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, f"{key}\0{value}".encode())
        finally:
            os.close(fd)
        os.replace(tmp, root / name)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def resolve(program: str) -> str:
    """The runtime's path: an absolute path as it is; a name on PATH, else where engines look."""
    if program.startswith("/"):
        candidates = [program]
    else:
        dirs = os.environ.get("PATH", os.defpath).split(os.pathsep) + list(SEARCH)
        candidates = [os.path.join(d, program) for d in dirs if d.startswith("/")]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            if os.path.realpath(candidate) == os.path.realpath(sys.argv[0]):
                raise Refused(f"the runtime {candidate} is cryptlayer-runtime itself: set"
                              f' [runtime] runtime = "crun" (or "runc", or the real runtime\'s'
                              " path) in the config file")  # fmt: skip
            _refuse_replaceable(candidate, "the runtime")
            return candidate
    where = program if program.startswith("/") else f"{program} (on PATH or in {', '.join(SEARCH)})"
    raise Refused(f"no OCI runtime {where}: install it (apt-get install {_package(program)}), or"
                  " name another in the config file's [runtime] runtime")  # fmt: skip


def _refuse_replaceable(path: str, what: str) -> None:
    """Refused when a user other than root and us could change `path` (the config file, or the
    program named in it) or replace it through a directory above it, as named or as symbolic
    links resolve: cryptlayer-runtime runs as root for the engines, and would run their choice.
    A few lstat calls: a pass-through can afford them."""
    why = _replaceable(path)
    if why is not None:
        raise Refused(f"{why}: another user could change {what} {_printable(path)} and choose"
                      " the program cryptlayer-runtime runs for the engine; make it, and the"
                      " directories above it, root's and writable by their owner only (chown"
                      " root, chmod go-w)")  # fmt: skip


def _replaceable(path: str) -> str | None:
    """Why another user could change or replace `path`: the first entry that decides what it
    opens (from `path` up to /, and so from each symbolic link met on the way to its target)
    owned by another user or writable by group or others (a sticky directory such as /tmp lets
    others replace only their own entries); None when none is."""
    import stat

    mine = (0, os.geteuid())
    seen: set[str] = set()
    pending = [os.path.realpath(path), os.path.abspath(path)]
    while pending:
        name = pending.pop()
        while name not in seen:
            if len(seen) > 1000:  # a maze of links: no program is found through one anyway
                return f"{_printable(path)} leads through too many symbolic links"
            seen.add(name)
            try:
                st = os.lstat(name)
                if stat.S_ISLNK(st.st_mode):  # where it leads is checked as well
                    target = os.readlink(name)
                    here = os.path.realpath(os.path.dirname(name))
                    pending.append(os.path.normpath(os.path.join(here, target)))
            except OSError as err:
                return f"{_printable(name)} cannot be examined ({err.strerror})"
            mode = st.st_mode
            if st.st_uid not in mine:
                return f"{_printable(name)} is owned by uid {st.st_uid}"
            sticky = stat.S_ISDIR(mode) and mode & stat.S_ISVTX
            if not stat.S_ISLNK(mode) and mode & 0o022 and not sticky:
                return (f"{_printable(name)} is writable by group or others"
                        f" (mode {stat.S_IMODE(mode):04o})")  # fmt: skip
            name = os.path.dirname(name)
    return None


def _package(program: str) -> str:
    return "runc" if os.path.basename(program) == "runc" else "crun"


def original_environ() -> dict[bytes, bytes]:
    """The environment this process was started with, exactly: Python's start-up may add to
    os.environ (LC_CTYPE=C.UTF-8 where the locale is C), and the runtime must see the engine's."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    env: dict[bytes, bytes] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key and key not in env:  # execve keeps the first of a name, as getenv reads
            env[key] = value
    return env


def execute(runtime: str, argv: Sequence[str]) -> NoReturn:
    """Become `runtime` with the same arguments: nothing of this process is left after it."""
    import _signal  # type: ignore[import-not-found]  # loaded at start-up; `signal` costs ms

    # Python ignores SIGPIPE and SIGXFSZ at start-up; the runtime gets them back as exec'd
    # programs do (as subprocess restores them for its children).
    for name in ("SIGPIPE", "SIGXFSZ"):
        _signal.signal(getattr(_signal, name), _signal.SIG_DFL)
    os.execve(runtime, [runtime, *argv], original_environ())


# -- the decision


def encrypted_image(bundle: str, config_name: str, ids: Sequence[str] = ()) -> str | None:
    """The encrypted image the bundle's config.json names, or None (also for a pod's sandbox,
    the container created under one of `ids` whose annotations say it is that sandbox; or when
    there is no such file: the runtime then reports it); Refused when the file is not a regular
    JSON file of at most MAX_CONFIG bytes, or names keys or two images."""
    return named_image(_read_config(bundle, config_name), bundle, config_name, ids)


def named_image(
    spec: dict[str, Any], bundle: str, config_name: str, ids: Sequence[str] = ()
) -> str | None:
    """encrypted_image, of the bundle's config `spec` (as _read_config read it)."""
    annotations = spec.get("annotations") or {}
    process = spec.get("process") or {}
    if not isinstance(annotations, dict) or not isinstance(process, dict):
        raise Refused(f"{_shown(bundle, config_name)}: annotations and process must be objects")
    env = process.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise Refused(f"{_shown(bundle, config_name)}: process.env must be a list of strings")
    for name in annotations:
        if name.startswith(KEY_ANNOTATION):
            raise Refused(f"the container's annotation {_printable(name)} would carry key"
                          " material: keys come from the node's config file, never from the"
                          " container's spec (docs/engines.md)")  # fmt: skip
    named: dict[str, str] = {}
    for entry in env:
        key, _, value = entry.partition("=")
        if key.startswith(KEY_ENV):
            raise Refused(f"the container's environment variable {_printable(key)} would carry"
                          " key material: keys come from the node's config file, never from the"
                          " container's spec (docs/engines.md)")  # fmt: skip
        if key == ENV and named.setdefault(f"environment variable {ENV}", value) != value:
            raise Refused(f"the container's environment sets {ENV} twice, to two images")
    if any(annotations.get(kind) == "sandbox" and _is_one_of(annotations.get(own), ids)
           for kind, own in SANDBOX):  # fmt: skip
        return None  # the pod's own (pause) container: the pod's annotations reach it too
    if ANNOTATION in annotations:
        value = annotations[ANNOTATION]
        if not isinstance(value, str):
            raise Refused(f"the annotation {ANNOTATION} is not a string")
        named[f"annotation {ANNOTATION}"] = value
    if len(set(named.values())) > 1:
        raise Refused(f"the annotation {ANNOTATION} and the environment variable {ENV} name two"
                      " different images: give one")  # fmt: skip
    if not named:
        if _placeholder(process, env):  # the real runtime would fail on a missing entrypoint
            raise Refused(_names_no_image(annotations, env))
        return None
    (source, image), *_ = named.items()
    if not image:
        raise Refused(f"the container's {source} is empty: name an image directory or docker://REF")
    return image


def _placeholder(process: dict[str, Any], env: list[str]) -> bool:
    """Whether the container is made from the placeholder: one of its markers is left (the user
    may have given the others). (image/markers.py, imported here: under emulation each module
    a pass-through loads costs its `state` or `start` ~0.1 s, figure 12.)"""
    from cryptlayer.image import markers

    args = process.get("args")
    first = args[0] if isinstance(args, list) and args else None
    return (first == markers.ENTRYPOINT or process.get("cwd") == markers.WORKDIR
            or markers.PATH_ENV in env)  # fmt: skip


def _names_no_image(annotations: dict[str, Any], env: list[str]) -> str:
    """The refusal of a placeholder that names no image, with a name that looks like the one
    (another case, a typo, a space or an invisible character in it) if there is one."""

    def near(name: str, exact: tuple[str, ...]) -> bool:
        squashed = "".join(c for c in name.casefold() if c.isascii() and c.isalnum())
        return "cryptlayer" in squashed and name not in exact

    names = [f"annotation {name}" for name in annotations if near(name, OTHER_ANNOTATIONS)]
    names += [f"environment variable {key}" for key in (e.partition("=")[0] for e in env)
              if near(key, OTHER_ENV)]  # fmt: skip
    hint = f" (not {_printable(names[0])}: names are exact)" if names else ""
    return (f"the container is made from cryptlayer's placeholder image but names no encrypted"
            f" image{hint}: give the annotation {ANNOTATION}=IMAGE (podman --annotation, a pod's"
            f" annotations) or the environment variable {ENV}=IMAGE (docker run -e)")  # fmt: skip


def _is_one_of(value: object, ids: Sequence[str]) -> bool:
    return isinstance(value, str) and bool(value) and value in ids


def _shown(bundle: str, config_name: str) -> str:
    return _printable(os.path.join(bundle, config_name))


def _printable(text: str) -> str:
    from cryptlayer.errors import printable

    return printable(text)


def _read_config(bundle: str, config_name: str) -> dict[str, Any]:
    import errno
    import json

    from cryptlayer.errors import NotRegularError, UntrustedFileError
    from cryptlayer.fsutil import open_regular, read_regular

    shown = _shown(bundle, config_name)
    try:
        dir_fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}  # names nothing: the runtime says what is missing (and `create --help` works)
    except OSError as err:
        raise Refused(f"cannot open the bundle {_printable(bundle)}: {err.strerror}") from None
    try:
        fd = open_regular(config_name, dir_fd=dir_fd)
        data = read_regular(fd, MAX_CONFIG, shown)
    except FileNotFoundError:
        return {}
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise Refused(f"{shown} is a symbolic link: cryptlayer-runtime reads the bundle's own"
                          " file only") from None  # fmt: skip
        raise Refused(f"cannot read {shown}: {err.strerror}") from None
    except NotRegularError as err:  # (named as opened: config.json)
        raise Refused(f"{shown} is not a regular file ({err.kind})") from None
    except UntrustedFileError as err:
        raise Refused(err.message) from None
    finally:
        os.close(dir_fd)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key, value in pairs:
            if key in found:  # which one counts differs between parsers: refuse both
                raise ValueError(f"the key {_printable(key)!r} appears twice in one object")
            found[key] = value
        return found

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        spec = json.loads(data.decode(), object_pairs_hook=no_duplicates,
                          parse_constant=no_constant)  # fmt: skip
    except UnicodeDecodeError:
        raise Refused(f"{shown} is not UTF-8 text") from None
    except RecursionError:
        raise Refused(f"{shown} nests too deeply to be an OCI configuration") from None
    except ValueError as err:
        raise Refused(f"{shown} is not valid JSON: {_printable(str(err))}") from None
    if not isinstance(spec, dict):
        raise Refused(f"{shown} is not a JSON object")
    return spec


# -- the engine's containers that are cryptlayer's

# paths.state_root()'s and records_dir()'s, without importing paths on the way to a pass-through
ROOT_ENV = "CRYPTLAYER_ROOT"
ROOT_DEFAULT = "/var/lib/cryptlayer"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
NAME_PREFIX = "engine-"
SHORT_ID = 55  # ids up to this long are named as they are: at most 62 characters
HASHED = 20  # hex digits of the id's SHA-256 in a long id's name


def container_name(cid: str) -> str:
    """The cryptlayer name (state.check_name) of the engine's container `cid`: `engine-ID` for
    an id of at most SHORT_ID name characters; else `engine-PREFIX-HASH`, 63 characters (the
    id's first characters, then its SHA-256's first HASHED hex digits), a length no short id's
    name has. podman's, Docker's and the CRI's ids are 64 hex digits: the long form."""
    if len(cid) <= SHORT_ID and cid and set(cid) <= NAME_CHARS:
        return NAME_PREFIX + cid
    try:  # the small module of its own: hashlib loads OpenSSL, ~0.1 s of every delete in the VM
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # (an interpreter without it: 3.12 names it _sha2)
        from hashlib import sha256

    digest = sha256(cid.encode(errors="surrogateescape")).hexdigest()[:HASHED]
    prefix = "".join(c if c in NAME_CHARS else "-" for c in cid)
    room = 63 - len(NAME_PREFIX) - 1 - HASHED
    return f"{NAME_PREFIX}{prefix[:room].ljust(room, '-')}-{digest}"


def has_record(name: str) -> bool:
    """Whether cryptlayer holds a container named `name` (one stat: delete stays cheap)."""
    root = os.environ.get(ROOT_ENV, ROOT_DEFAULT)
    return os.path.exists(os.path.join(root, "containers", f"{name}.json"))


def create(runtime: str, argv: Sequence[str], invocation: Invocation, spec: dict[str, Any],
           image: str, config_path: str) -> NoReturn:  # fmt: skip
    """Assemble the image, point the bundle at it, then run the real runtime's `create` (or
    `run`) as a child: when it fails, or `run` ends (not detached, not --keep), the container is
    torn down again, as `delete` does. Exits with the runtime's status."""
    from cryptlayer.engine import encrypted

    cid = invocation.container_id()
    if not cid:
        raise Refused(f"`{invocation.command}` names no container id")
    if any(a.lstrip("-") == "no-new-keyring" for a in invocation.args):
        raise Refused("--no-new-keyring would give the container the runtime's keyring:"
                      " refused for an encrypted image")  # fmt: skip
    from cryptlayer.runtime.state import Holder

    holder = Holder(runtime, state_root(runtime, invocation.root), cid)
    warnings: list[str] = []  # shown once the create goes on: a failure is its one error line
    name = encrypted.assemble(spec, image, cid, config_path, holder=holder, warn=warnings.append)
    for line in warnings:
        warn(line, invocation)
    status = spawn(runtime, argv, original_environ())
    foreground = invocation.command == "run" and not any(
        a.lstrip("-") in ("d", "detach", "keep") for a in invocation.args)  # fmt: skip
    if status != 0 or foreground:
        encrypted.stop(name)
    leave(status)


# The real runtimes' state directories when the engine gives no --root (as root): where `gc`
# looks for the container (state.Holder).
DEFAULT_ROOTS = {"crun": "/run/crun", "runc": "/run/runc"}


def state_root(runtime: str, root: str | None) -> str:
    """The directory the real runtime keeps its containers in: the engine's --root, else the
    runtime's default; empty when unknown (another runtime: `gc` asks its `state`)."""
    if root:
        return os.path.abspath(root)
    return DEFAULT_ROOTS.get(os.path.basename(runtime), "")


def delete(runtime: str, argv: Sequence[str], invocation: Invocation, name: str) -> NoReturn:
    """The real runtime's `delete` as a child, then the container torn down (its image shredded
    unless kept), in a process that outlives this one if the engine kills it at a deadline
    (encrypted.stop_shielded; that teardown leaves a tombstone for the engine's next delete of
    the container, which this process removes when it answers itself). Also when the runtime no
    longer knows the container (`state` fails): an engine deletes what a failed create left, or
    asks again for a delete it killed. Exits with the runtime's status; 0 once a container the
    runtime no longer knew is torn down (crun's failure for an unknown container is not runc's
    `container does not exist`, the one containerd's shim takes for done: the CRI would ask
    again for ever)."""
    env = original_environ()
    status = spawn(runtime, argv, env, meanwhile=_load_teardown)
    from cryptlayer.engine import encrypted

    if status != 0:
        if _runtime_knows(runtime, invocation, env):
            sys.exit(status)  # still there (running, without --force): nothing to tear down yet
        status = 0  # gone from the runtime: deleted, once torn down below
    mark = tombstone(name)
    encrypted.stop_shielded(name, mark)
    _unlink(mark)  # answered here: the engine will not ask again
    leave(status)


def deleted_again(runtime: str, argv: Sequence[str], invocation: Invocation, name: str) -> NoReturn:
    """The engine's delete of a container whose teardown ended after the engine had killed the
    delete that began it (its tombstone says so; containerd's shim asks again only once that
    teardown has ended, as it reads the runtime's output to its end): the real runtime's delete,
    whose failure for a container it no longer knows is done; the tombstone removed."""
    env = original_environ()
    status = spawn(runtime, argv, env)
    if status != 0 and not _runtime_knows(runtime, invocation, env):
        status = 0
    _unlink(tombstone(name))
    sys.exit(status)


def leave(status: int) -> NoReturn:
    """Exit with `status` once a create or delete is done, without the interpreter's own
    teardown of the modules it loaded (a create's ~300: ~20 ms on a real CPU, about a second
    under emulation, figure 12): the standard streams flushed, then os._exit. Everything written
    is written by then (records and logs by os.write, the container's files atomically); locks
    are the descriptors', released by the kernel. A thread still running that the ordinary exit
    would wait for (none is, by then) gets the ordinary exit."""
    threading = sys.modules.get("threading")
    if threading is not None and any(not t.daemon and t is not threading.main_thread()
                                     for t in threading.enumerate()):  # fmt: skip
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _load_teardown() -> None:
    """Import what a teardown runs (encrypted.stop: the records, the journal, the tools that
    release devices), while the real runtime deletes the container: under emulation the imports
    take seconds, the runtime's delete most of one, and the two overlap (figure 12)."""
    from cryptlayer.engine import encrypted  # noqa: F401
    from cryptlayer.runtime import container  # noqa: F401


def spawn(runtime: str, argv: Sequence[str], env: dict[bytes, bytes],
          meanwhile: Callable[[], None] | None = None) -> int:  # fmt: skip
    """Run the real runtime as a child (its standard streams, console socket and inherited
    descriptors are ours), forwarding SIGINT, SIGTERM and SIGHUP; its exit status, or 128 + the
    signal that ended it, as a shell reports it. `meanwhile` runs while the child does (waited
    for even when `meanwhile` fails). _signal, not signal: nothing imported on the way."""
    import _signal

    defaults = (_signal.SIGPIPE, _signal.SIGXFSZ)
    pid = os.posix_spawn(runtime, [runtime, *argv], env, setsigdef=defaults)
    forwarded = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)

    def forward(signum: int, _frame: object) -> None:
        os.kill(pid, signum)

    previous = {s: _signal.signal(s, forward) for s in forwarded}
    try:
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            _, status = os.waitpid(pid, 0)
    finally:
        for s, handler in previous.items():
            _signal.signal(s, handler)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _runtime_knows(runtime: str, invocation: Invocation, env: dict[bytes, bytes]) -> bool:
    """Whether the real runtime still has the container (its `state` succeeds)."""
    import subprocess

    cid = invocation.container_id() or ""
    probe = subprocess.run([runtime, *invocation.globals(), "state", cid], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip
    return probe.returncode == 0


# An engine container's tombstone in RUNDIR (memory: a reboot ends the engine's retries too),
# named as no container directory is (a dot first): left by a teardown that outlived the delete
# the engine killed, for the delete it asks again (deleted_again), which removes it.
TOMBSTONE = ".engine-deleted."


def tombstone(name: str) -> str:
    return os.path.join(os.environ.get(RUNDIR_ENV, RUNDIR_DEFAULT), TOMBSTONE + name)


def _unlink(path: str) -> None:
    import contextlib

    with contextlib.suppress(OSError):
        os.unlink(path)


# -- errors, where the engine reads them


def fail(message: str, invocation: Invocation) -> NoReturn:
    """One `error:` line on stderr and, with --log, in the runtime's log in its --log-format
    (json: {"level":"error","msg":...,"time":...}, as runc and crun write it, whose last
    error line podman and containerd show); exit FAILED."""
    line = f"cryptlayer-runtime: {_printable(message)}"  # (one line, whatever a spec put in it)
    import contextlib

    with contextlib.suppress(OSError):  # descriptor 2 itself: closed at start, sys.stderr is None
        os.write(2, f"error: {line}\n".encode(errors="backslashreplace"))
    if invocation.log:
        _log(line, invocation)
    sys.exit(FAILED)


def warn(message: str, invocation: Invocation) -> None:
    """A warning at level "warning" in the runtime's log (--log), or, with no log file, a
    `warning:` line on stderr: what `cryptlayer run` warns about reaches the node's operator. Not
    both: the runtime's stderr at `create` is the container's own (runc's and crun's container
    inherits it: containerd's shim and conmon hand it the job's stdio), and a warning there
    would land in the job's output and logs. (At `create`, once the assembly succeeded.)"""
    line = f"cryptlayer-runtime: {message}"
    log = invocation.log or ""
    if log and not log.startswith(("journald:", "syslog:")):
        _log(line, invocation, "warning")
        return
    import contextlib

    with contextlib.suppress(OSError):
        os.write(2, f"warning: {line}\n".encode(errors="backslashreplace"))


def _log(message: str, invocation: Invocation, level: str = "error") -> None:
    import json
    import time

    log = invocation.log or ""
    if log.startswith(("journald:", "syslog:")):
        return  # crun's other destinations: stderr carries the line
    path = log.removeprefix("file:")
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    if invocation.log_format == "json":
        record = json.dumps({"level": level, "msg": message, "time": stamp})
    else:  # runc's text format (logrus)
        record = f'time="{stamp}" level={level} msg={json.dumps(message)}'
    try:
        # (non-blocking: a FIFO nobody reads is skipped, never waited on)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(path, flags, 0o644)
    except OSError:
        return
    try:
        os.write(fd, (record + "\n").encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> None:
    """Console entry point: `cryptlayer-runtime [GLOBAL OPTIONS] COMMAND [ARGS]`."""
    argv = sys.argv[1:]
    invocation = Invocation(argv)
    try:
        runtime = resolve(configured())
        if invocation.command in FROM_BUNDLE:
            bundle, config_name = invocation.bundle_config()
            spec = _read_config(bundle, config_name)
            image = named_image(spec, bundle, config_name, invocation.operands())
            if image is not None and invocation.command == "restore":
                raise Refused(f"the container names the encrypted image {_printable(image)}:"
                              " restoring a checkpoint of one is not available (its memory"
                              " would have been written to disk)")  # fmt: skip
            if image is not None:
                create(runtime, argv, invocation, spec, image,
                       os.path.join(bundle, config_name))  # fmt: skip
        elif invocation.command in ("delete", "checkpoint", "exec"):
            cid = invocation.container_id()
            name = container_name(cid) if cid else ""
            if name and invocation.command == "delete" and not has_record(name):
                if os.path.lexists(tombstone(name)):  # (one more lstat for a pass-through)
                    deleted_again(runtime, argv, invocation, name)
            elif name and has_record(name):
                if invocation.command == "exec":
                    process = invocation.process_file()
                    if process:  # then handed over by exec, below
                        from cryptlayer.engine import encrypted

                        encrypted.exec_process(name, process)
                elif invocation.command == "checkpoint":
                    raise Refused(f"the container {_printable(cid or '')} runs an encrypted"
                                  " image: a checkpoint would write its decrypted memory to"
                                  " disk")  # fmt: skip
                else:
                    delete(runtime, argv, invocation, name)
    except Refused as err:
        fail(str(err), invocation)
    except Exception as err:  # config.py's UsageError, and anything unforeseen: one line
        from cryptlayer.errors import CryptlayerError

        if isinstance(err, CryptlayerError):
            fail(str(err), invocation)
        fail(f"unexpected {type(err).__name__}: {_printable(str(err))} (a bug: please report it)",
             invocation)  # fmt: skip
    try:
        execute(runtime, argv)
    except OSError as err:
        fail(f"cannot run {runtime}: {err.strerror}", invocation)
