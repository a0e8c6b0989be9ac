"""Where the process boundary is the point: signals, SIGKILL then gc, and what /proc shows."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Cli, image_key_of, keyslots

from cryptlayer.paths import run_root, state_root
from cryptlayer.runtime.container import StartOptions

CLI = [sys.executable, "-m", "cryptlayer"]


class Spawned:
    """`cryptlayer ARGS` as a real process, its output going to files (pipes could fill up)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out_path, self.err_path = tmp / "stdout", tmp / "stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*CLI, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )

    def wait_ready(self, name: str, timeout: float = 300) -> None:
        """Until the container has touched /ready (seen in its scratch layer from the host)."""
        marker = run_root() / name / "scratch/upper/ready"
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"cryptlayer exited {self.proc.returncode}: {self.err}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"container never became ready: {self.err}")
            time.sleep(0.2)

    def finish(self, timeout: float = 300) -> tuple[int, bytes, bytes]:
        code = self.proc.wait(timeout)
        return code, self.out_path.read_bytes(), self.err_path.read_bytes()

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")


def encodings(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
            base64.urlsafe_b64encode(key), base64.b64encode(key).rstrip(b"=")]  # fmt: skip


def leaks_of(key: bytes) -> list[str]:
    """Every process's argv and environment, and every file cryptlayer keeps, that holds the key."""
    needles = encodings(key)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for what in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{what}").read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                found.append(f"/proc/{pid}/{what}")
    for root in (state_root(), run_root()):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and "/rootfs/" not in str(path):
                if "/layer" in str(path.relative_to(root)) and path.parent != root:
                    continue  # decrypted layer contents seen through their mounts, not files we wrote
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if any(n in data for n in needles):
                    found.append(str(path))
    return found


def test_sigterm_is_forwarded_then_teardown_and_shred(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    script = 'trap "echo got-term; exit 42" TERM; touch /ready; while true; do sleep 0.2; done'
    run = Spawned(tmp_path, "--debug", "run", "--name", "sig", "--key-file", str(key_file),
                  str(image), "--", "sh", "-c", script)  # fmt: skip
    run.wait_ready("sig")
    key = key_file.read_bytes()
    image_key = image_key_of(image, key)
    assert leaks_of(key) == []  # while the container runs
    assert leaks_of(image_key) == []
    shown = (
        cli.ok("ps", "--json")
        + cli.ok("inspect", "--json", str(image))
        + cli.ok("inspect", str(image))
    )
    assert not any(n in shown.encode() for n in encodings(key) + encodings(image_key))
    run.proc.send_signal(signal.SIGTERM)
    code, out, err = run.finish()
    assert code == 42, err.decode()
    assert out == b"got-term\n"
    assert b"+ cryptsetup open" in err  # --debug logs the commands...
    assert not any(n in err for n in encodings(key) + encodings(image_key))  # ...and never a key
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [0, 0]


def test_init_ignoring_sigterm_is_killed_after_stop_timeout(
    image: Path, key_file: Path, tmp_path: Path
) -> None:
    """--stop-timeout 1 is honoured: the init is killed after 1 s, long before the default 10 s
    (measured from the signal to the moment the container's process is gone, so that the
    teardown's speed on a loaded machine does not count)."""
    run = Spawned(tmp_path, "run", "--keep", "--stop-timeout", "1", "--name", "stubborn",
                  "--key-file", str(key_file), str(image), "--", "sh", "-c", "touch /ready; exec sleep 617")  # fmt: skip
    run.wait_ready("stubborn")
    init = next(p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == "sleep 617")
    signalled = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    while Path(f"/proc/{init}").exists():
        time.sleep(0.05)
    took = time.monotonic() - signalled
    code, _, err = run.finish()
    assert code == 128 + signal.SIGKILL, err.decode()
    assert 1.0 <= took < StartOptions("x").stop_timeout, took  # killed after 1 s, not after 10 s
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [1, 1]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_sigkill_then_gc_cleans_up_and_shreds(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    run = Spawned(tmp_path, "run", "--name", "crashed", "--key-file", str(key_file), str(image),
                  "--", "sh", "-c", "touch /ready; exec sleep 600")  # fmt: skip
    run.wait_ready("crashed")
    run.proc.kill()
    run.proc.wait()
    assert (run_root() / "crashed/rootfs").is_mount()  # the crash left it all behind...
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [0, 0]  # ...but erased at start
    out = cli.ok("gc")
    assert "cleaned up container crashed" in out
    assert [keyslots(p) for p in sorted(image.glob("*.luks"))] == [0, 0]
    assert cli.ok("gc") == "nothing to clean up\n"
