"""What an attacker's review of issue 21's fixes still found: auth-file errors, a password in a
reference echoed, `sign` writing by path in a directory others can write, an existing blob of
the right size kept unhashed in an `oci:` layout, and a complete pull left behind unnamed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from luksfixtures import fake_image
from registryfixtures import hostile

from cryptlayer.errors import ExitCode


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return fake_image(tmp_path / "img")


# ---- 1. a malformed auth file: one line naming the file and what is wrong, exit 2 ------------


def always_401(request: Any) -> None:
    request.send_response(401)
    request.send_header("WWW-Authenticate", 'Basic realm="r"')
    request.send_header("Content-Length", "0")
    request.end_headers()


@pytest.mark.parametrize(("auths", "said"), [
    ('[]', '"auths" is not an object'),
    ('{"HOST": {"auth": "/w=="}}', "is not base64 of USER:PASSWORD in UTF-8"),
    ('{"HOST": {"auth": "!!!"}}', "is not base64 of USER:PASSWORD in UTF-8"),
    ('{"HOST": {"auth": "' + base64.b64encode(b":pw").decode() + '"}}', "is not base64 of USER"),
    ('{"HOST": {"auth": 5}}', "is not base64 of USER:PASSWORD in UTF-8"),
    ('null', '"auths" is not an object'),
])  # fmt: skip
@pytest.mark.parametrize("command", ["pull", "push"])
def test_a_malformed_auth_file_is_one_error_line(
    tmp_path: Path, image: Path, auths: str, said: str, command: str
) -> None:
    """A registry answering every request 401 Basic: the stored credentials are needed, and the
    file that should hold them is malformed. (Passed on bff4b56 already: a control.)"""
    path = Path(os.environ["REGISTRY_AUTH_FILE"])
    with hostile(always_401) as a:
        path.write_text('{"auths": ' + auths.replace("HOST", a.host) + "}")
        ref = f"docker://{a.host}/x/y:v1"
        args = [ref, str(tmp_path / "out")] if command == "pull" else [str(image), ref]
        code, _, err = invoke(command, "--tls-verify=false", *args)
    assert code == ExitCode.USAGE, err
    assert err.startswith(f"error: auth file {path}") and said in err, err
    assert err.count("\n") == 1 and "unexpected" not in err


# ---- 2. a reference carries no credentials, and no error echoes them ------------------------


@pytest.mark.parametrize("ref", [
    "docker://user:s3cret@registry.example.com/repo",
    "user:s3cret@registry.example.com/repo:v1",
    "docker://user:s3cret@registry.example.com",
    "docker://user:s3/cret@registry.example.com/repo",
    "docker://user:s3cret@sha256:00@registry.example.com/repo",
    "docker://user:s3cret@localhost:5000/repo@sha256:" + "0" * 64,
])  # fmt: skip
def test_a_password_in_a_reference_is_never_echoed(image: Path, tmp_path: Path, ref: str) -> None:
    """Failed before: "...user:s3cret@registry.example.com/repo: 'registry.example.com/repo' is
    not a sha256 digest"."""
    for args in (["pull", ref, str(tmp_path / "x")], ["push", str(image), ref],
                 ["inspect", ref if ref.startswith("docker://") else f"docker://{ref}"],
                 ["login", "-u", "u", "--password-stdin", ref],
                 ["pull", "--creds", "u", ref, str(tmp_path / "x")],
                 ["push", "--creds", "u", str(image), ref]):  # fmt: skip
        code, _, err = invoke(*args, input="pw\n")
        assert code == ExitCode.USAGE, (args, err)
        assert "s3" not in err and "cret" not in err, (args, err)
        assert err.startswith("error: a reference carries no credentials"), (args, err)
        assert err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_a_bad_digest_is_named_without_the_reference(tmp_path: Path) -> None:
    code, _, err = invoke("pull", "docker://host.example/repo@sha256:abc", str(tmp_path / "x"))
    assert code == ExitCode.USAGE
    assert err.startswith("error: 'sha256:abc' is not a sha256 digest"), err


