"""VM tier: real cryptsetup, dm-crypt, loop, overlayfs and crun, in one VM boot (make test-vm).

Every test is checked for leaks afterwards (mappings, loop devices, mounts, records) through
udev/sysfs and /proc, not by trusting the code; a leak fails the test.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.testing
from typer.testing import CliRunner

from cryptlayer.cli import app
from cryptlayer.errors import ExitCode
from cryptlayer.paths import (
    images_run_dir,
    openings_dir,
    run_root,
    runtime_state,
    scratch_dir,
    state_root,
)
from cryptlayer.tools import mount, udev

MARKER_LOWER = "CRYPTLAYER-MARKER-lower-7f3a9c"
MARKER_WRITTEN = "CRYPTLAYER-MARKER-written-5d21e8"
BUSYBOX_APPLETS = ("sh", "cat", "echo", "ls", "sleep", "id", "pwd", "env", "test", "grep", "stat", "seq", "sync",
                   "mkdir", "rm", "touch", "true", "false", "readlink", "wc", "head", "find", "sort")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.vm)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A VM tier that ran nothing, or skipped anything, has failed."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    passed = len(reporter.stats.get("passed", []))
    skipped = len(reporter.stats.get("skipped", []))
    if skipped or passed == 0:
        reporter.write_line(f"vm tier: FAILED: {passed} passed, {skipped} skipped (none may skip)")
        session.exitstatus = 1


# Typer builds the click command from the app's signatures at every CliRunner.invoke: about a
# third of a second under emulation, paid by thousands of in-process calls here. The app does
# not change between them, so it is built once.
typer.testing._get_command = functools.cache(typer.testing._get_command)


@dataclass
class Cli:
    """The real CLI, in-process (Python starts slowly under emulation)."""

    runner: CliRunner

    @classmethod
    def new(cls) -> Cli:
        return cls(CliRunner())

    def __call__(self, *args: str, input: bytes | str | None = None) -> tuple[int, str, str]:
        result = self.runner.invoke(app, list(args), input=input, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    def ok(self, *args: str, input: bytes | str | None = None) -> str:
        code, out, err = self(*args, input=input)
        assert code == 0, f"cryptlayer {' '.join(args)} exited {code}: {err}"
        return out


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli.new()


def leftovers() -> list[str]:
    """Everything of cryptlayer's that exists on this host now."""
    names = set(udev.mappings("cryptlayer-")) | set(udev.cryptlayer_mappings())  # name, dm UUID
    found = [f"mapping {m}" for m in sorted(names)]
    roots = {state_root(), Path(os.environ.get("CRYPTLAYER_SCRATCH", "/nonexistent"))}
    found += [f"loop {d}" for d in udev.loops_backed_by(roots)]
    found += [f"mount {p}" for p in mount.mounted_paths() if run_root() in p.parents]
    records = state_root() / "containers"
    if records.is_dir():
        found += [f"record {p.name}" for p in records.iterdir()]
    if scratch_dir().is_dir():
        found += [f"scratch {p.name}" for p in scratch_dir().iterdir()]
    if openings_dir().is_dir():
        found += [f"opening {p.name}" for p in openings_dir().iterdir()]
    for hidden in (images_run_dir(), runtime_state()):  # header copies; the runtime's state
        if hidden.is_dir():
            found += [f"runtime file {p}" for p in hidden.rglob("*")]
    return found


