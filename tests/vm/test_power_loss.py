"""A power cut in the middle of running containers, then a second boot of the same disk.

scripts/power-loss boots the VM twice on one scratch disk. The first boot runs this file as a
script: it builds two images, starts a container that will shred, one with --keep and a
`cryptlayer run` process, then cuts the power (sysrq 'o': off, no sync, no teardown). The second
boot runs the test below: `gc` must find everything the journal says and fix it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHRED, KEEP = "shredding", "kept"  # image names on the scratch disk


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
    print("power-loss: three containers up; cutting the power", flush=True)
    Path("/proc/sys/kernel/sysrq").write_text("1\n")
    Path("/proc/sysrq-trigger").write_text("o\n")  # power off now: no sync, no teardown
    time.sleep(60)
    sys.exit("power-loss: the machine did not switch off")


@pytest.mark.power_loss
def test_gc_after_power_loss() -> None:
    """Boot 2: the journal outlived the power cut; gc clears it, the kept image still opens."""
    from conftest import Cli, leftovers, slots

    from cryptlayer.runtime import state

    cli = Cli.new()
    assert {r.name for r in state.all_records()} == {"started", "kept", "running"}, (
        "boot 1 did not leave its journal (did it run?)"
    )
    rows = {r["name"]: r["status"] for r in __import__("json").loads(cli.ok("ps", "--json"))}
    assert rows == {"started": "stale", "kept": "stale", "running": "stale"}
    assert slots(_scratch() / SHRED) == [0]  # erased at start, before the power went
    assert slots(_scratch() / KEEP) == [1]
    out = cli.ok("gc")
    for name in ("started", "kept", "running"):
        assert f"cleaned up container {name}\n" in out
    assert leftovers() == []
    assert state.all_openings() == []
    assert cli.ok("gc") == "nothing to clean up\n"
    key = str(_scratch() / "power.key")
    rootfs = Path(
        cli.ok(
            "start", "--keep", "--key-file", key, "--name", "after", str(_scratch() / KEEP)
        ).strip()
    )
    assert (rootfs / "hello.txt").read_text() == "before the power cut\n"
    cli.ok("stop", "after")
    code, _, err = cli("start", "--key-file", key, "--name", "never", str(_scratch() / SHRED))
    assert code == 6, err  # the shredding image stays erased
    assert leftovers() == []


if __name__ == "__main__":
    cut_the_power()
