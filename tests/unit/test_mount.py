"""tools/mount.py: the mount table and mount(2)'s limits."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_mount_table_finds_the_innermost_mount() -> None:
    from cryptlayer.tools import mount

    assert mount.containing(Path("/proc/self")).fstype == "proc"
    assert mount.containing(Path("/")).target == Path("/")


def test_mount_data_longer_than_the_kernel_takes_is_refused(tmp_path: Path) -> None:
    """mount(2) copies one page of options: a longer lowerdir list is an error: line, not a
    silently cut one (refused before any system call, so no root needed)."""
    from cryptlayer.tools import mount

    lowers = ":".join(f"/run/cryptlayer/.images/{'f' * 64}/layer{i}" for i in range(60))
    with pytest.raises(mount.MountError) as err:
        mount.mount("cryptlayer", tmp_path, "overlay", [f"lowerdir={lowers}", "nodev"])
    assert str(err.value).startswith(f"cannot mount {tmp_path}: its overlay options are ")
    assert err.value.hint == "use an image with fewer layers"
