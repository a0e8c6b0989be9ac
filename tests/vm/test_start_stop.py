"""start / ps / stop / shred: a container assembled without running anything."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import MARKER_LOWER, Cli, keyslots

from cryptlayer.errors import ExitCode
from cryptlayer.paths import run_root


def mount_options() -> list[tuple[str, str]]:
    """(file system, mount options) of each of cryptlayer's mounts, in mount order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if Path(fields[4]).is_relative_to(run_root()):
            found.append((fields[fields.index("-") + 1], fields[5]))
    return found


def test_start_ps_stop_keep_then_shred(cli: Cli, image: Path, key_file: Path) -> None:
    rootfs = Path(
        cli.ok("start", "--key-file", str(key_file), "--name", "job1", "--keep", str(image)).strip()
    )
    assert (rootfs / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
    assert (rootfs / "bin/busybox").is_file()
    (rootfs / "written").write_text("scratch")  # the overlay is writable
    assert mount_options() == [  # as the kernel took them (mount(2), from option lists)
        ("ext4", "ro,nosuid,nodev,noatime"),  # the two layers
        ("ext4", "ro,nosuid,nodev,noatime"),
        ("ext4", "rw,nosuid,nodev,noatime"),  # the scratch volume
        ("overlay", "rw,nodev,relatime"),  # the root file system
    ]
    rows = json.loads(cli.ok("ps", "--json"))
    assert [(r["name"], r["status"], r["layers"]) for r in rows] == [("job1", "assembled", 2)]
    assert rows[0]["rootfs"] == str(rootfs)

    code, _, err = cli("start", "--key-file", str(key_file), "--name", "job1", str(image))
    assert code == ExitCode.BUSY
    assert (
        err
        == "error: a container named 'job1' already exists: choose another --name, or `cryptlayer stop job1` first\n"
    )

    cli.ok("stop", "job1")
    assert not rootfs.exists()
    assert json.loads(cli.ok("ps", "--json")) == []
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [1, 1]  # --keep
    info = json.loads(cli.ok("inspect", "--json", str(image)))
    assert info["state"] == "intact"

    code, _, err = cli("stop", "job1")
    assert code == ExitCode.USAGE
    assert err == "error: no container named 'job1': see `cryptlayer ps` for the names\n"

    cli.ok("shred", str(image))
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [0, 0]
    info = json.loads(cli.ok("inspect", "--json", str(image)))
    assert info["state"] == "erased"
    assert [layer["state"] for layer in info["layers"]] == ["erased", "erased"]


def test_erased_at_start_unless_keep(cli: Cli, image: Path, key_file: Path) -> None:
    rootfs = Path(
        cli.ok("start", "--key-file", str(key_file), "--name", "job2", str(image)).strip()
    )
    # Erased on disk as soon as it is assembled: a crash from now on leaves nothing openable...
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [0, 0]
    # ...while the open layers keep working (the kernel holds their keys).
    assert (rootfs / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
    cli.ok("stop", "job2")
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [0, 0]
    shown = cli.ok("inspect", str(image))
    assert "state:   erased\n" in shown
    assert "opens:   nobody (every keyslot is erased" in shown and "opens:   key:" not in shown


def test_busy_mount_at_stop_names_the_holder(cli: Cli, image: Path, key_file: Path) -> None:
    rootfs = cli.ok(
        "start", "--key-file", str(key_file), "--name", "busy", "--keep", str(image)
    ).strip()
    holder = subprocess.Popen(["sleep", "600"], cwd=rootfs)
    try:
        code, _, err = cli("stop", "busy")
        assert code == ExitCode.BUSY
        assert err.startswith(f"error: {rootfs} is busy: held by {holder.pid} (sleep)")
        assert json.loads(cli.ok("ps", "--json"))[0]["name"] == "busy"  # still recorded
        cli.ok("stop", "--force", "busy")  # like tomb slam: the holder is killed
        assert holder.wait(timeout=30) == -9
    finally:
        holder.kill()
        holder.wait()


def test_flash_storage_is_warned_about(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """A RAM disk (brd) says it is not rotational, as SSDs do: erasing in place may not hold."""
    subprocess.run(["modprobe", "brd", "rd_nr=1", "rd_size=65536"], check=True)
    mnt = tmp_path / "flash"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "/dev/ram0"], check=True)
        subprocess.run(["mount", "/dev/ram0", str(mnt)], check=True)
        subprocess.run(["cp", "-a", str(image), str(mnt / "img")], check=True)
        code, _out, err = cli(
            "start", "--key-file", str(key_file), "--name", "ssd", str(mnt / "img")
        )
        assert code == 0, err
        assert err.startswith(
            f"warning: {mnt / 'img'} is on flash storage (device 1:0 is not rotational):"
            " wear levelling may keep old copies of the erased keyslots"
        )
        cli.ok("stop", "ssd")
        code, _, err = cli("start", "--key-file", str(key_file), "--name", "x", str(image))
        assert (code, err) == (0, "")  # the virtio scratch disk says it spins: no warning
        cli.ok("stop", "x")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["rmmod", "brd"], check=False)


def test_a_mapping_in_use_is_not_removed_and_a_gone_one_is_no_error(
    cli: Cli, image: Path, key_file: Path
) -> None:
    """Mappings close by DM_DEV_REMOVE (tools/devmapper.py), not `cryptsetup close`: one that
    another mapping sits on stays, with a BusyError; one already gone is no error."""
    import pytest

    from cryptlayer.errors import BusyError
    from cryptlayer.tools import devmapper, udev

    cli.ok("start", "--key-file", str(key_file), "--name", "held", str(image))  # erased at start
    try:
        verity = [m for m in udev.mappings("cryptlayer--") if m.endswith("-verity")]
        assert len(verity) == 2  # one per layer, each under its layer's LUKS mapping
        with pytest.raises(BusyError, match="is still in use"):
            devmapper.remove(verity[0])
        assert verity[0] in udev.mappings("cryptlayer--")
    finally:
        cli.ok("stop", "held")
    assert udev.mappings("cryptlayer-") == []
    devmapper.remove(verity[0])  # gone already


def test_an_overlay_of_128_layers_fits_by_name(tmp_path: Path) -> None:
    """The kernel takes one page of mount options: 128 layers (manifest.MAX_LAYERS) fit only
    when named from their directory, as assembly names them."""
    from cryptlayer.image.manifest import MAX_LAYERS
    from cryptlayer.tools import mount

    base = tmp_path / ("layers-" + "d" * 40)
    for i in range(MAX_LAYERS):
        (base / f"layer{i}").mkdir(parents=True)
        (base / f"layer{i}" / f"from-{i}").write_text(str(i))
    target = tmp_path / "root"
    target.mkdir()
    names = [f"layer{i}" for i in reversed(range(MAX_LAYERS))]
    absolute = ":".join(str(base / n) for n in names)
    with pytest.raises(mount.MountError, match="the kernel takes 4095"):
        mount.mount("t", target, "overlay", [f"lowerdir={absolute}", "ro"])
    mount.mount("t", target, "overlay", [f"lowerdir={':'.join(names)}", "ro"], cwd=base)
    try:
        assert len(list(target.iterdir())) == MAX_LAYERS
        assert (target / "from-0").read_text() == "0"
    finally:
        mount.umount(target)
    assert Path.cwd() != base
