"""runtime/hostcheck.py: what on the host may keep plaintext or defeat an erase."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirunner import invoke

from cryptlayer.errors import ExitCode
from cryptlayer.runtime import hostcheck


def _fake_sysfs(root: Path, device: str, rotational: str) -> Path:
    queue = root / "dev/block" / device / "queue"
    queue.mkdir(parents=True)
    (queue / "rotational").write_text(f"{rotational}\n")
    return root


def test_erase_caveat_names_flash_storage(tmp_path: Path) -> None:
    from cryptlayer.runtime.hostcheck import erase_caveat
    from cryptlayer.tools import mount

    where = mount.containing(tmp_path)
    flash = _fake_sysfs(tmp_path / "flash", where.device, "0")
    disk = _fake_sysfs(tmp_path / "disk", where.device, "1")
    if where.fstype in ("btrfs", "zfs", "bcachefs", "f2fs", "nilfs2"):
        pytest.fail(f"this test needs tmp_path off copy-on-write storage, not {where.fstype}")
    caveat = erase_caveat(tmp_path, sysfs=flash)
    assert caveat is not None and caveat.startswith(
        f"{tmp_path} is on flash storage (device {where.device} is not rotational)"
    )
    assert erase_caveat(tmp_path, sysfs=disk) is None


def test_erase_caveat_names_copy_on_write_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptlayer.runtime import hostcheck
    from cryptlayer.tools import mount

    # No btrfs on this host: the mount table's answer is the one thing faked.
    monkeypatch.setattr(mount, "containing", lambda _p: mount.Mounted(tmp_path, "btrfs", "0:99"))
    caveat = hostcheck.erase_caveat(tmp_path)
    assert caveat is not None and "is on btrfs, which writes changes to new blocks" in caveat


def _fake_host(tmp_path: Path, swaps: str, core: str) -> tuple[Path, Path]:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n" + swaps)
    (proc / "sys/kernel/core_pattern").write_text(core)
    for name, uuid, slave in (("dm-0", "CRYPT-PLAIN-x", None), ("dm-1", "LVM-y", "dm-0"),
                              ("loop0", None, None), ("zram0", None, None)):  # fmt: skip
        block = sys / "devices/virtual/block" / name
        (block / "slaves").mkdir(parents=True)
        if uuid:
            (block / "dm").mkdir()
            (block / "dm/uuid").write_text(uuid + "\n")
        if slave:
            (block / "slaves" / slave).symlink_to(sys / "devices/virtual/block" / slave)
        (sys / "class/block").mkdir(parents=True, exist_ok=True)
        (sys / "class/block" / name).symlink_to(block)
    (sys / "devices/virtual/block/zram0/backing_dev").write_text("/dev/sdb1\n")
    return proc, sys


def test_hostcheck_finds_what_may_write_plaintext(tmp_path: Path) -> None:
    swaps = ("/dev/dm-1 partition 1 0 -2\n/dev/loop0 partition 1 0 -3\n"
             "/dev/zram0 partition 1 0 100\n")  # fmt: skip
    proc, sys = _fake_host(tmp_path, swaps, "/var/crash/core.%p\n")
    assert hostcheck.problems(proc, sys) == [
        hostcheck.Problem("swap", "swap /dev/loop0 is not on dm-crypt"),
        hostcheck.Problem("zram-writeback", "zram swap /dev/zram0 writes idle pages to /dev/sdb1"),
        hostcheck.Problem(
            "core-pattern", "core_pattern '/var/crash/core.%p' writes core dumps to files"
        ),
    ]
    proc, sys = _fake_host(tmp_path / "ok", "/dev/dm-1 partition 1 0 -2\n", "|/bin/false\n")
    assert hostcheck.problems(proc, sys) == []  # LVM on dm-crypt; a pipe handler


def test_start_checks_the_host_before_opening_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        hostcheck,
        "problems",
        lambda: [hostcheck.Problem("swap", "swap /dev/sdb2 is not on dm-crypt")],
    )
    key = tmp_path / "k"
    invoke("keygen", str(key))
    code, _, err = invoke("start", "--strict", "--name", "c", "-k", str(key), str(tmp_path))
    assert code == ExitCode.USAGE
    assert err == ("error: this host may write decrypted memory to disk: swap /dev/sdb2 is not on"
                   " dm-crypt: encrypt swap (or swapoff), pipe core dumps to a handler that drops"
                   " them, or leave out --strict (docs/threat-model.md)\n")  # fmt: skip