@pytest.fixture(autouse=True)
def no_leaks(cli: Cli, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test that leaves a mapping, loop device, mount or record behind."""
    if not request.node.get_closest_marker("power_loss"):  # that one starts from the wreckage
        assert leftovers() == [], "a previous test leaked"
    yield
    left = leftovers()
    if left:  # clean up so later tests start clean, then fail this one
        for name in json.loads(cli("ps", "--json")[1]):
            cli("stop", name["name"])
        cli("gc")
    assert left == [], f"leaked: {left}"


@pytest.fixture(scope="session")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where image files go: the scratch disk (not tmpfs: loop over 9p fails)."""
    scratch = os.environ.get("CRYPTLAYER_SCRATCH")
    base = Path(scratch) if scratch else tmp_path_factory.mktemp("images")
    base.mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture
def images(tmp_path: Path) -> Iterator[Path]:
    """A directory on the scratch disk (not tmpfs) for image files."""
    base = Path(os.environ.get("CRYPTLAYER_SCRATCH", tmp_path / "images"))
    path = base / tmp_path.name
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def template(
    images_root: Path, busybox_tree: Path, data_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The two-layer image most tests use (busybox bottom, data on top, a default command),
    built once per session; each test gets a copy (`image`) and a copy of its key."""
    cli = Cli.new()
    key = tmp_path_factory.mktemp("template") / "image.key"
    cli.ok("keygen", str(key))
    out = images_root / "template"
    cli.ok("build", "--key-file", str(key), "--output", str(out),
           "--cmd", "cat /data/hello.txt", str(busybox_tree), str(data_tree))  # fmt: skip
    return out, key


@pytest.fixture(scope="session")
def one_layer(
    images_root: Path, busybox_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A single-layer busybox image whose command is `true`, built once; tests copy it."""
    cli = Cli.new()
    key = tmp_path_factory.mktemp("one-layer") / "image.key"
    cli.ok("keygen", str(key))
    image = images_root / "one-layer"
    cli.ok("build", "--key-file", str(key), "--output", str(image), "--cmd", "true",
           str(busybox_tree))  # fmt: skip
    return image, key


@contextmanager
def loop_device(path: Path) -> Iterator[str]:
    """A loop device over `path`, attached with losetup(8) as any host would, then detached."""
    device = subprocess.run(["losetup", "--find", "--show", str(path)], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


@pytest.fixture
def key_file(tmp_path: Path, template: tuple[Path, Path]) -> Path:
    """The template image's key (mode 0600), for the test's own images too."""
    path = tmp_path / "image.key"
    shutil.copyfile(template[1], path)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A minimal root file system: static busybox and its applets."""
    root = tmp_path_factory.mktemp("busybox")
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "home/app"):
        (root / d).mkdir(parents=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, root / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
    os.chown(root / "home/app", 1000, 1000)
    (root / "tmp").chmod(0o1777)
    return root


@pytest.fixture(scope="session")
def data_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second layer: a file holding a known marker, and one that hides a busybox applet."""
    root = tmp_path_factory.mktemp("data")
    (root / "data").mkdir()
    (root / "data/hello.txt").write_text(f"{MARKER_LOWER}\n")
    return root


@pytest.fixture
def image(images: Path, template: tuple[Path, Path]) -> Path:
    """A fresh copy of the template image (opened with `key_file`)."""
    out = images / "img"
    shutil.copytree(template[0], out)
    return out


def slots(image: Path) -> list[int]:
    """Keyslots left in each layer of `image`, bottom first."""
    return [keyslots(p) for p in sorted(image.glob("*.luks"))]


def own_status(code: ExitCode, args: tuple[str, ...]) -> int:
    """The exit status of cryptlayer's own failure `code` in the command `args`: `run` exits
    with podman's 125 for all of them (its container's status is the container's)."""
    return ExitCode.RUN_FAILED if args[0] == "run" else code


def keyslots(layer: Path) -> int:
    """Keyslots in a LUKS2 header, read by cryptsetup itself."""
    out = subprocess.run(
        ["cryptsetup", "luksDump", str(layer)], capture_output=True, text=True, check=True
    ).stdout
    section = out.split("Keyslots:", 1)[1].split("Tokens:", 1)[0]
    return sum(1 for line in section.splitlines() if line.strip().split(":")[0].strip().isdigit())


def image_key_of(image: Path, key: bytes) -> bytes:
    """The image key, unwrapped from keys.json with `key` (to look for it where it must not be)."""
    from cryptlayer.image import envelope
    from cryptlayer.keys.sources import Credential, Secret

    credential = Credential(key=Secret(bytearray(key)))
    image_key = envelope.unlock(image, envelope.load(image).entries, credential)
    with image_key, image_key.view() as data:
        return bytes(data)
