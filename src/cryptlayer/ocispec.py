"""The OCI runtime config (config.json) for a container, from the image config and overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .manifest import ImageConfig

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# podman's default capability set
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
]  # fmt: skip


@dataclass(frozen=True)
class Overrides:
    """What `run` may change of the image's default process (podman's -e, -w, -u)."""

    command: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None


def process_args(config: ImageConfig, command: tuple[str, ...]) -> list[str]:
    """Entrypoint + (command or Cmd), as podman does; UsageError if that is empty."""
    args = [*config.entrypoint, *(command or config.cmd)]
    if not args:
        raise UsageError(
            "the image has no default command",
            "give one after the image: IMAGE -- COMMAND [ARG...]",
        )
    return args


def merge_env(*layers: tuple[str, ...]) -> list[str]:
    """KEY=VALUE lists merged left to right; later ones win."""
    merged: dict[str, str] = {}
    for env in layers:
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"invalid environment entry {item!r}", "use KEY=VALUE")
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def _lookup(rootfs: Path, db: str, name: str, field: int) -> int | None:
    """Field `field` of entry `name` in the container's /etc/passwd or /etc/group."""
    path = rootfs / "etc" / db
    real = Path(os.path.realpath(path))
    if rootfs.resolve() not in real.parents:
        return None  # a symlink leading out of the container: not ours to read
    try:
        lines = real.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":")
        if len(parts) > field and parts[0] == name and parts[field].isdigit():
            return int(parts[field])
    return None


def resolve_user(rootfs: Path, user: str) -> tuple[int, int]:
    """USER[:GROUP], names or numbers, resolved in the container's own passwd and group files."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else _lookup(rootfs, "passwd", name, 2)
    if uid is None:
        raise UsageError(
            f"user {name!r} is not in the container's /etc/passwd", "use a numeric UID"
        )
    if group:
        gid = int(group) if group.isdigit() else _lookup(rootfs, "group", group, 2)
        if gid is None:
            raise UsageError(
                f"group {group!r} is not in the container's /etc/group", "use a numeric GID"
            )
    else:
        gid = _lookup(rootfs, "passwd", name, 3) if not name.isdigit() else None
        gid = 0 if gid is None else gid
    return uid, gid


def runtime_config(
    rootfs: Path,
    hostname: str,
    config: ImageConfig,
    overrides: Overrides,
    *,
    terminal: bool = False,
) -> dict[str, Any]:
    """A complete OCI runtime config.json document."""
    uid, gid = resolve_user(rootfs, overrides.user if overrides.user is not None else config.user)
    env = merge_env(
        (DEFAULT_PATH, f"HOSTNAME={hostname}", "container=cryptlayer"), config.env, overrides.env
    )
    if not any(e.startswith("HOME=") for e in env):
        env.append("HOME=/root" if uid == 0 else "HOME=/")
    caps = CAPABILITIES if uid == 0 else []
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
    for host_file in ("/etc/resolv.conf", "/etc/hosts"):
        if Path(host_file).is_file():
            mounts.append({"destination": host_file, "type": "bind", "source": host_file,
                           "options": ["rbind", "ro", "nosuid", "nodev"]})  # fmt: skip
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": uid, "gid": gid},
            "args": process_args(config, overrides.command),
            "env": env,
            "cwd": overrides.workdir or config.workdir or "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            # The host's network (like `podman run --network host`); everything else is private.
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/asound",
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
