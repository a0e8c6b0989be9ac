"""push and pull as file-system code, against a hostile neighbour (another local user who can
write beside the target) and a hostile layout or registry: work directories, symlinks, FIFOs,
devices, manifests naming files the statement does not. Most use an `oci:` layout as the store
(no network needed); the registry path goes through the same transfer code."""

from __future__ import annotations

import fcntl
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
from clirunner import invoke
from registryfixtures import RunningRegistry

from cryptlayer.errors import ExitCode

FILES = ("manifest.json", "keys.json", "layer0.luks", "layer0.verity")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))


@pytest.fixture
def layout(image: Path, tmp_path: Path) -> Path:
    """The image pushed to an OCI layout, tag v1."""
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/layout:v1")
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


# ---- B1: the work directory beside the target -------------------------------------------------


@pytest.mark.parametrize("source", ["oci", "registry"])
def test_a_neighbours_work_directory_is_refused(
    source: str, layout: Path, image: Path, shared: Path, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """Another user makes the predictable `.img.pull-HEX` with keys.json -> a root-only file:
    root's pull refuses it (saying what to do), and the root-only file is unchanged."""
    ref = f"oci:{layout}:v1"
    if source == "registry":
        plain: RunningRegistry = request.getfixturevalue("plain")
        ref = f"docker://{plain.host}/neighbour/app:v1"
        assert invoke("push", "--no-tls-verify", str(image), ref)[0] == 0
    victim = tmp_path / "root-only"
    victim.write_bytes(b"root's\n")
    victim.chmod(0o600)
    work = shared / f".img.pull-{manifest_digest(layout).removeprefix('sha256:')[:12]}"
    as_nobody(f"mkdir {work}; ln -s {victim} {work}/keys.json; ln -s {victim} {work}/job")
    tls = ["--no-tls-verify"] if source == "registry" else []
    code, _, err = invoke("pull", *tls, ref, str(shared / "img"))
    assert code == ExitCode.USAGE, err
    assert err.startswith(f"error: {work} is not a directory pull made (owned by uid 65534")
    assert err.endswith(f"remove it (rm -r {work}) and pull again: pull resumes only a"
                        " directory it made\n")  # fmt: skip
    assert victim.read_bytes() == b"root's\n"
    assert not (shared / "img").exists()


def test_only_a_private_work_directory_of_ours_is_resumed(
    layout: Path, shared: Path, tmp_path: Path
) -> None:
    """Ours but open to others (0755), or a symlink to ours: refused; ours and 0700: resumed."""
    work = shared / f".img.pull-{manifest_digest(layout).removeprefix('sha256:')[:12]}"
    work.mkdir(mode=0o755)
    work.chmod(0o755)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(shared / "img"))
    assert code == ExitCode.USAGE and "(owned by uid 0, mode 0755)" in err, err
    work.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    as_nobody(f"ln -s {elsewhere} {work}")
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(shared / "img"))
    assert code == ExitCode.USAGE and "a symlink is not followed" in err, err
    assert list(elsewhere.iterdir()) == []
    work.unlink()
    work.mkdir(mode=0o700)
    (work / "keys.json").write_bytes(b"half")  # an interrupted pull's
    held = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another pull, still running
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(shared / "img"))
    os.close(held)
    assert (code, err) == (ExitCode.USAGE, f"error: another pull into {shared}/img is running:"
                           " wait for it to finish\n")  # fmt: skip
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(shared / "img"))
    assert code == 0, err
    assert not work.exists()
    assert (shared / "img/keys.json").read_bytes() == (tmp_path / "img/keys.json").read_bytes()
    assert (shared / "img").stat().st_mode & 0o777 == 0o755  # private only while pulling


# ---- B2, B11: push opens each file once, no symlink, no FIFO, no device ------------------------


