"""The container's seccomp filter: containers-common's default profile, as podman applies it.

Debian ships the profile podman uses (golang-github-containers-common, /usr/share/containers/
seccomp.json) in the moby format: syscall rules guarded by architectures and capabilities. This
turns it into the OCI runtime's `linux.seccomp` for this machine's architecture and the
container's capabilities, as containers/common's seccomp package does: a rule applies when every
capability it `includes` is held and none it `excludes` is.

One deliberate difference: the kernel keyring syscalls (`keyctl`, `add_key`, `request_key`) are
refused, as moby's default profile refuses them. Debian's containers-common allows `keyctl`
(podman counts on crun's fresh session keyring), but without a user namespace the container's
root is the host's uid 0, and its user keyring (`@u`) is the host root's: where README's
`--keyring` workflow keeps the image key.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from cryptlayer.errors import MissingToolError, UsageError

PROFILE = Path("/usr/share/containers/seccomp.json")
KEYRING_SYSCALLS = ("keyctl", "add_key", "request_key")
EPERM = 1
PACKAGE = "golang-github-containers-common"
# platform.machine() -> (the profile's architecture name, Go's name used in "arches" rules)
ARCHES = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
}


def profile_path() -> Path:
    """$CRYPTLAYER_SECCOMP_PROFILE (tests), else the profile containers-common installs."""
    return Path(os.environ.get("CRYPTLAYER_SECCOMP_PROFILE", str(PROFILE)))


def load_profile(path: Path | None = None) -> dict[str, Any]:
    """The moby-format profile; MissingToolError naming the package when it is not installed."""
    path = path or profile_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingToolError(
            f"the default seccomp profile {path} is missing",
            f"install it (apt-get install {PACKAGE}) and try again",
        ) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the seccomp profile {path}: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("syscalls"), list):
        raise UsageError(f"{path} is not a seccomp profile", f"reinstall {PACKAGE}")
    return raw


def oci_seccomp(
    profile: dict[str, Any], capabilities: list[str], machine: str | None = None
) -> dict[str, Any]:
    """`linux.seccomp` of an OCI config, for `capabilities` on `machine` (default: this one)."""
    arch, goarch = ARCHES.get(machine or platform.machine(), (None, None))
    architectures: list[str] = []
    for entry in profile.get("archMap") or []:
        if arch is not None and entry.get("architecture") == arch:
            architectures = [arch, *entry.get("subArchitectures", [])]
    held = set(capabilities)
    syscalls = []
    for rule in profile["syscalls"]:
        includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
        if includes.get("arches") and goarch not in includes["arches"]:
            continue
        if goarch in (excludes.get("arches") or []):
            continue
        if not held.issuperset(includes.get("caps") or []):
            continue
        if held.intersection(excludes.get("caps") or []):
            continue
        names = [n for n in rule["names"] if n not in KEYRING_SYSCALLS]
        if not names:
            continue
        out: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            out["args"] = [
                {k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a}
                for a in rule["args"]
            ]
        syscalls.append(out)
    refused = {"names": list(KEYRING_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}
    syscalls.append(refused)
    seccomp: dict[str, Any] = {
        "defaultAction": profile["defaultAction"],
        "architectures": architectures,
        "syscalls": syscalls,
    }
    if profile.get("defaultErrnoRet") is not None:
        seccomp["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return seccomp
