"""The OCI runtime config (config.json) of a container run by `run`: the image's process
(image/process.py) confined as podman confines one."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from cryptlayer.errors import CannotInvokeError, CommandNotFoundError, UsageError, printable
from cryptlayer.fsutil import UntrustedFileError, kind, open_in_root, read_regular
from cryptlayer.image.manifest import ImageConfig
from cryptlayer.image.process import DEFAULT_PATH, Network, Overrides, merge_env, process_args

# podman's default capability set
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
]  # fmt: skip
# containers-common's DefaultMaskedPaths and DefaultReadOnlyPaths (podman's defaults)
MASKED_PATHS = [
    "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/sched_debug",
    "/proc/scsi", "/proc/timer_list", "/proc/timer_stats", "/sys/dev/block",
    "/sys/devices/virtual/powercap", "/sys/firmware", "/sys/fs/selinux", "/proc/interrupts",
]  # fmt: skip
READONLY_PATHS = [
    "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]  # fmt: skip
# The devices a container may use (the OCI runtime creates these in its /dev tmpfs): everything
# else is denied by the device cgroup, whatever nodes the image carries.
ALLOWED_DEVICES = [
    ("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),  # null zero full (u)random
    ("c", 5, 0), ("c", 5, 1), ("c", 5, 2), ("c", 136, None),  # tty console ptmx pts/*
]  # fmt: skip
PIDS_LIMIT = 2048  # podman's default pids_limit
MAX_DB_BYTES = 4 << 20  # the container's /etc/passwd or /etc/group


def check_command(rootfs: Path, program: str, env: list[str], cwd: str) -> None:
    """Refuse, before the container starts, a command that is not in the image (exit 127) or
    that cannot be executed there (126), as podman does: `crun run` reports both as its own
    exit status 1, which `run` could not tell from the container's. Looked up as crun does:
    a name with a slash from `cwd`, any other in each directory of the container's PATH."""
    if "/" in program:
        candidates = [os.path.join(cwd, program)]
    else:
        path = next((e[5:] for e in reversed(env) if e.startswith("PATH=")), "")
        candidates = [os.path.join(d or ".", program) for d in path.split(":") if d]
        candidates = [c if c.startswith("/") else os.path.join(cwd, c) for c in candidates]
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        modes = [mode for c in candidates if (mode := _mode_in_root(root_fd, c)) is not None]
    finally:
        os.close(root_fd)
    if any(stat.S_ISREG(m) and m & 0o111 for m in modes):
        return
    shown = printable(program)
    if not modes:
        where = "" if "/" in program else " (looked up in its PATH)"
        raise CommandNotFoundError(
            f"the container's command {shown!r} is not in the image{where}",
            "give a command the image holds: IMAGE COMMAND [ARG...]",
        )
    what = "not executable" if stat.S_ISREG(modes[0]) else kind(modes[0])
    raise CannotInvokeError(
        f"the container's command {shown!r} cannot be run: it is {what}",
        "give a program the image can run: IMAGE COMMAND [ARG...]",
    )


def _mode_in_root(root_fd: int, path: str) -> int | None:
    """The mode of what `path` names inside the container (its symlinks followed in there),
    or None if nothing."""
    try:
        fd = open_in_root(root_fd, path)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mode
    finally:
        os.close(fd)


def _read_db(rootfs: Path, db: str) -> list[str]:
    """The lines of the container's /etc/passwd or /etc/group, resolved inside the container
    (its symlinks cannot lead out), refused unless a regular file of sane size: the image's."""
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_in_root(root_fd, f"/etc/{db}")
    except OSError:
        return []  # absent, or not reachable inside the container
    finally:
        os.close(root_fd)
    try:
        data = read_regular(fd, MAX_DB_BYTES, f"the container's /etc/{db}")
    except UntrustedFileError as err:
        raise UsageError(str(err), "use a numeric UID[:GID]") from None
    return data.decode("utf-8", errors="replace").splitlines()


def _lookup(rootfs: Path, db: str, name: str, field: int) -> int | None:
    """Field `field` of entry `name` in the container's /etc/passwd or /etc/group."""
    for line in _read_db(rootfs, db):
        parts = line.split(":")
        if len(parts) > field and parts[0] == name and _is_id(parts[field]):
            return int(parts[field])
    return None


def _is_id(text: str) -> bool:
    """A uid or gid: ASCII digits (str.isdigit takes '²'), at most 2^32 - 2."""
    return text.isascii() and text.isdigit() and int(text) < 0xFFFFFFFF


def resolve_user(rootfs: Path, user: str) -> tuple[int, int]:
    """USER[:GROUP], names or numbers, resolved in the container's own passwd and group files."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    uid = int(name) if _is_id(name) else _lookup(rootfs, "passwd", name, 2)
    if uid is None:
        raise UsageError(
            f"user {name!r} is not in the container's /etc/passwd", "use a numeric UID"
        )
    if group:
        gid = int(group) if _is_id(group) else _lookup(rootfs, "group", group, 2)
        if gid is None:
            raise UsageError(
                f"group {group!r} is not in the container's /etc/group", "use a numeric GID"
            )
    else:
        gid = _lookup(rootfs, "passwd", name, 3) if not _is_id(name) else None
        gid = 0 if gid is None else gid
    return uid, gid


def runtime_config(
    rootfs: Path,
    hostname: str,
    config: ImageConfig,
    overrides: Overrides,
) -> dict[str, Any]:
    """A complete OCI runtime config.json document, confined as podman confines by default:
    its capabilities, seccomp profile, masked and read-only paths and pids limit; no new
    privileges; a device cgroup that allows only the standard devices; no core dumps; a network
    namespace of its own unless `overrides.network` is host."""
    from cryptlayer.runtime.seccomp import load_profile, oci_seccomp

    uid, gid = resolve_user(rootfs, overrides.user if overrides.user is not None else config.user)
    env = merge_env(
        (DEFAULT_PATH, f"HOSTNAME={hostname}", "container=cryptlayer"), config.env, overrides.env
    )
    if not any(e.startswith("HOME=") for e in env):
        env.append("HOME=/root" if uid == 0 else "HOME=/")
    caps = CAPABILITIES if uid == 0 else []
    seccomp = oci_seccomp(load_profile(), caps)
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip
    namespaces = ["pid", "ipc", "uts", "mount", "cgroup", "network"]
    # The host's name resolution only where the container shares the host's network.
    host_files: tuple[str, ...] = ()
    if overrides.network is Network.HOST:
        namespaces.remove("network")
        host_files = ("/etc/resolv.conf", "/etc/hosts")
    for host_file in host_files:
        if Path(host_file).is_file():
            mounts.append({"destination": host_file, "type": "bind", "source": host_file,
                           "options": ["rbind", "ro", "nosuid", "nodev"]})  # fmt: skip
    args = process_args(config, overrides.command)
    cwd = overrides.workdir or config.workdir or "/"
    check_command(rootfs, args[0], env, cwd)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,  # our stdio passes through (run -i for stdin)
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},  # a crash writes no plaintext
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in namespaces],
            "resources": {
                "devices": [
                    {"allow": False, "access": "rwm"},
                    *(
                        {"allow": True, "type": t, "major": major, "access": "rwm"}
                        | ({} if minor is None else {"minor": minor})
                        for t, major, minor in ALLOWED_DEVICES
                    ),
                ],
                "pids": {"limit": PIDS_LIMIT},
            },
            "seccomp": seccomp,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }
