"""runtime/ocispec.py: the runtime's config.json, the user and the command it runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cryptlayer.errors import (
    CannotInvokeError,
    CommandNotFoundError,
    ExitCode,
    UsageError,
)
from cryptlayer.image.manifest import ImageConfig
from cryptlayer.image.process import Network, Overrides
from cryptlayer.runtime.ocispec import check_command, resolve_user, runtime_config


def test_resolve_user_in_container_files(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home:/bin/sh\n"
    )
    (tmp_path / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    assert resolve_user(tmp_path, "") == (0, 0)
    assert resolve_user(tmp_path, "app") == (1000, 1001)
    assert resolve_user(tmp_path, "app:staff") == (1000, 50)
    assert resolve_user(tmp_path, "7:8") == (7, 8)
    with pytest.raises(UsageError, match="not in the container's /etc/passwd"):
        resolve_user(tmp_path, "ghost")


def test_resolve_user_ignores_passwd_symlinked_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("evil:x:0:0::/:/bin/sh\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").symlink_to(outside)
    with pytest.raises(UsageError):
        resolve_user(root, "evil")


def test_runtime_config_overrides(tmp_path: Path) -> None:
    cfg = ImageConfig(cmd=("sh",), env=("A=1",), workdir="/srv")
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/id").write_bytes(b"")
    (tmp_path / "usr/bin/id").chmod(0o755)
    doc = runtime_config(tmp_path, "n", cfg, Overrides(("id",), ("A=2",), "/tmp", "5:6"))
    assert doc["process"]["args"] == ["id"]
    assert "A=2" in doc["process"]["env"]
    assert doc["process"]["cwd"] == "/tmp"
    assert doc["process"]["user"] == {"uid": 5, "gid": 6}
    assert doc["root"]["path"] == str(tmp_path)


def test_check_command_finds_what_crun_would_run(tmp_path: Path) -> None:
    """crun reports a command missing from the image, or not executable, as its own exit 1,
    which run passed on as if the job had exited 1: refused before the container starts, 127
    and 126 as podman's."""
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    for name, mode in [("tool", 0o755), ("data", 0o644)]:
        (tmp_path / "usr/bin" / name).write_bytes(b"")
        (tmp_path / "usr/bin" / name).chmod(mode)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/job").write_bytes(b"")
    (tmp_path / "srv/job").chmod(0o700)
    env = ["PATH=/nowhere:/bin"]
    check_command(tmp_path, "tool", env, "/")  # through the image's own /bin symlink
    check_command(tmp_path, "/usr/bin/tool", env, "/")
    check_command(tmp_path, "./job", env, "/srv")
    with pytest.raises(CommandNotFoundError) as missing:
        check_command(tmp_path, "nosuch", env, "/")
    assert missing.value.exit_code == ExitCode.NOT_FOUND == 127
    assert str(missing.value) == (
        "the container's command 'nosuch' is not in the image (looked up in its PATH):"
        " give a command the image holds: IMAGE COMMAND [ARG...]"
    )
    with pytest.raises(CommandNotFoundError):
        check_command(tmp_path, "tool", ["PATH=/sbin"], "/")  # the container's PATH, not ours
    with pytest.raises(
        CommandNotFoundError, match=re.escape("'/etc/../../x' is not in the image:")
    ):
        check_command(tmp_path, "/etc/../../x", env, "/")
    with pytest.raises(CannotInvokeError, match="'data' cannot be run: it is not executable"):
        check_command(tmp_path, "data", env, "/")
    with pytest.raises(CannotInvokeError, match="'/srv' cannot be run: it is a directory") as err:
        check_command(tmp_path, "/srv", env, "/")
    assert err.value.exit_code == ExitCode.CANNOT_INVOKE == 126


def test_passwd_fifo_and_symlink_out(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    os.mkfifo(tmp_path / "etc/passwd")
    with pytest.raises(UsageError, match="the container's /etc/passwd is not a regular file"):
        resolve_user(tmp_path, "app")
    (tmp_path / "etc/passwd").unlink()
    (tmp_path / "etc/passwd").symlink_to("../../../../../etc/passwd")  # root's own, outside
    with pytest.raises(UsageError, match="not in the container's /etc/passwd"):
        resolve_user(tmp_path, "root")
    (tmp_path / "etc/passwd").unlink()
    (tmp_path / "etc/real").write_text("app:x:7:8::/:/bin/sh\n")
    (tmp_path / "etc/passwd").symlink_to("/etc/real")  # absolute, resolved inside the root
    assert resolve_user(tmp_path, "app") == (7, 8)
    with pytest.raises(UsageError, match="not in the container's /etc/passwd"):
        resolve_user(tmp_path, "²")  # str.isdigit() says yes; int() would take it as 2


def test_runtime_config_is_confined(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/sh").write_bytes(b"")
    (tmp_path / "bin/sh").chmod(0o755)
    doc = runtime_config(tmp_path, "n", ImageConfig(cmd=("sh",)), Overrides())
    process, linux = doc["process"], doc["linux"]
    assert process["noNewPrivileges"] is True
    assert {"type": "RLIMIT_CORE", "hard": 0, "soft": 0} in process["rlimits"]
    assert {"type": "network"} in linux["namespaces"]
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    allowed = {(d["type"], d["major"], d.get("minor")) for d in linux["resources"]["devices"][1:]}
    assert ("c", 1, 3) in allowed and ("b", 7, 0) not in allowed and len(allowed) == 9
    assert linux["resources"]["pids"] == {"limit": 2048}
    assert "/proc/keys" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    assert all(m["destination"] not in ("/etc/hosts", "/etc/resolv.conf") for m in doc["mounts"])
    host = runtime_config(tmp_path, "n", ImageConfig(cmd=("sh",)), Overrides(network=Network.HOST))
    assert {"type": "network"} not in host["linux"]["namespaces"]
