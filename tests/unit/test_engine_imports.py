"""What each of cryptlayer-runtime's paths imports, pinned: under emulation each module costs its
share of a podman run (docs/benchmarks/NOTES.md, figure 12: the `delete` was ~6.5 s of imports
for 0.4 s of work; in the VM a module costs ~20-100 ms, most of it finding and reading its files).

- `delete` of an encrypted image's container: what the teardown needs, nothing of assembly's,
  and not tempfile, hashlib (OpenSSL), the NBD server's module or the placeholder's markers.
  The whole path runs, as root, in a fresh interpreter: engine/cli.py's main, the runtime's own
  `delete` (a stand-in crun), then the teardown of a record like the engine's (its image's
  IMAGE step, the scratch's loop, a mount, a directory, a file), against a private state
  directory. The teardown's modules are imported while the runtime deletes (cli.spawn's
  `meanwhile`).
- a passed-through `delete` (a container that is not cryptlayer's, named by podman's 64-digit
  id, which is hashed to look for its record): the pass-through's modules and _sha256.
- `create` of a local image: never the registry's, the other key sources' or the command
  line's stacks (requests, grpc, jwcrypto, pkcs11, typer).
"""

from __future__ import annotations

import os
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
# What a teardown loaded until figure 12's third run and needs not: tempfile (with shutil, random,
# bz2, lzma: fsutil's atomic write names its file itself), hashlib (OpenSSL; the names' SHA-256
# from _sha256), the NBD server's module (with socket, subprocess, nbd), the placeholder's markers.
TEARDOWN_CUT = (
    "tempfile", "shutil", "random", "bz2", "lzma", "hashlib", "_hashlib",
    "cryptlayer.runtime.lazy", "cryptlayer.tools.nbd", "socket", "subprocess", "selectors",
    "cryptlayer.image",
)  # fmt: skip

# The teardown runs in a child of its own (encrypted.stop_shielded), which leaves by os._exit,
# as the delete then does (cli.leave): the modules are listed as each leaves.
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
    # nothing but the lists, the teardown child's then the delete's (cli.leave): no error, no
    # warning; the delete's own exit is os._exit's too, not the interpreter's teardown
    assert len(lines) == 2, done.stderr
    return set(lines[0].split()) | set(lines[1].split())


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
    assert loaded(modules, TEARDOWN_CUT) == []
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


PASS_THROUGH = """import os, sys
at_start = set(sys.modules)
def execve(*a):
    print(" ".join(sorted(set(sys.modules) - at_start)))
    sys.exit(0)
os.execve = execve
sys.argv = ["cryptlayer-runtime", "delete", "--force", "ab" * 32]
from cryptlayer.engine.cli import main
main()
"""


def test_a_passed_through_delete_loads_no_hash_library(tmp_path: Path) -> None:
    """Every `delete` hashes podman's 64-digit id to look for a record: a container that is not
    cryptlayer's is then handed to the runtime with the pass-through's modules and _sha256 only
    (hashlib would load OpenSSL, ~0.1 s under emulation); its name is hashlib's SHA-256's."""
    import hashlib

    from cryptlayer.engine import cli

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crun").write_text("#!/bin/sh\n")
    (bin_dir / "crun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CRYPTLAYER_ROOT": str(tmp_path / "state"),
           "CRYPTLAYER_CONFIG": str(tmp_path / "config.toml")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", PASS_THROUGH], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.split() == ["__future__", "_sha256", "cryptlayer", "cryptlayer.engine",
                                   "cryptlayer.engine.cli"]  # fmt: skip
    digest = hashlib.sha256(b"ab" * 32).hexdigest()[: cli.HASHED]
    assert cli.container_name("ab" * 32) == f"engine-{'ab' * 17}a-{digest}"


def test_spawn_runs_meanwhile_while_the_runtime_runs(tmp_path: Path) -> None:
    """A delete imports the teardown's modules while the runtime deletes: `meanwhile` runs once
    the child has started (the child waits for what it writes) and before spawn returns its
    status; when `meanwhile` fails, the child is still waited for, then the failure raised."""
    from cryptlayer.engine import cli

    flag = tmp_path / "flag"
    child = tmp_path / "runtime"
    pid = tmp_path / "pid"
    child.write_text(f"#!/bin/sh\necho $$ > {pid}\nwhile [ ! -e {flag} ]; do sleep 0.01; done\n"
                     "exit 3\n")  # fmt: skip
    child.chmod(0o755)
    env = {b"PATH": b"/usr/bin:/bin"}
    assert cli.spawn(str(child), [], env, meanwhile=flag.touch) == 3
    flag.unlink()
    ran: list[int] = []

    def failing() -> None:
        ran.append(1)
        flag.touch()
        raise RuntimeError("meanwhile failed")

    with pytest.raises(RuntimeError, match="meanwhile failed"):
        cli.spawn(str(child), [], env, meanwhile=failing)
    assert ran == [1]
    with pytest.raises(ChildProcessError):  # waited for already: no child left behind
        os.waitpid(int(pid.read_text()), os.WNOHANG)


