"""runtime/seccomp.py: the container's seccomp profile."""

from __future__ import annotations

from cryptlayer.runtime import seccomp


def test_seccomp_is_podmans_profile_without_the_keyring() -> None:
    profile = seccomp.load_profile()
    rules = seccomp.oci_seccomp(profile, ["CAP_CHOWN"], machine="x86_64")
    assert rules["defaultAction"] == profile["defaultAction"]
    assert rules["architectures"][0] == "SCMP_ARCH_X86_64"
    allowed = {n for r in rules["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert {"read", "write", "execve", "arch_prctl"} <= allowed
    assert not allowed & {"keyctl", "add_key", "request_key", "bpf", "init_module"}
    assert {"names": ["keyctl", "add_key", "request_key"], "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1} in rules["syscalls"]  # fmt: skip
    admin = seccomp.oci_seccomp(profile, ["CAP_SYS_ADMIN"], machine="x86_64")
    assert "bpf" in {n for r in admin["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
                     for n in r["names"]}  # fmt: skip
