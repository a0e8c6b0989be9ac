"""cryptlayer-runtime's `delete` of an encrypted image's container imports what the teardown
needs and nothing of assembly's: under emulation each module costs its share of a podman run
(docs/benchmarks/NOTES.md, figure 12, where the `delete` was ~6.5 s of imports for 0.4 s of work).

The whole path runs, as root, in a fresh interpreter: engine/cli.py's main, the runtime's own
`delete` (a stand-in crun), then the teardown of a record like the engine's (its image's IMAGE
step, the scratch's loop, a mount, a directory, a file), against a private state directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cryptlayer.runtime import state
from cryptlayer.runtime.journal import Kind, Step
from cryptlayer.runtime.state import Mode, Record
from cryptlayer.tools import udev

# What assembly needs and a teardown does not: the image's opener and its checks, keys,
# configuration, the tools that run programs (sh, logging), the OCI config, cryptography.
ASSEMBLY_ONLY = (
    "cryptlayer.config", "cryptlayer.image.envelope", "cryptlayer.image.files",
    "cryptlayer.image.luksheader", "cryptlayer.image.manifest", "cryptlayer.image.opener",
    "cryptlayer.image.process", "cryptlayer.image.shred", "cryptlayer.image.statement",
    "cryptlayer.keys", "cryptlayer.oci", "cryptlayer.runtime.ocispec",
    "cryptlayer.runtime.seccomp", "cryptlayer.secret", "cryptlayer.tools.cryptsetup",
    "cryptlayer.tools.fuser", "cryptlayer.tools.mkfs", "cryptlayer.tools.runner",
    "cryptlayer.tools.runtime", "cryptlayer.distribution", "concurrent.futures", "cryptography",
    "sh", "logging", "secrets", "tomllib",
    "pyudev", "ctypes", "datetime",  # (what is mapped and attached is read from sysfs: udev.py)
)  # fmt: skip
# What only a container that shreds its pulled copy adds: the node's store and its [pull] setting.
# (tomllib imports datetime)
STORE = ("cryptlayer.engine.store", "cryptlayer.config", "tomllib", "datetime")

# The teardown runs in a child of its own (encrypted.stop_shielded), which leaves by os._exit:
# the modules are the child's, listed as it leaves.
PROBE = """import os, sys
sys.argv = ["cryptlayer-runtime", "delete", "c1"]
leave = os._exit
def listed(code):
    print(" ".join(sorted(sys.modules)), file=sys.stderr)
    leave(code)
os._exit = listed
from cryptlayer.engine.cli import main
main()
"""


def engine_record(tmp_path: Path, shred: bool) -> tuple[dict[str, str], list[Path]]:
    """A started container of the engine's (`engine-c1`, erased at start when it shreds) with
    one step of each kind a teardown on this host can release; the environment to delete it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crun").write_text('#!/bin/sh\necho "$@" > "$RECORD"\n')
    (bin_dir / "crun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(tmp_path / "crun-args"),
           "CRYPTLAYER_ROOT": str(tmp_path / "state"), "CRYPTLAYER_RUNDIR": str(tmp_path / "run"),
           "CRYPTLAYER_CONFIG": str(tmp_path / "config.toml")}  # fmt: skip
    mnt, config, scratch = tmp_path / "mnt", tmp_path / "config.json", tmp_path / "scratch"
    mnt.mkdir()
    config.write_text("{}")
    scratch.write_bytes(b"")
    image = str(tmp_path / "image")
    steps = [Step(Kind.IMAGE, image), Step(Kind.LOOP, str(scratch)), Step(Kind.MOUNT, str(mnt)),
             Step(Kind.DIR, str(mnt)), Step(Kind.FILE, str(config))]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key in ("CRYPTLAYER_ROOT", "CRYPTLAYER_RUNDIR"):
            mp.setenv(key, env[key])
        with state.locked():
            state.create(Record("engine-c1", image, shred, Mode.START, 0, shredded=shred,
                                steps=steps))  # fmt: skip
    return env, [mnt, config, tmp_path / "state" / "containers" / "engine-c1.json"]


