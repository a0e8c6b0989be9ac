"""Device discovery through sysfs and udev: what cryptlayer has mapped and attached.

What is mapped and attached is read from sysfs directly (/sys/class/block: what pyudev's
enumeration reads too): a teardown asks it, and pyudev with its ctypes and libudev costs a
process ~10 ms on a real CPU and most of a second under emulation (docs/benchmarks/NOTES.md,
figures 11 and 12). pyudev is loaded only to wait on udev's events (wait_for_node).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BlockDevice:
    """A loop or device-mapper node as the kernel reports it."""

    node: str
    dm_name: str | None
    backing_file: str | None
    dm_uuid: str | None = None


_local = threading.local()


def _context() -> Any:
    """This thread's udev context (libudev's are not to be shared between threads). Made once:
    pyudev finds libudev through ctypes.util.find_library, which runs `ldconfig -p` each time."""
    context = getattr(_local, "context", None)
    if context is None:
        import pyudev

        context = _local.context = pyudev.Context()
    return context


SYS_BLOCK = "/sys/class/block"


def block_devices() -> list[BlockDevice]:
    """Every loop and dm block device, with its dm name and loop backing file."""
    try:
        names = sorted(os.listdir(SYS_BLOCK))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not (name.startswith("dm-") or name.startswith("loop")):
            continue
        device = os.path.join(SYS_BLOCK, name)
        dm_name = _attr(device, "dm/name")
        backing = _attr(device, "loop/backing_file")
        if dm_name is None and backing is None:
            continue  # an unused loop device (or one gone since it was listed)
        node = f"/dev/{_devname(device) or name}"
        found.append(BlockDevice(node, dm_name, backing, _attr(device, "dm/uuid")))
    return found


def _attr(device: str, key: str) -> str | None:
    """A sysfs attribute of `device`, as libudev gives it (stripped); None if it has none, it is
    empty or not text."""
    try:
        with open(os.path.join(device, key), "rb") as f:
            value = f.read().decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return value or None


def _devname(device: str) -> str | None:
    """The device's node under /dev as the kernel names it (its uevent's DEVNAME)."""
    for line in (_attr(device, "uevent") or "").splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value:
            return value
    return None


def mappings(prefix: str) -> list[str]:
    """Names of device-mapper devices starting with `prefix`."""
    return sorted(d.dm_name for d in block_devices() if d.dm_name and d.dm_name.startswith(prefix))


# cryptsetup names a mapping's device-mapper UUID CRYPT-<TYPE>-[<LUKS UUID>-]<name as opened>.
# The UUID cannot change after creation (a name can: `dmsetup rename`), so it is what finds
# cryptlayer's mappings when no journal knows them.
_OUR_UUID = re.compile(r"^CRYPT-[A-Z0-9]+-(?:[0-9a-f]{32}-)?cryptlayer-")


def cryptlayer_mappings() -> list[str]:
    """Current names of the mappings cryptlayer opened, known by their dm UUID."""
    return sorted(
        d.dm_name for d in block_devices() if d.dm_name and _OUR_UUID.match(d.dm_uuid or "")
    )


def loops_backed_by(paths: set[Path]) -> list[str]:
    """Loop device nodes whose backing file is one of `paths`, or lies under one of them."""
    nodes = []
    for device in block_devices():
        if device.backing_file is None:
            continue
        backing = Path(device.backing_file.removesuffix(" (deleted)"))
        if any(backing == p or p in backing.parents for p in paths):
            nodes.append(device.node)
    return sorted(nodes)


def settle() -> None:
    """Wait until udev has processed every queued event (no-op where udev is not running)."""
    from cryptlayer.tools.runner import run

    if Path("/run/udev/control").exists():
        run(["udevadm", "settle", "--timeout", "30"], check=False)


def wait_for_node(node: str, timeout: float = 30.0) -> None:
    """Wait, on udev's own events, until `node` exists and udev has finished with it.

    /dev/mapper/NAME is a link udev makes; a tool returning does not mean udev is done. Where no
    udev runs, the node's existence is all there is to wait for.
    """
    import time

    import pyudev

    from cryptlayer.errors import CryptlayerError

    context = _context()
    udev_running = Path("/run/udev/control").exists()

    def ready() -> bool:
        if not udev_running:
            return Path(node).exists()
        try:
            return bool(pyudev.Devices.from_device_file(context, node).is_initialized)
        except (pyudev.DeviceNotFoundError, OSError, ValueError):
            return False

    monitor = pyudev.Monitor.from_netlink(context) if udev_running else None
    if monitor is not None:
        monitor.filter_by("block")
        monitor.start()
    deadline = time.monotonic() + timeout
    while not ready():  # checked after the monitor starts, so no event is missed
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CryptlayerError(
                f"{node} did not appear within {timeout:.0f} s", "is udev running?"
            )
        if monitor is not None:
            monitor.poll(timeout=min(remaining, 1.0))
        else:
            time.sleep(0.05)