def test_push_refuses_a_symlinked_signature(image: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    (image / "signatures").mkdir()
    (image / "signatures/z.sig").symlink_to(secret)
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/out:v1")
    assert (code, err) == (ExitCode.USAGE, f"error: {image}/signatures/z.sig is a symbolic link;"
                           " refusing to follow it: an image holds regular files only; copy it"
                           " again\n")  # fmt: skip
    stored = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert b"root's secret\n" not in stored


@pytest.mark.parametrize("name", ["layer0.verity", "keys.json"])
def test_push_refuses_symlinked_and_hard_linked_files(
    image: Path, tmp_path: Path, name: str
) -> None:
    os.rename(image / name, tmp_path / name)
    (image / name).symlink_to(tmp_path / name)
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/out:v1")
    assert code == ExitCode.USAGE and f"{image}/{name} is a symbolic link" in err, err
    (image / name).unlink()
    os.link(tmp_path / name, image / name)
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/out:v1")
    assert code == ExitCode.USAGE and f"{image}/{name} has 2 hard links" in err, err


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


def test_push_never_opens_a_fifo(
    image: Path, tmp_path: Path, waiting_writer: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    fifo, writer = waiting_writer
    (image / "signatures").mkdir()
    os.rename(fifo, image / "signatures/f.sig")
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/out:v1")
    assert (code, err) == (ExitCode.USAGE, f"error: {image}/signatures/f.sig is not a regular"
                           " file (a FIFO): an image holds regular files only; copy it again\n")  # fmt: skip
    assert still_blocked(writer)
    os.rename(image / "signatures/f.sig", fifo)


def test_untrusted_reads_never_open_a_fifo(
    image: Path, waiting_writer: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """The image path too: keys.json through fsutil.read_untrusted, a layer through image/files.py."""
    from cryptlayer.errors import UsageError
    from cryptlayer.fsutil import UntrustedFileError, read_untrusted
    from cryptlayer.image.opener import Policy, open_image

    fifo, writer = waiting_writer
    with pytest.raises(UntrustedFileError, match=r"is not a regular file \(a FIFO\)"):
        read_untrusted(str(fifo), 1 << 20)
    assert still_blocked(writer)
    (image / "layer0.luks").unlink()
    os.rename(fifo, image / "layer0.luks")
    with pytest.raises(UsageError, match=r"layer0.luks is not a regular file \(a FIFO\)"):
        open_image(image, Policy())
    assert still_blocked(writer)
    os.rename(image / "layer0.luks", fifo)


def test_device_nodes_are_refused(image: Path, tmp_path: Path) -> None:
    """A /dev/null-like node as a layer, and a tty-like one as keys.json (opening a terminal
    without O_NOCTTY could make it ours): refused by type, before any open."""
    import stat

    (image / "layer0.verity").unlink()
    os.mknod(image / "layer0.verity", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/out:v1")
    assert code == ExitCode.USAGE, err
    assert f"{image}/layer0.verity is not a regular file (a character device node)" in err
    (image / "keys.json").unlink()
    os.mknod(image / "keys.json", stat.S_IFCHR | 0o600, os.makedev(5, 0))  # /dev/tty
    from cryptlayer.fsutil import UntrustedFileError, read_untrusted

    with pytest.raises(UntrustedFileError, match=r"\(a character device node\)"):
        read_untrusted(str(image / "keys.json"), 1 << 20)


# ---- B6: a layout someone else prepared --------------------------------------------------------


def test_push_to_a_layout_never_writes_through_a_symlink(image: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched\n")
    out = tmp_path / "out"
    (out / "blobs/sha256").mkdir(parents=True)
    for name in FILES:
        data = (image / name).read_bytes()
        partial = out / f"blobs/sha256/.{hashlib.sha256(data).hexdigest()}.partial"
        partial.symlink_to(victim)
    code, _, err = invoke("push", str(image), f"oci:{out}:v1")
    assert code == 0, err
    assert victim.read_bytes() == b"untouched\n"
    code, _, err = invoke("pull", f"oci:{out}:v1", str(tmp_path / "back"))
    assert code == 0, err
    shutil.rmtree(out / "blobs")
    (out / "blobs").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere/sha256").mkdir(parents=True)
    code, _, err = invoke("push", str(image), f"oci:{out}:v1")
    assert code == ExitCode.USAGE, err
    assert err.startswith(f"error: {out}/blobs is not a directory of an OCI layout")
    assert list((tmp_path / "elsewhere/sha256").iterdir()) == []


# An existing blob is hashed, whatever its size.


def test_push_replaces_a_wrong_blob_of_the_right_size(image: Path, tmp_path: Path) -> None:
    """Failed before: a blob of the right size but wrong bytes was kept unhashed; push said it
    pushed, and every pull then failed (exit 8)."""
    out = tmp_path / "out"
    (out / "blobs/sha256").mkdir(parents=True)
    planted = {}
    for name in ("manifest.json", "keys.json", "layer0.luks"):
        data = (image / name).read_bytes()
        blob = out / "blobs/sha256" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(b"\0" * len(data))
        planted[name] = blob
    code, _, err = invoke("push", str(image), f"oci:{out}:v1")
    assert code == 0, err
    for name, blob in planted.items():
        assert blob.read_bytes() == (image / name).read_bytes(), name
    assert not [p for p in (out / "blobs/sha256").iterdir() if p.name.endswith(".partial")]
    code, _, err = invoke("pull", f"oci:{out}:v1", str(tmp_path / "back"))
    assert code == 0, err


def test_push_replaces_a_blob_that_is_not_a_regular_file(image: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    data = (image / "keys.json").read_bytes()
    victim.write_bytes(b"x" * len(data))
    out = tmp_path / "out"
    (out / "blobs/sha256").mkdir(parents=True)
    (out / "blobs/sha256" / hashlib.sha256(data).hexdigest()).symlink_to(victim)
    code, _, err = invoke("push", str(image), f"oci:{out}:v1")
    assert code == 0, err
    assert victim.read_bytes() == b"x" * len(data)
    assert invoke("pull", f"oci:{out}:v1", str(tmp_path / "back"))[0] == 0


def test_push_keeps_a_correct_blob(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("push", str(image), f"oci:{out}:v1")[0] == 0
    data = (image / "layer0.luks").read_bytes()
    blob = out / "blobs/sha256" / hashlib.sha256(data).hexdigest()
    before = blob.stat().st_ino
    assert invoke("push", str(image), f"oci:{out}:v2")[0] == 0
    assert blob.stat().st_ino == before


# ---- B7, C1, C8: an existing target, trust -----------------------------------------------------


def test_a_damaged_copy_is_never_up_to_date(layout: Path, image: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy"
    assert invoke("pull", f"oci:{layout}:v1", str(target))[0] == 0
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(target))
    assert code == 0 and err.startswith("already up to date:"), err
    data = bytearray((target / "layer0.luks").read_bytes())
    data[-1] ^= 1
    (target / "layer0.luks").write_bytes(bytes(data))  # same size: sizes alone miss it
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(target))
    digest = json.loads(blob_path(layout, manifest_digest(layout)).read_bytes())["config"]
    assert (code, err) == (ExitCode.TAMPERED, f"error: {target} does not match image"
                           f" {digest['digest']} (layer0.luks differs): remove it and pull"
                           " again, or pull into a new directory\n")  # fmt: skip
    data[-1] ^= 1
    (target / "layer0.luks").write_bytes(bytes(data))
    (target / "keys.json").write_bytes(b"{}")
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(target))
    assert code == ExitCode.TAMPERED and "(keys.json differs (rekeyed here?" in err, err


def test_trust_is_checked_whatever_the_target_holds(
    layout: Path, image: Path, tmp_path: Path
) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)  # fmt: skip
    trust = tmp_path / "allowed"
    trust.write_text("a@b " + " ".join((tmp_path / "k.pub").read_text().split()[:2]) + "\n")
    target = tmp_path / "copy"
    code, _, err = invoke("pull", "--trust", str(trust), f"oci:{layout}:v1", str(target))
    assert code == ExitCode.TAMPERED, err
    assert err.startswith(f"error: no key of {trust} signed {target} (it has no"), err
    assert not target.exists() and not list(tmp_path.glob(".copy.pull-*"))
    assert invoke("pull", f"oci:{layout}:v1", str(target))[0] == 0  # unsigned, not asked
    code, _, err = invoke("pull", "--trust", str(trust), f"oci:{layout}:v1", str(target))
    assert code == ExitCode.TAMPERED, err
    assert err.startswith(f"error: no key of {trust} signed {target} (it has no"), err
    assert invoke("sign", str(image), "--sign-key", str(tmp_path / "k"))[0] == 0
    assert invoke("push", str(image), f"oci:{layout}:signed")[0] == 0
    signed = tmp_path / "signed"
    code, _, err = invoke("pull", "--trust", str(trust), f"oci:{layout}:signed", str(signed))
    assert code == 0, err
    assert (signed / "signatures").stat().st_mode & 0o777 == 0o755
    assert len(list((signed / "signatures").iterdir())) == 1
    code, _, err = invoke("pull", "--trust", str(trust), f"oci:{layout}:signed", str(signed))
    assert code == 0 and err.startswith("already up to date:"), err


# A target that appeared while pulling: say where the complete copy is.


def test_the_complete_copy_is_named_when_the_target_appeared(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed before: "TARGET appeared while pulling: choose a new directory", and the complete
    .img.pull-X stayed behind unnamed."""
    from cryptlayer.distribution import transfer

    assert invoke("push", str(image), f"oci:{tmp_path}/layout:v1")[0] == 0
    target = tmp_path / "back"
    real = transfer._WorkDir.publish

    def plant(self: Any) -> None:
        real(self)
        target.mkdir()

    monkeypatch.setattr(transfer._WorkDir, "publish", plant)
    code, _, err = invoke("pull", f"oci:{tmp_path}/layout:v1", str(target))
    assert code == ExitCode.USAGE, err
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".back.pull-")]
    assert err.startswith(f"error: {target} appeared while pulling"), err
    assert f"the complete copy is in {left}" in err and err.count("\n") == 1, err
    assert json.loads((left / "manifest.json").read_bytes()) == json.loads(
        (image / "manifest.json").read_bytes()
    )
    target.rmdir()
    left.rename(target)
    assert invoke("verify", str(target))[0] == 0


# ---- B8, B10: a hostile manifest or layout -----------------------------------------------------


def test_the_statement_is_the_config_blob_and_nothing_else(
    layout: Path, image: Path, tmp_path: Path
) -> None:
    forged = add_blob(layout, b'{"format": "forged"}')

    def titled_manifest(doc: dict[str, Any]) -> None:
        doc["layers"].append({"mediaType": "application/vnd.cryptlayer.layer.v2.luks2",
                              "digest": forged, "size": 20,
                              "annotations": {"org.opencontainers.image.title":
                                              "manifest.json"}})  # fmt: skip

    rewrite(layout, titled_manifest)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert code == ExitCode.USAGE, err
    assert "a layer is titled manifest.json, the statement's name" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("title", "kind"),
    [("job", "layer.v2.luks2"), ("other", "keys.v1+json"), ("x.sig", "signature.v1.sshsig")],
)
def test_only_files_the_statement_names_are_written(
    layout: Path, tmp_path: Path, title: str, kind: str
) -> None:
    job = add_blob(layout, b"#!/bin/sh\nattacker\n")

    def extra(doc: dict[str, Any]) -> None:
        doc["layers"].append({"mediaType": f"application/vnd.cryptlayer.{kind}",
                              "digest": job, "size": 20,
                              "annotations": {"org.opencontainers.image.title": title}})  # fmt: skip

    rewrite(layout, extra)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert code == ExitCode.TAMPERED, err
    assert f"oci:{layout}:v1 carries {title}, a file image sha256:" in err
    assert not (tmp_path / "x").exists()
    work = next(tmp_path.glob(".x.pull-*"))
    assert sorted(os.listdir(work)) == ["manifest.json"]


def test_bad_manifests_and_indexes_are_one_line_errors(layout: Path, tmp_path: Path) -> None:
    original = (layout / "index.json").read_text()
    set_manifest(layout, b"[" * 200_000 + b"]" * 200_000)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert (code, err) == (ExitCode.USAGE, f"error: oci:{layout}:v1 is not a cryptlayer image"
                           " (its manifest is nested too deeply): push one with `cryptlayer"
                           " push`\n")  # fmt: skip
    for index, why in [({"manifests": 5}, "manifests is not a list"),
                       ({"manifests": [{"digest": 5, "annotations": {}}]},
                        "manifests[0] has no digest or annotations object"),
                       ({"manifests": [{"digest": "sha256:00", "annotations": []}]},
                        "manifests[0] has no digest or annotations object"),
                       ({"manifests": [{"digest": "sha256:../../x", "annotations": {}}]},
                        "'sha256:../../x' is not a sha256 digest")]:  # fmt: skip
        (layout / "index.json").write_text(json.dumps(index))
        code, _, err = invoke("pull", f"oci:{layout}", str(tmp_path / "x"))
        assert code == ExitCode.USAGE and why in err and err.count("\n") == 1, err
    (layout / "index.json").write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert (code, err) == (ExitCode.USAGE, f"error: {layout}/index.json is nested too deeply\n")
    (layout / "index.json").write_text(original)


def test_a_symlinked_index_or_blob_of_a_layout_is_said_so(layout: Path, tmp_path: Path) -> None:
    """pull reads a layout with build's reader (oci.LayoutReader) and says what build says of a
    symlink in it. Failed before: `error: LAYOUT/index.json: Too many levels of symbolic links`,
    with no hint."""
    (layout / "index.json").rename(tmp_path / "index.json")
    (layout / "index.json").symlink_to(tmp_path / "index.json")
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert (code, err) == (ExitCode.USAGE, f"error: {layout}/index.json is a symbolic link;"
                           " refusing to read it: an OCI layout holds regular files only; copy"
                           " the image again\n")  # fmt: skip
    assert not (tmp_path / "x").exists()
    (layout / "index.json").unlink()
    (tmp_path / "index.json").rename(layout / "index.json")
    blobs = layout / "blobs/sha256"
    biggest = max(blobs.iterdir(), key=lambda p: p.stat().st_size)  # (a layer: fetched last)
    biggest.rename(tmp_path / "blob")
    biggest.symlink_to(tmp_path / "blob")
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert (code, err) == (ExitCode.USAGE, f"error: {biggest} is a symbolic link; refusing to read"
                           " it: an OCI layout holds regular files only; copy the image"
                           " again\n")  # fmt: skip


# ---- C2, C9: digests by name, --digestfile, a layout without a tag ------------------------------


def test_digest_pins_the_image_digest(layout: Path, image: Path, tmp_path: Path) -> None:
    from cryptlayer.image import manifest as manifest_mod

    image_digest = manifest_mod.load(image).digest
    manifest = manifest_digest(layout)
    code, _, err = invoke("pull", "--digest", image_digest, f"oci:{layout}:v1", str(tmp_path / "a"))
    assert code == 0, err
    assert err.endswith(f"image digest {image_digest} (manifest digest {manifest})\n")
    code, _, err = invoke("pull", "--digest", manifest, f"oci:{layout}:v1", str(tmp_path / "b"))
    assert code == ExitCode.TAMPERED
    assert err.startswith(f"error: oci:{layout}:v1 is image digest {image_digest}, not the"
                          f" pinned {manifest}")  # fmt: skip


def test_digestfile_and_a_layout_of_one_image(image: Path, tmp_path: Path) -> None:
    code, _, err = invoke("push", "--digestfile", str(tmp_path / "d"), str(image),
                       f"oci:{tmp_path}/out:v1")  # fmt: skip
    assert code == 0, err
    written = (tmp_path / "d").read_text()
    assert written == manifest_digest(tmp_path / "out") and f"manifest digest {written}" in err
    code, _, err = invoke("push", "--digestfile", str(tmp_path / "no/d"), str(image),
                       f"oci:{tmp_path}/out:v1")  # fmt: skip
    assert (code, err) == (ExitCode.USAGE, f"error: pushed, but cannot write --digestfile"
                           f" {tmp_path}/no/d: No such file or directory: the manifest digest is"
                           f" {written}\n")  # fmt: skip
    code, _, err = invoke("pull", f"oci:{tmp_path}/out", str(tmp_path / "x"))
    assert code == 0, err
    for name in FILES:
        assert (tmp_path / "x" / name).read_bytes() == (image / name).read_bytes()
    assert invoke("push", str(image), f"oci:{tmp_path}/out:v2")[0] == 0
    code, _, err = invoke("pull", f"oci:{tmp_path}/out", str(tmp_path / "y"))
    assert (code, err) == (ExitCode.USAGE, f"error: oci:{tmp_path}/out names no image (it holds"
                           " 2; tags: v1, v2): name one: oci:PATH:TAG\n")  # fmt: skip


# ---- review: a parent directory others may write (no sticky bit) -------------------------------


def test_a_refused_pull_removes_only_its_own_work_directory(
    layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """In a directory anyone may write without the sticky bit, a neighbour may rename root's
    entries: while `pull --trust` fetches, they move its work directory aside and put root's
    private `precious/` under that name. The refused pull removes what it wrote through its
    own descriptor, never whatever the name leads to now."""
    from cryptlayer.distribution.layout import Layout

    shared = Path(tempfile.mkdtemp(prefix="cryptlayer-ww-", dir="/tmp"))
    shared.chmod(0o777)
    request.addfinalizer(lambda: shutil.rmtree(shared))
    precious = shared / "precious"
    precious.mkdir(mode=0o700)
    (precious / "data").write_bytes(b"root's\n")
    trust = tmp_path / "allowed"
    trust.write_text("a@b ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3fW6fLQzOuX2JD6n6ZYbSnz3rnFlWTmY6"
                     "DkX1hYq6Y\n")  # fmt: skip
    work = f".img.pull-{manifest_digest(layout).removeprefix('sha256:')[:12]}"
    real = Layout.pull_blob

    def swapped(self: Layout, digest: str, size: int, out: Any, progress: Any) -> None:
        real(self, digest, size, out, progress)
        if (shared / work / "keys.json").exists() and not (shared / "aside").exists():
            as_nobody(f"cd {shared}; mv {work} aside; mv precious {work}")

    monkeypatch.setattr(Layout, "pull_blob", swapped)
    code, _, err = invoke("pull", "--trust", str(trust), f"oci:{layout}:v1", str(shared / "img"))
    assert code == ExitCode.TAMPERED, err
    assert (shared / work / "data").read_bytes() == b"root's\n"  # root's, untouched
    assert list((shared / "aside").iterdir()) == []  # what the pull wrote, removed


def test_a_work_directory_replaced_while_pulling_is_not_renamed_into_place(
    layout: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The same neighbour swaps the finished work directory for one of theirs just before the
    rename: the pull says so rather than put their directory at the target as its own."""
    from cryptlayer.distribution.layout import Layout

    shared = Path(tempfile.mkdtemp(prefix="cryptlayer-ww-", dir="/tmp"))
    shared.chmod(0o777)
    request.addfinalizer(lambda: shutil.rmtree(shared))
    work = f".img.pull-{manifest_digest(layout).removeprefix('sha256:')[:12]}"
    real = Layout.pull_blob

    def swapped(self: Layout, digest: str, size: int, out: Any, progress: Any) -> None:
        real(self, digest, size, out, progress)
        if len(os.listdir(shared / work)) == len(FILES) and not (shared / "aside").exists():
            as_nobody(f"cd {shared}; mv {work} aside; mkdir -m 700 {work}")

    monkeypatch.setattr(Layout, "pull_blob", swapped)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(shared / "img"))
    assert (code, err) == (ExitCode.USAGE, f"error: {shared}/{work} was renamed or replaced"
                           f" while pulling: pull into a directory only you can write (not"
                           f" {shared})\n")  # fmt: skip
    assert not (shared / "img").exists()


@pytest.mark.parametrize(("title", "kind", "size"), [
    ("signatures/x.sig", "signature.v1.sshsig", 16385),
    ("keys.json", "keys.v1+json", (4 << 20) + 1),
])  # fmt: skip
def test_files_beside_the_statement_are_bounded_before_they_are_fetched(
    layout: Path, tmp_path: Path, title: str, kind: str, size: int
) -> None:
    """A signature or keys.json larger than cryptlayer ever reads (a hostile registry filling
    the disk before `--trust` refuses the image): refused before a byte of it is written."""
    big = add_blob(layout, b"x" * size)

    def oversized(doc: dict[str, Any]) -> None:
        titled = "org.opencontainers.image.title"
        doc["layers"] = [d for d in doc["layers"] if d["annotations"][titled] != title]
        doc["layers"].append({"mediaType": f"application/vnd.cryptlayer.{kind}",
                              "digest": big, "size": size,
                              "annotations": {"org.opencontainers.image.title": title}})  # fmt: skip

    rewrite(layout, oversized)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert code == ExitCode.TAMPERED, err
    assert f"oci:{layout}:v1 lists {title} with {size} bytes, more than {size - 1}" in err
    work = next(tmp_path.glob(".x.pull-*"))
    assert sorted(os.listdir(work)) == ["manifest.json"]


def test_more_signatures_than_are_ever_read_are_refused(layout: Path, tmp_path: Path) -> None:
    sig = add_blob(layout, b"not a signature\n")

    def many(doc: dict[str, Any]) -> None:
        doc["layers"] += [{"mediaType": "application/vnd.cryptlayer.signature.v1.sshsig",
                           "digest": sig, "size": 16,
                           "annotations": {"org.opencontainers.image.title":
                                           f"signatures/{i}.sig"}} for i in range(65)]  # fmt: skip

    rewrite(layout, many)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert (code, err) == (ExitCode.TAMPERED, f"error: oci:{layout}:v1 lists 65 signatures, more"
                           " than 64: the manifest was changed; pull from the publisher\n")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_a_directory_in_a_layouts_blobs_is_one_error_line(layout: Path, tmp_path: Path) -> None:
    """A blob (here keys.json's, then the manifest) that is a directory: exit 2 and one line
    naming it once, not exit 1 with the descriptor's number ("Is a directory (7)")."""
    doc = json.loads(blob_path(layout, manifest_digest(layout)).read_bytes())
    keys = next(d["digest"] for d in doc["layers"]
                if d["annotations"]["org.opencontainers.image.title"] == "keys.json")  # fmt: skip
    for digest in (keys, manifest_digest(layout)):
        path = blob_path(layout, digest)
        data = path.read_bytes()
        path.unlink()
        path.mkdir()
        code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
        assert code == ExitCode.USAGE, err
        assert err.count(str(layout)) == 1 and "(a directory)" in err, err
        path.rmdir()
        path.write_bytes(data)


def test_a_resumed_work_directory_keeps_only_what_this_image_names(
    layout: Path, tmp_path: Path
) -> None:
    """The work directory is named by 12 hex digits of the manifest digest: a registry can
    serve two manifests that share them (2^24 tries). What an interrupted pull of the first
    left there (a layer, a signature the second does not list) is not installed with the
    second: the target holds exactly the files its manifest names."""
    work = tmp_path / f".x.pull-{manifest_digest(layout).removeprefix('sha256:')[:12]}"
    work.mkdir(mode=0o700)
    (work / "signatures").mkdir(mode=0o700)
    (work / "job").write_bytes(b"#!/bin/sh\nattacker\n")
    (work / "signatures/old.sig").write_bytes(b"not this image's\n")
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "x")) == sorted(FILES)


TITLE = "org.opencontainers.image.title"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
HOSTILE_MANIFESTS = [
    # (case, change to the manifest, what the one error line says in brackets)
    ("another artifact", lambda d: d.update(artifactType="x", config={"mediaType": OCI_CONFIG}),
     "neither its artifactType nor its config's media type is cryptlayer's"),
    ("not an object", lambda d: [d.clear()], "the manifest is not a JSON object"),
    ("no layers", lambda d: d.__delitem__("layers"), "its layers are not a list"),
    ("layers an object", lambda d: d.update(layers={"a": 1}), "its layers are not a list"),
    ("config a string", lambda d: d.update(config="x"), "its config is not an object"),
    ("no annotations", lambda d: d["layers"][0].__delitem__("annotations"),
     "layer 0 has no annotations object"),
    ("a list as title", lambda d: d["layers"][0]["annotations"].update({TITLE: ["x"]}),
     'layer 0\'s file name ["x"] is not printable'),
    ("a dict as digest", lambda d: d["layers"][0].update(digest={"a": [1, "b"]}),
     'layer 0\'s digest {"a": [1, "b"]} is not a sha256 digest'),
    ("a long digest", lambda d: d["layers"][0].update(digest="sha256:" + "\u202e" * 3000),
     'layer 0\'s digest "sha256:\\u202e\\u202e'),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "why"), HOSTILE_MANIFESTS,
                         ids=[c[0] for c in HOSTILE_MANIFESTS])  # fmt: skip
def test_a_hostile_manifest_is_named_without_python(
    layout: Path, tmp_path: Path, case: str, change: Callable[[Any], Any], why: str
) -> None:
    """A manifest from a hostile registry or layout: one short `error:` line saying what is
    wrong, never Python's own words ("'list' object has no attribute 'get'", "('layers')",
    "string indices must be integers"), a repr, or the whole of a huge field."""
    old = manifest_digest(layout)
    doc = json.loads(blob_path(layout, old).read_bytes())
    replaced = change(doc)
    set_manifest(layout, json.dumps(replaced[0] if isinstance(replaced, list) else doc).encode())
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(tmp_path / "x"))
    assert code == ExitCode.USAGE, err
    assert err.startswith(f"error: oci:{layout}:v1 is not a cryptlayer image ({why}"), err
    assert err.count("\n") == 1 and len(err) < 400, err