# ---- 3. sign: by descriptor, in a directory only root may write ---------------------------


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import subprocess

    path = tmp_path_factory.mktemp("ssh") / "ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_sign_never_writes_through_a_symlinked_signatures_dir(
    image: Path, tmp_path: Path, key: Path
) -> None:
    """Failed before: `signatures -> elsewhere` was followed by mkdir, then checked by name (a
    swap between check and write chose where NAME.sig went); now it is refused by descriptor."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (image / "signatures").symlink_to(elsewhere)
    code, _, err = invoke("sign", str(image), "--sign-key", str(key), "--name", "rel")
    assert code == ExitCode.USAGE, err
    assert err.startswith(f"error: {image}/signatures is not a directory"), err
    assert list(elsewhere.iterdir()) == []


def test_sign_never_writes_through_a_signatures_dir_swapped_while_signing(
    image: Path, tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """signatures/ swapped for a symlink after sign looked at it (as a neighbour could in a
    directory they can write). Failed before: rel.sig was created in `elsewhere`."""
    from cryptlayer import signatures

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (image / "signatures").mkdir()
    real = signatures.sign

    def swap(private: Any, message: bytes) -> str:
        (image / "signatures").rename(image / "signatures.old")
        (image / "signatures").symlink_to(elsewhere)
        return real(private, message)

    monkeypatch.setattr(signatures, "sign", swap)
    code, _, err = invoke("sign", str(image), "--sign-key", str(key), "--name", "rel")
    assert list(elsewhere.iterdir()) == []
    assert code == 0, err
    assert (image / "signatures.old/rel.sig").read_text().startswith("-----BEGIN SSH SIGNATURE")


def test_sign_refuses_a_manifest_swapped_before_it_is_signed(
    image: Path, key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement signed is the one in the directory written to."""
    from cryptlayer import manifest

    real = manifest.load

    def swap(path: Path) -> Any:
        loaded = real(path)
        (image / "manifest.json").write_bytes(loaded.raw.replace(b"{", b"{ ", 1))
        return loaded

    monkeypatch.setattr(manifest, "load", swap)
    code, _, err = invoke("sign", str(image), "--sign-key", str(key), "--name", "rel")
    assert (code, err) == (ExitCode.USAGE,
                           f"error: {image}/manifest.json changed while signing: sign again\n")  # fmt: skip
    assert not (image / "signatures/rel.sig").exists()


def test_sign_refuses_a_shared_image_directory(image: Path, key: Path) -> None:
    """Failed before: a 0777 image directory was signed in by name."""
    image.chmod(0o777)
    code, _, err = invoke("sign", str(image), "--sign-key", str(key), "--name", "rel")
    assert code == ExitCode.USAGE, err
    assert err.startswith(f"error: image directory {image} is writable by users other than root")
    assert "--allow-shared-dir" in err and err.count("\n") == 1
    assert not (image / "signatures").exists()
    code, _, err = invoke("sign", str(image), "--sign-key", str(key), "--name", "rel",
                       "--allow-shared-dir")  # fmt: skip
    assert code == 0, err
    sig = image / "signatures/rel.sig"
    assert sig.read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    assert [p.name for p in sig.parent.iterdir()] == ["rel.sig"]  # no temporary file left
    assert (sig.stat().st_mode & 0o777, sig.parent.stat().st_mode & 0o777) == (0o644, 0o755)
    code, _, err = invoke("verify", str(image))
    assert code == 0, err


def test_sign_replaces_a_signature_atomically(image: Path, key: Path) -> None:
    assert invoke("sign", str(image), "--sign-key", str(key), "--name", "rel")[0] == 0
    sig = image / "signatures/rel.sig"
    sig.write_text("old\n")
    (image / "signatures/elsewhere").write_text("kept\n")
    code, _, err = invoke("sign", str(image), "--sign-key", str(key), "--name", "rel")
    assert code == 0, err
    assert sig.read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    assert sorted(p.name for p in sig.parent.iterdir()) == ["elsewhere", "rel.sig"]


# ---- 4. push to a layout someone else prepared: an existing blob is hashed ------------------


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


# ---- 5. a target that appeared while pulling: say where the complete copy is ---------------


def test_the_complete_copy_is_named_when_the_target_appeared(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed before: "TARGET appeared while pulling: choose a new directory", and the complete
    .img.pull-X stayed behind unnamed."""
    from cryptlayer import transfer

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