def delete(env: dict[str, str]) -> set[str]:
    """The engine's `delete c1`, through to the teardown; the modules it loaded."""
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # nothing but the list: no error, no warning
    return set(lines[0].split())


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("shred", [False, True], ids=["kept", "shredded"])
def test_the_delete_path_imports_only_the_teardown(tmp_path: Path, shred: bool) -> None:
    """Kept (the benchmark's case) or erased at start: the runtime's delete ran, every step was
    released and the record forgotten, without loading assembly's modules; a kept container's
    delete does not look at the store (or parse config.toml) either."""
    env, gone = engine_record(tmp_path, shred)
    modules = delete(env)
    assert (tmp_path / "crun-args").read_text() == "delete c1\n"
    assert [p for p in gone if p.exists()] == []
    assert "cryptlayer.runtime.container" in modules  # the teardown ran in this process
    allowed = loaded(modules, STORE) if shred else []
    assert [m for m in loaded(modules, ASSEMBLY_ONLY) if m not in allowed] == []
    assert ("cryptlayer.engine.store" in modules) == shred  # kept: the store is not looked at
    assert shred or loaded(modules, STORE) == []


def test_the_probe_sees_assembly_modules(tmp_path: Path) -> None:
    """The probe itself: the same delete with the image's opener imported first reports it (so
    an empty answer above is the path's, not a blind probe's)."""
    env, _gone = engine_record(tmp_path, shred=False)
    probe = PROBE.replace("import os, sys\n", "import os, sys\nimport cryptlayer.image.opener\n", 1)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    modules = set(done.stderr.split())
    assert "cryptlayer.image.opener" in loaded(modules, ASSEMBLY_ONLY)


def pyudev_block_devices() -> list[udev.BlockDevice]:
    """udev.block_devices as it was written with pyudev's enumeration and attributes."""
    import pyudev

    def attr(device: pyudev.Device, key: str) -> str | None:
        try:
            value = str(device.attributes.asstring(key)).strip()
        except (KeyError, UnicodeDecodeError):
            return None
        return value or None

    found = []
    for device in pyudev.Context().list_devices(subsystem="block"):
        name = device.sys_name
        if name.startswith(("dm-", "loop")):
            dm_name, backing = attr(device, "dm/name"), attr(device, "loop/backing_file")
            if dm_name is not None or backing is not None:
                node = device.device_node or f"/dev/{name}"
                found.append(udev.BlockDevice(node, dm_name, backing, attr(device, "dm/uuid")))
    return found


def test_block_devices_read_from_sysfs_are_pyudevs(tmp_path: Path) -> None:
    """udev.block_devices reads sysfs itself: what pyudev's enumeration found, with a loop
    device attached (a backing file whose name has a space), and after that file was deleted."""
    backing = tmp_path / "a layer"
    backing.write_bytes(bytes(1 << 20))
    loop = subprocess.run(["losetup", "--show", "-f", str(backing)], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    try:
        found = udev.block_devices()
        assert udev.BlockDevice(loop, None, str(backing)) in found
        assert found == pyudev_block_devices()
        assert udev.loops_backed_by({tmp_path}) == [loop]
        backing.unlink()
        assert udev.block_devices() == pyudev_block_devices()
        assert udev.loops_backed_by({backing}) == [loop]  # (" (deleted)" is not the name)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    assert udev.loops_backed_by({tmp_path}) == []


@pytest.mark.parametrize("shred", [False, True], ids=["kept", "shredded"])
def test_the_delete_of_a_lazy_container_imports_only_the_teardown(tmp_path: Path,
                                                                  shred: bool) -> None:  # fmt: skip
    """A container started lazily (cryptlayer-runtime's docker:// at create): its image's
    opening holds the fetched directory, the server and an NBD device (none attached here); the
    delete releases them through runtime/lazy.py and tools/nbd.py, still without assembly's
    modules; the fetched directory is gone."""
    env, gone = engine_record(tmp_path, shred)
    work = tmp_path / "run" / "lazy" / "0123456789abcdef"
    (work / "image").mkdir(parents=True)
    (work / "image" / "layer0.luks").write_bytes(b"header")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("CRYPTLAYER_ROOT", "CRYPTLAYER_RUNDIR"):
            mp.setenv(key, env[key])
        with state.locked():
            record = state.load("engine-c1")
            record.image = str(work / "image")
            record.steps[0] = Step(Kind.IMAGE, record.image)
            record.save()
            opening = state.Opening(record.image, steps=[
                Step(Kind.FETCHED, str(work)), Step(Kind.SERVER, str(work)),
                Step(Kind.NBD, "cryptlayer:test-engine-imports:0")])  # fmt: skip
            opening.path.parent.mkdir(parents=True, exist_ok=True)
            opening.save()
    modules = delete(env)
    assert [p for p in [*gone, work, opening.path] if p.exists()] == []
    assert {"cryptlayer.runtime.lazy", "cryptlayer.tools.nbd"} <= modules  # (the probe saw them)
    allowed = loaded(modules, STORE) if shred else []
    assert [m for m in loaded(modules, ASSEMBLY_ONLY) if m not in allowed] == []