def test_a_pull_that_finished_meanwhile_is_left_alone(
    layout: Path, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second pull opens the work directory just as the first renames it into place and lets
    go of its lock: the second must not take the finished target for its work directory (a
    refused `--trust` would then empty it)."""
    from cryptlayer import fsutil

    work = tmp_path / f".x.pull-{manifest_digest(layout).removeprefix('sha256:')[:12]}"
    work.mkdir(mode=0o700)
    for name in FILES:
        shutil.copy(image / name, work / name)  # the first pull, complete
    real = fcntl.flock

    def first_pull_finishes(fd: int, op: int) -> None:
        if work.exists():
            os.rename(work, tmp_path / "x")
        real(fd, op)

    monkeypatch.setattr(fsutil.fcntl, "flock", first_pull_finishes)
    trust = tmp_path / "allowed"
    trust.write_text("a@b ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3fW6fLQzOuX2JD6n6ZYbSnz3rnFlWTmY6"
                     "DkX1hYq6Y\n")  # fmt: skip
    code, _, err = invoke("pull", "--trust", str(trust), f"oci:{layout}:v1", str(tmp_path / "x"))
    monkeypatch.undo()
    assert (code, err) == (ExitCode.USAGE, f"error: another pull into {tmp_path}/x finished"
                           " meanwhile: pull again\n")  # fmt: skip
    assert sorted(os.listdir(tmp_path / "x")) == sorted(FILES)


@pytest.mark.parametrize("name", [".hidden.sig", "a\nb.sig"])
def test_push_refuses_a_signature_name_pull_would_refuse(
    image: Path, tmp_path: Path, name: str
) -> None:
    """A signature file whose name is not a plain printable one: push stops, naming it, rather
    than publish an image that every pull refuses."""
    (image / "signatures").mkdir()
    (image / "signatures" / name).write_bytes(b"-----BEGIN SSH SIGNATURE-----\n")
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/out:v1")
    shown = name.replace("\n", "\\n")
    assert (code, err) == (ExitCode.USAGE, f"error: {image}/signatures/{shown} is not a plain"
                           " file name: rename it (NAME.sig) or remove it; pull refuses an image"
                           " carrying it\n")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_full_disk_on_a_small_file_says_so_too(layout: Path, tmp_path: Path) -> None:
    """keys.json (small, so still in the file's buffer when it is closed) on a full file system:
    the same error as for a layer, saying what to do; not a bare "No space left on device"."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(small)], check=True)
    try:
        code, _, err = invoke("pull", f"oci:{layout}:v1", str(small / "x"))
        assert code == ExitCode.USAGE, err
        assert err.startswith(f"error: no space left on the device of {small} for keys.json"), err
        assert "free some space, then pull again: it resumes from .x.pull-" in err
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_neighbours_copy_is_not_up_to_date(layout: Path, image: Path, shared: Path) -> None:
    """Another user puts an exact copy of the image where root will pull it: it matches the
    manifest today, but its owner can change it at any moment (as they can a file in it that
    others may write). Not "already up to date": refused, saying whose it is."""
    source = Path(tempfile.mkdtemp(prefix="cryptlayer-copy-", dir="/tmp"))
    try:
        for name in FILES:
            shutil.copy(image / name, source / name)
            (source / name).chmod(0o644)
        source.chmod(0o755)
        as_nobody(f"cp -r {source} {shared}/img")
    finally:
        shutil.rmtree(source)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(shared / "img"))
    assert (code, err) == (ExitCode.USAGE, f"error: {shared}/img already exists and is not"
                           " yours to vouch for (owned by uid 65534, mode 0755): choose a new"
                           " directory (pull never overwrites)\n")  # fmt: skip
    mine = shared / "mine"
    assert invoke("pull", f"oci:{layout}:v1", str(mine))[0] == 0
    (mine / "keys.json").chmod(0o666)  # anyone may rewrite it in place
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(mine))
    assert (code, err) == (ExitCode.USAGE, f"error: {mine}/keys.json already exists and is not"
                           " yours to vouch for (owned by uid 0, mode 0666): choose a new"
                           " directory (pull never overwrites)\n")  # fmt: skip


