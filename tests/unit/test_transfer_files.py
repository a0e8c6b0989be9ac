"""push and pull as file-system code, against a hostile neighbour (another local user who can
write beside the target) and a hostile layout or registry: work directories, symlinks, FIFOs,
devices, manifests naming files the statement does not. Most use an `oci:` layout as the store
(no network needed); the registry path goes through the same transfer code."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from luksfixtures import fake_image
from typer.testing import CliRunner

from cryptlayer.cli import app

FILES = ("manifest.json", "keys.json", "layer0.luks", "layer0.verity")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.stderr


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return fake_image(tmp_path / "img")


@pytest.fixture
def layout(image: Path, tmp_path: Path) -> Path:
    """The image pushed to an OCI layout, tag v1."""
    code, err = invoke("push", str(image), f"oci:{tmp_path}/layout:v1")
    assert code == 0, err
    return tmp_path / "layout"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory like /tmp: anyone may create entries in it (sticky)."""
    path = Path(tempfile.mkdtemp(prefix="cryptlayer-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(script: str) -> None:
    subprocess.run([*NOBODY, "sh", "-ec", script], check=True)


def manifest_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs/sha256" / digest.removeprefix("sha256:")


def rewrite(layout: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the layout's one manifest (as a hostile layout or registry would serve it)."""
    old = manifest_digest(layout)
    doc = json.loads(blob_path(layout, old).read_bytes())
    change(doc)
    set_manifest(layout, json.dumps(doc).encode())


def set_manifest(layout: Path, data: bytes) -> None:
    digest = add_blob(layout, data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = digest
    index["manifests"][0]["size"] = len(data)
    (layout / "index.json").write_text(json.dumps(index))


def add_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return digest


# ---- B11: untrusted files are looked at before they are opened ---------------------------------


@pytest.fixture
def waiting_writer(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A FIFO and a process blocked opening it for writing: if anyone opens the FIFO for
    reading (even O_NONBLOCK), that process wakes up and leaves open(2)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'wb')"])
    wchan = Path(f"/proc/{writer.pid}/wchan")
    while wchan.read_text() != "wait_for_partner":  # until it is blocked in open(2)
        assert writer.poll() is None
        time.sleep(0.01)
    try:
        yield fifo, writer
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let it go
        writer.wait(timeout=30)


def still_blocked(writer: subprocess.Popen[bytes]) -> bool:
    return bool(writer.poll() is None
                and Path(f"/proc/{writer.pid}/wchan").read_text() == "wait_for_partner")  # fmt: skip


def test_untrusted_reads_never_open_a_fifo(
    image: Path, waiting_writer: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """The image path too: keys.json through fsutil.read_untrusted, a layer through imagefiles."""
    from cryptlayer import manifest as manifest_mod
    from cryptlayer.errors import UsageError
    from cryptlayer.fsutil import UntrustedFileError, read_untrusted
    from cryptlayer.imagefiles import open_image

    fifo, writer = waiting_writer
    with pytest.raises(UntrustedFileError, match=r"is not a regular file \(a FIFO\)"):
        read_untrusted(str(fifo), 1 << 20)
    assert still_blocked(writer)
    loaded = manifest_mod.load(image)
    (image / "layer0.luks").unlink()
    os.rename(fifo, image / "layer0.luks")
    with pytest.raises(UsageError, match=r"layer0.luks is not a regular file \(a FIFO\)"):
        open_image(image, loaded)
    assert still_blocked(writer)
    os.rename(image / "layer0.luks", fifo)
