"""A power cut in the middle of running containers, then a second boot of the same disk.

scripts/power-loss boots the VM twice on one scratch disk. The first boot runs this file as a
script: it builds two images, starts a container that will shred, one with --keep, a
`cryptlayer run` process, a container made through cryptlayer-runtime as an engine makes one
(crun, its state in /run: a copy of the kept image, shredding), and a lazy container
(docs/lazy.md: the kept image pushed to a registry of this boot, its layer an NBD device served
by a server process, its fetched files in /run, its chunks in the block cache on the disk), then
cuts the power (sysrq 'o': off, no sync, no teardown). The second boot runs the test below: `gc`
must find everything the journal says and fix it (the registry is gone by then: the lazy
container's release needs nothing of it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SHRED, KEEP, ENGINE = "shredding", "kept", "engine"  # image names on the scratch disk
ENGINE_ID = "cut"  # the engine's container id: cryptlayer's engine-cut
LAZY = "lazy"  # the lazy container (once the name of paths.lazy_run_dir: a regression)
BYSTANDER = "cryptlayer-test:bystander"  # boot 2's NBD device, attached before gc


def _scratch() -> Path:
    return Path(os.environ["CRYPTLAYER_SCRATCH"])


def cut_the_power() -> None:
    """Boot 1: leave containers assembled and running, then switch the machine off."""
    from typer.testing import CliRunner

    from cryptlayer.cli import app

    def cli(*args: str) -> str:
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    tree = Path(os.environ.get("TMPDIR", "/tmp")) / "power-tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", tree / "bin/busybox")
    for applet in ("sh", "sleep", "touch", "cat"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "hello.txt").write_text("before the power cut\n")
    key = _scratch() / "power.key"
    cli("keygen", str(key))
    for name in (SHRED, KEEP):
        cli("build", "--key-file", str(key), "--output", str(_scratch() / name), str(tree))
    shutil.copytree(_scratch() / KEEP, _scratch() / ENGINE)
    os.sync()  # the images were there long before the job; what follows is not synced
    cli("start", "--key-file", str(key), "--name", "started", str(_scratch() / SHRED))
    cli("start", "--keep", "--key-file", str(key), "--name", "kept", str(_scratch() / KEEP))
    subprocess.Popen(
        [sys.executable, "-m", "cryptlayer", "run", "--name", "running", "--key-file", str(key),
         str(_scratch() / SHRED), "--", "sh", "-c", "touch /ready; exec sleep 600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ready = Path(os.environ.get("CRYPTLAYER_RUNDIR", "/run/cryptlayer")) / "running/rootfs/ready"
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert time.monotonic() < deadline, "the run never became ready"
        time.sleep(0.5)
    began = time.monotonic()
    through_the_runtime(key, tree)
    print(f"power-loss: the engine's container took {time.monotonic() - began:.0f} s", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: registryfixtures
    from registryfixtures import registry

    with registry(tree.parent / "power-registry") as reg:  # left running: the power goes first
        cli("push", "--no-tls-verify", "-q", str(_scratch() / KEEP), f"{reg.host}/team/power:v1")
        rootfs = cli("start", "--tls-verify=false", "--key-file", str(key), "--name", LAZY,
                     f"docker://{reg.host}/team/power:v1").strip()  # fmt: skip
        assert (Path(rootfs) / "hello.txt").read_text() == "before the power cut\n"
        print("power-loss: five containers up; cutting the power", flush=True)
        Path("/proc/sys/kernel/sysrq").write_text("1\n")
        Path("/proc/sysrq-trigger").write_text("o\n")  # power off now: no sync, no teardown
        time.sleep(60)
    sys.exit("power-loss: the machine did not switch off")


def through_the_runtime(key: Path, tree: Path) -> None:
    """Boot 1: a container created and started through cryptlayer-runtime, as an engine does."""
    runtime = str(Path(sys.executable).with_name("cryptlayer-runtime"))
    config = tree.parent / "power-config.toml"
    config.write_text(f'allow-unsigned = true\n[[keys]]\nimage = "{_scratch() / ENGINE}"\n'
                      f'key-file = "{key}"\n')  # fmt: skip
    bundle = tree.parent / "power-bundle"
    bundle.mkdir()
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"] |= {"terminal": False, "args": ["sleep", "600"]}
    spec["annotations"] = {"org.cryptlayer.image": str(_scratch() / ENGINE)}
    (bundle / "config.json").write_text(json.dumps(spec))
    env = os.environ | {"CRYPTLAYER_CONFIG": str(config)}
    for args in (["create", "--bundle", str(bundle), ENGINE_ID], ["start", ENGINE_ID]):
        subprocess.run([runtime, "--root", "/run/power-crun", *args], env=env, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip


class _Zeros:
    size = 1 << 20

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(length)


@contextmanager
def _bystander() -> Iterator[tuple[int, list[str]]]:
    """Boot 2: an NBD device attached now (as a lazy container started after the boot would
    have), its index, and the devices the journals name."""
    from cryptlayer.distribution.nbdserver import serve
    from cryptlayer.runtime import state
    from cryptlayer.runtime.journal import Kind
    from cryptlayer.tools import nbd

    recorded = [s.device for o in state.all_openings() for s in o.steps if s.kind == Kind.NBD]
    kernel_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    thread = threading.Thread(target=serve, args=(server_end, _Zeros()),
                              kwargs={"handshake": False}, daemon=True)  # fmt: skip
    thread.start()
    index = nbd.connect(kernel_end.fileno(), _Zeros.size, BYSTANDER)
    kernel_end.close()
    try:
        yield index, recorded
    finally:
        nbd.disconnect(index)
        deadline = time.monotonic() + 30
        while nbd.connected(index) and time.monotonic() < deadline:
            time.sleep(0.1)
        thread.join(timeout=30)


@pytest.mark.power_loss
def test_gc_after_power_loss() -> None:
    """Boot 2: the journal outlived the power cut; gc clears it, the kept image still opens."""
    from conftest import Cli, leftovers, slots
    from test_lazy import _nothing_lazy_left

    from cryptlayer.distribution.blockcache import TEMP_PREFIX
    from cryptlayer.paths import block_cache_dir
    from cryptlayer.runtime import state
    from cryptlayer.tools import nbd

    cli = Cli.new()
    names = {"started", "kept", "running", f"engine-{ENGINE_ID}", LAZY}
    assert {r.name for r in state.all_records()} == names, (
        "boot 1 did not leave its journal (did it run?)"
    )
    rows = {r["name"]: r["status"] for r in json.loads(cli.ok("ps", "--json"))}
    assert rows == dict.fromkeys(names, "stale")
    assert state.holder_names() == [f"engine-{ENGINE_ID}"]
    assert slots(_scratch() / SHRED) == [0]  # erased at start, before the power went
    assert slots(_scratch() / KEEP) == [1]
    assert slots(_scratch() / ENGINE) == [0]
    with _bystander() as (bystander, recorded):
        # the lazy container's journal names its NBD device, which this boot's kernel gave to
        # another since: gc must not detach that one
        assert nbd.device(bystander) in recorded, (bystander, recorded)
        out = cli.ok("gc")
        assert nbd.backend(bystander) == BYSTANDER, "gc detached another's NBD device"
    for name in names:
        assert f"cleaned up container {name}\n" in out
    assert leftovers() == []
    assert state.all_openings() == []
    _nothing_lazy_left()  # no NBD device attached, no server, no fetched directory in /run
    # (the cache's chunks may or may not have outlived the cut: their directories were not
    # synced; a chunk there is whole, see blockcache.py)
    temps = [p for p in block_cache_dir().rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert temps == [], f"half-written chunks left in the block cache: {temps}"
    assert cli.ok("gc") == "nothing to clean up\n"
    key = str(_scratch() / "power.key")
    rootfs = Path(
        cli.ok(
            "start", "--keep", "--key-file", key, "--name", "after", str(_scratch() / KEEP)
        ).strip()
    )
    assert (rootfs / "hello.txt").read_text() == "before the power cut\n"
    cli.ok("stop", "after")
    for erased in (SHRED, ENGINE):  # the shredding images stay erased, the engine's too
        code, _, err = cli("start", "--key-file", key, "--name", "never", str(_scratch() / erased))
        assert code == 6, err
    assert state.holder_names() == []
    assert leftovers() == []


if __name__ == "__main__":
    cut_the_power()