LEAVE = """import atexit, sys, threading
from cryptlayer.engine import cli
atexit.register(lambda: print("atexit ran"))
print("written", end="")
sys.stderr.write("and this")
if sys.argv[1] == "thread":
    go = threading.Event()
    waiting = threading.Thread(target=lambda: (go.wait(), print(" joined")))
    waiting.start()
    try:
        cli.leave(4)
    except SystemExit:
        print(" ordinary exit", end="")
        go.set()
        raise
cli.leave(3)
"""


def test_leave_skips_the_interpreters_teardown_but_not_a_running_thread() -> None:
    """A create or delete leaves by os._exit once done (the interpreter's teardown of its
    modules costs about a second under emulation): buffered output is written, atexit's
    handlers are not run. With a thread still running that an exit waits for, the ordinary
    exit, which waits for it."""
    done = subprocess.run([sys.executable, "-c", LEAVE, "alone"], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "written", "and this")
    done = subprocess.run([sys.executable, "-c", LEAVE, "thread"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (4, "written ordinary exit joined\natexit ran\n")


# What a create of an image on the node never loads: the registry's stack (a docker:// image's
# only), the other key sources' (PKCS#11, TPM, a key provider's JWE), the command line's.
CREATE_NEVER = (
    "requests", "urllib3", "grpc", "jwcrypto", "pkcs11", "typer", "click", "rich",
    "cryptlayer.cli", "cryptlayer.build", "cryptlayer.distribution", "cryptlayer.keys.pkcs11",
    "cryptlayer.keys.tpm2", "cryptlayer.keys.heldkey", "cryptlayer.keys.providers",
)  # fmt: skip

# The create until its first loop device (this host has no device-mapper): the image opened,
# its key unwrapped, then a stop; the modules as the process leaves.
CREATE = """import atexit, sys
sys.argv = ["cryptlayer-runtime", "create", "--bundle", sys.argv[1], "c1"]
from cryptlayer.errors import CryptlayerError
from cryptlayer.tools import losetup, system
def stop(*args, **kwargs):
    raise CryptlayerError("stopped by the test before a device")
system.require_kernel = lambda *a, **k: None
losetup.attach_fd = stop
atexit.register(lambda: print(" ".join(sorted(sys.modules))))
from cryptlayer.engine.cli import main
main()
"""


def test_a_local_images_create_loads_no_registry_or_cli_stack(tmp_path: Path) -> None:
    """cryptlayer-runtime's create of an image on the node, its key from config.toml's
    [[keys]] key-file: through the opening of the image (its key unwrapped) to the first
    device, without requests, grpc, jwcrypto, pkcs11, typer or their cryptlayer modules."""
    import json

    from luksfixtures import fake_image

    (tmp_path / "images").mkdir()
    image = fake_image(tmp_path / "images" / "img")
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(f'allow-unsigned = true\n[[keys]]\nimage = "{image.parent}/*"\n'
                      f'key-file = "{key}"\n')  # fmt: skip
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {
        "process": {"args": ["/bin/true"], "env": []},
        "root": {"path": "rootfs"},
        "annotations": {"org.cryptlayer.image": str(image), "org.cryptlayer.keep": "true"},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "crun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
           "CRYPTLAYER_ROOT": str(tmp_path / "state"), "CRYPTLAYER_RUNDIR": str(tmp_path / "run"),
           "CRYPTLAYER_CONFIG": str(config), "CRYPTLAYER_SCRATCH": str(tmp_path / "scratch")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CREATE, str(bundle)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 125, done.stderr
    assert done.stderr == "error: cryptlayer-runtime: stopped by the test before a device\n"
    modules = set(done.stdout.split())
    assert {"cryptlayer.image.opener", "cryptlayer.keys.node", "cryptography"} <= modules
    assert loaded(modules, CREATE_NEVER) == []
    assert not list((tmp_path / "state" / "containers").glob("*"))  # torn down again


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
    work = tmp_path / "run" / ".lazy" / "0123456789abcdef"
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