def test_a_bad_trust_file_is_refused_before_anything_is_fetched(
    layout: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad").write_text("a@b ssh-ed25519 AAAA\n")
    for trust in (tmp_path / "missing", tmp_path / "bad"):
        code, _, err = invoke(
            "pull", "--trust", str(trust), f"oci:{layout}:v1", str(tmp_path / "x")
        )
        assert code == ExitCode.USAGE and str(trust) in err, err
        assert not list(tmp_path.glob(".x.pull-*"))


def test_a_refused_resumed_pull_removes_a_stale_signatures_directory(
    layout: Path, tmp_path: Path
) -> None:
    """The resumed work directory holds signatures/ from an earlier pull that this (unsigned)
    manifest does not list: `--trust` refuses the image (exit 8) and removes it all, rather
    than stop at the directory ("Is a directory", exit 1)."""
    work = tmp_path / f".x.pull-{manifest_digest(layout).removeprefix('sha256:')[:12]}"
    work.mkdir(mode=0o700)
    (work / "signatures").mkdir(mode=0o700)
    (work / "signatures/old.sig").write_bytes(b"not this image's\n")
    trust = tmp_path / "allowed"
    trust.write_text("a@b ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3fW6fLQzOuX2JD6n6ZYbSnz3rnFlWTmY6"
                     "DkX1hYq6Y\n")  # fmt: skip
    code, _, err = invoke("pull", "--trust", str(trust), f"oci:{layout}:v1", str(tmp_path / "x"))
    assert code == ExitCode.TAMPERED, err
    assert not work.exists() and not (tmp_path / "x").exists()


def test_oci_paths_and_tags_that_cannot_be_are_bad_input(image: Path, tmp_path: Path) -> None:
    """A layout path below a file, and tags skopeo refuses (`oci:PATH:TAG` as containers/image
    reads it): one `error:` line, exit 2, nothing written."""
    (tmp_path / "file").write_text("x")
    code, _, err = invoke("push", str(image), f"oci:{tmp_path}/file/out:v1")
    assert (code, err) == (ExitCode.USAGE, f"error: cannot create {tmp_path}/file/out: Not a"
                           f" directory ({tmp_path}/file is not one)\n")  # fmt: skip
    for tag in ("bad tag", "../../x", "a\nb", ".x"):
        code, _, err = invoke("push", str(image), f"oci:{tmp_path}/out:{tag}")
        assert code == ExitCode.USAGE and err.count("\n") == 1, err
        assert "is not a tag (letters, digits, _ . -; 128 at most)" in err, err
        code, _, err = invoke("pull", f"oci:{tmp_path}/out:{tag}", str(tmp_path / "x"))
        assert code == ExitCode.USAGE and "is not a tag" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("planted", ["symlink", "empty directory"])
def test_a_target_planted_just_before_the_rename(
    layout: Path, shared: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """A neighbour creates the target name in the instant between pull's last look and its
    rename: the rename never replaces it (nor fails on it with a bare 'Not a directory')."""
    from cryptlayer.distribution import transfer

    real = transfer._WorkDir.publish

    def plant(self: Any) -> None:
        real(self)
        make = f"ln -s /etc {shared}/img" if planted == "symlink" else f"mkdir {shared}/img"
        as_nobody(make)

    monkeypatch.setattr(transfer._WorkDir, "publish", plant)
    code, _, err = invoke("pull", f"oci:{layout}:v1", str(shared / "img"))
    (work,) = shared.glob(".img.pull-*")
    assert (code, err) == (ExitCode.USAGE, f"error: {shared}/img appeared while pulling; the"
                           f" complete copy is in {work}: rename it yourself (mv {work}"
                           f" NEW-DIRECTORY), or remove it (rm -r {work})\n")  # fmt: skip
    assert os.stat(shared / "img", follow_symlinks=False).st_uid == 65534  # theirs, untouched


# ---- issue 22 item 3: one "make if absent, open without following" (fsutil.open_dir) -----------


def test_the_directories_made_and_opened_by_descriptor(image: Path, tmp_path: Path) -> None:
    """signatures/ (sign), a layout's directories (push) and the work directory (pull) are made
    and opened by fsutil.make_dir/open_dir: a symlink in their place is refused, never followed;
    each caller says so in its own words, as before."""
    import errno

    from cryptlayer.fsutil import DIR_FLAGS, open_dir

    assert DIR_FLAGS & os.O_NOFOLLOW and DIR_FLAGS & os.O_DIRECTORY and DIR_FLAGS & os.O_CLOEXEC
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError) as err:
        open_dir(tmp_path / "link", mode=0o700)
    assert err.value.errno in (errno.ENOTDIR, errno.ELOOP)  # (Linux: ENOTDIR, O_DIRECTORY first)
    os.close(open_dir(tmp_path / "made", mode=0o700))
    assert (tmp_path / "made").stat().st_mode & 0o777 == 0o700
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (image / "signatures").symlink_to(tmp_path / "elsewhere")
    code, _, text = invoke("sign", str(image), "--sign-key", str(key))
    assert (code, text) == (ExitCode.USAGE, f"error: {image}/signatures is not a directory:"
                            " remove it, then sign again\n")  # fmt: skip
    assert list((tmp_path / "elsewhere").iterdir()) == []
    (image / "signatures").unlink()
    assert invoke("sign", str(image), "--sign-key", str(key))[0] == 0
    assert (image / "signatures").is_dir() and not (image / "signatures").is_symlink()
