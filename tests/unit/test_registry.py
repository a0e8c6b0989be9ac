"""push, pull, login against a real registry (Debian's docker-registry) and skopeo's copies;
no device-mapper needed, so all of it runs on the host. The small image is a header-only layer
(luksfixtures.fake_image): what moves is bytes and digests, never plaintext."""

from __future__ import annotations

import filecmp
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from luksfixtures import fake_image
from registryfixtures import PASSWORD, USER, RunningRegistry

from cryptlayer.errors import ExitCode

FILES = ("manifest.json", "keys.json", "layer0.luks", "layer0.verity")


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the blob-location cache goes: the test's own."""
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "auth.json"
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))
    return path


def same_image(a: Path, b: Path) -> None:
    for name in FILES:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture
def requests_made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every HTTP request the client makes, (method, url)."""
    import requests

    made: list[tuple[str, str]] = []
    original = requests.Session.request

    def counting(self: Any, method: str, url: str, *args: Any, **kw: Any) -> Any:
        full = requests.Request(method, url, params=kw.get("params")).prepare().url
        made.append((method, str(full)))
        return original(self, method, url, *args, **kw)

    monkeypatch.setattr(requests.Session, "request", counting)
    return made


def test_push_pull_round_trip(plain: RunningRegistry, image: Path, tmp_path: Path,
                              requests_made: list[tuple[str, str]]) -> None:  # fmt: skip
    ref = f"docker://{plain.host}/team/app:v1"
    code, _, err = invoke("push", "--no-tls-verify", str(image), ref)
    assert code == 0, err
    assert err.endswith("(4 blob(s) sent)\n")  # statement, layer, tree, keys.json
    code, _, err = invoke("push", "--no-tls-verify", str(image), ref)
    assert (code, err.endswith("(0 blob(s) sent)\n")) == (0, True)  # all there: nothing uploaded
    assert not [m for m, url in requests_made[-8:] if m in ("POST", "PATCH")]
    code, _, err = invoke("pull", "--no-tls-verify", ref, str(tmp_path / "copy"))
    assert code == 0, err
    same_image(image, tmp_path / "copy")
    assert not list(tmp_path.glob(".copy.pull-*"))
    requests_made.clear()
    code, _, err = invoke("pull", "--no-tls-verify", ref, str(tmp_path / "copy"))
    assert (code, err.startswith("already up to date:")) == (0, True)
    # one manifest request (--tls-verify=false tries https first, as skopeo: refused by TLS)
    assert requests_made == [("GET", f"{scheme}://{plain.host}/v2/team/app/manifests/v1")
                             for scheme in ("https", "http")]  # fmt: skip


def test_skopeo_copies_still_pull_and_keep_the_digest(
    plain: RunningRegistry, image: Path, tmp_path: Path
) -> None:
    invoke("push", "--no-tls-verify", str(image), f"{plain.host}/src/app:v1")
    copy = ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false"]
    subprocess.run([*copy, f"docker://{plain.host}/src/app:v1",
                    f"docker://{plain.host}/mirror/app:v1"], check=True)  # fmt: skip
    subprocess.run([*copy, f"docker://{plain.host}/src/app:v1", f"oci:{tmp_path}/layout:v1"],
                   check=True)  # fmt: skip
    subprocess.run([*copy, f"oci:{tmp_path}/layout:v1", f"docker://{plain.host}/back/app:v1"],
                   check=True)  # fmt: skip
    digests = set()
    for i, ref in enumerate((f"docker://{plain.host}/mirror/app:v1", f"oci:{tmp_path}/layout:v1",
                             f"{plain.host}/back/app:v1")):  # fmt: skip
        code, _, err = invoke("pull", "--no-tls-verify", ref, str(tmp_path / f"p{i}"))
        assert code == 0, err
        same_image(image, tmp_path / f"p{i}")
        digests.add(err.rsplit(": ", 1)[-1].strip())
    assert len(digests) == 1


def test_oci_layout_push_then_skopeo_to_a_registry(
    plain: RunningRegistry, image: Path, tmp_path: Path
) -> None:
    assert invoke("push", str(image), f"oci:{tmp_path}/out:rel")[0] == 0
    index = json.loads((tmp_path / "out/index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "rel"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{tmp_path}/out:rel",
                    f"docker://{plain.host}/fromlayout/app:rel"], check=True)  # fmt: skip
    code, _, err = invoke("pull", "--no-tls-verify", f"{plain.host}/fromlayout/app:rel",
                          str(tmp_path / "back"))  # fmt: skip
    assert code == 0, err
    same_image(image, tmp_path / "back")


def test_registry_down(image: Path) -> None:
    """A dead port, with the flag: it cannot be reached (no plain-HTTP hint); a network failure
    exits 1, not 2 (bad input). Failed before: exit 2 and "a plain-HTTP registry needs ..."."""
    code, _, err = invoke("push", "--tls-verify=false", str(image), "127.0.0.1:9/x/y:z")
    assert (code, err) == (ExitCode.FAILURE, "error: cannot reach registry 127.0.0.1:9 (connection"
                           " refused): is it running, and is 127.0.0.1:9 its host:port?\n")  # fmt: skip


def test_unknown_tag(plain: RunningRegistry, tmp_path: Path) -> None:
    code, _, err = invoke(
        "pull", "--no-tls-verify", f"{plain.host}/no/such:tag", str(tmp_path / "x")
    )
    assert code == ExitCode.USAGE
    assert err == (f"error: docker://{plain.host}/no/such:tag has no manifest tag: check the"
                   " repository and tag\n")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_tampered_blob_in_the_registry(plain: RunningRegistry, image: Path, tmp_path: Path) -> None:
    invoke("push", "--no-tls-verify", str(image), f"{plain.host}/tamper/app:v1")
    data = plain.storage / "docker/registry/v2/blobs/sha256"
    layer = next(
        p for p in data.rglob("data") if p.stat().st_size == (image / "layer0.luks").stat().st_size
    )
    blob = bytearray(layer.read_bytes())
    blob[-1] ^= 1
    layer.write_bytes(bytes(blob))
    try:
        code, _, err = invoke("pull", "--no-tls-verify", f"{plain.host}/tamper/app:v1",
                              str(tmp_path / "x"))  # fmt: skip
        assert code == ExitCode.TAMPERED
        assert "does not match its digest: the registry or the network changed it" in err
        assert not (tmp_path / "x").exists()
    finally:
        blob[-1] ^= 1
        layer.write_bytes(bytes(blob))


def test_a_manifest_that_is_not_a_cryptlayer_image(plain: RunningRegistry, tmp_path: Path) -> None:
    import hashlib

    import requests

    base = f"http://{plain.host}/v2/other/image"
    config = b"{}"
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    upload = requests.post(f"{base}/blobs/uploads/", timeout=10).headers["Location"]
    requests.put(upload if upload.startswith("http") else f"http://{plain.host}{upload}",
                 params={"digest": digest}, data=config, timeout=10).raise_for_status()  # fmt: skip
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": digest, "size": 2}, "layers": []}  # fmt: skip
    requests.put(f"{base}/manifests/v1", json=manifest, timeout=10,
                 headers={"Content-Type": manifest["mediaType"]}).raise_for_status()  # fmt: skip
    code, _, err = invoke(
        "pull", "--no-tls-verify", f"{plain.host}/other/image:v1", str(tmp_path / "x")
    )
    assert code == ExitCode.USAGE
    assert err.startswith(f"error: docker://{plain.host}/other/image:v1 is not a cryptlayer image")


def test_interrupted_pull_resumes(plain: RunningRegistry, image: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  requests_made: list[tuple[str, str]]) -> None:  # fmt: skip
    from cryptlayer.distribution import registry as registry_mod

    invoke("push", "--no-tls-verify", str(image), f"{plain.host}/resume/app:v1")
    original = registry_mod.Registry.pull_blob
    pulled: list[str] = []

    def interrupted(self: Any, digest: str, *args: Any) -> None:
        if len(pulled) == 2:
            raise KeyboardInterrupt
        pulled.append(digest)
        original(self, digest, *args)

    monkeypatch.setattr(registry_mod.Registry, "pull_blob", interrupted)
    code, _, err = invoke(
        "pull", "--no-tls-verify", f"{plain.host}/resume/app:v1", str(tmp_path / "x")
    )
    assert (code, err) == (130, "error: interrupted\n")
    assert not (tmp_path / "x").exists() and len(list(tmp_path.glob(".x.pull-*"))) == 1
    monkeypatch.setattr(registry_mod.Registry, "pull_blob", original)
    requests_made.clear()
    code, _, err = invoke(
        "pull", "--no-tls-verify", f"{plain.host}/resume/app:v1", str(tmp_path / "x")
    )
    assert code == 0, err
    fetched = {url.rsplit("/", 1)[-1] for m, url in requests_made if "/blobs/" in url}
    assert fetched.isdisjoint(pulled)  # the complete ones were checked, not fetched again
    same_image(image, tmp_path / "x")


def test_pull_pins_and_trust(plain: RunningRegistry, image: Path, tmp_path: Path) -> None:
    invoke("push", "--no-tls-verify", str(image), f"{plain.host}/pin/app:v1")
    wrong = "sha256:" + "0" * 64
    code, _, err = invoke("pull", "--no-tls-verify", "--digest", wrong, f"{plain.host}/pin/app:v1",
                          str(tmp_path / "x"))  # fmt: skip
    assert code == ExitCode.TAMPERED and f"not the pinned {wrong}" in err
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    trust = tmp_path / "allowed"
    trust.write_text("a@b " + " ".join((tmp_path / "k.pub").read_text().split()[:2]) + "\n")
    code, _, err = invoke("pull", "--no-tls-verify", "--trust", str(trust), f"{plain.host}/pin/app:v1",
                          str(tmp_path / "y"))  # fmt: skip
    assert code == ExitCode.TAMPERED and "it has no signatures/*.sig" in err
    assert not (tmp_path / "y").exists()
    invoke("sign", str(image), "--sign-key", str(tmp_path / "k"))
    invoke("push", "--no-tls-verify", str(image), f"{plain.host}/pin/signed:v1")
    code, _, err = invoke("pull", "--no-tls-verify", "--trust", str(trust),
                          f"{plain.host}/pin/signed:v1", str(tmp_path / "z"))  # fmt: skip
    assert code == 0, err
    assert len(list((tmp_path / "z/signatures").iterdir())) == 1


def test_login_tls_and_auth(
    secure: RunningRegistry, image: Path, tmp_path: Path, auth: Path
) -> None:
    assert secure.cert_dir is not None
    ref = f"{secure.host}/private/app:v1"
    code, _, err = invoke("push", str(image), ref)
    assert code == ExitCode.USAGE and err.startswith(
        f"error: TLS with registry {secure.host} failed"
    )
    cert = ["--cert-dir", str(secure.cert_dir)]
    code, _, err = invoke("push", *cert, str(image), ref)
    assert (code, err) == (ExitCode.USAGE, f"error: registry {secure.host} refused access (HTTP"
                           f" 401): log in first: cryptlayer login --username USER {secure.host}\n")  # fmt: skip
    code, _, err = invoke(
        "login", *cert, "-u", USER, "--password-stdin", secure.host, input="nope\n"
    )
    assert code == ExitCode.USAGE and "refused access (HTTP 401)" in err
    assert not auth.exists()
    code, _, err = invoke("login", *cert, "-u", USER, "--password-stdin", secure.host,
                          input=f"{PASSWORD}\n")  # fmt: skip
    assert code == 0, err
    assert auth.stat().st_mode & 0o777 == 0o600
    assert secure.host in json.loads(auth.read_text())["auths"]
    assert invoke("push", *cert, str(image), ref)[0] == 0
    code, _, err = invoke("pull", *cert, ref, str(tmp_path / "x"))
    assert code == 0, err
    same_image(image, tmp_path / "x")
    assert invoke("logout", secure.host)[0] == 0
    assert json.loads(auth.read_text())["auths"] == {}
    code, _, err = invoke("pull", *cert, ref, str(tmp_path / "y"))
    assert code == ExitCode.USAGE and "refused access (HTTP 401)" in err


def test_no_plaintext_or_key_in_what_was_pushed(plain: RunningRegistry, image: Path) -> None:
    """The registry stores the image's files byte for byte: ciphertext, hashes, wrapped keys."""
    invoke("push", "--no-tls-verify", str(image), f"{plain.host}/plain/app:v1")
    stored = {p.read_bytes() for p in plain.storage.rglob("data")}
    for name in FILES:
        assert (image / name).read_bytes() in stored, name


def test_disk_full_then_resume(plain: RunningRegistry, tmp_path: Path) -> None:
    """A pull that fills its file system stops with a clear error and resumes once there is room."""
    big = fake_image(tmp_path / "big", size=3 << 20)
    assert invoke("push", "--no-tls-verify", str(big), f"{plain.host}/full/app:v1")[0] == 0
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        code, _, err = invoke("pull", "--no-tls-verify", f"{plain.host}/full/app:v1",
                              str(small / "img"))  # fmt: skip
        assert code == ExitCode.USAGE
        assert err.startswith(f"error: no space left on the device of {small} for layer0.luks")
        assert "free some space, then pull again: it resumes from .img.pull-" in err
        assert not (small / "img").exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True)
        code, _, err = invoke("pull", "--no-tls-verify", f"{plain.host}/full/app:v1",
                              str(small / "img"))  # fmt: skip
        assert code == 0, err
        same_image(big, small / "img")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_push_to_another_repository_mounts(plain: RunningRegistry, image: Path,
                                           requests_made: list[tuple[str, str]]) -> None:  # fmt: skip
    """The registry has the blobs in another repository: mounted, not sent (as skopeo does)."""
    assert invoke("push", "--no-tls-verify", str(image), f"{plain.host}/one/app:v1")[0] == 0
    requests_made.clear()
    code, _, err = invoke("push", "--no-tls-verify", str(image), f"{plain.host}/two/app:v1")
    assert (code, err.endswith("(0 blob(s) sent)\n")) == (0, True)
    mounts = [url for method, url in requests_made if method == "POST"]
    assert len(mounts) == 4 and all("mount=sha256" in u and "from=one%2Fapp" in u for u in mounts)
    assert not [m for m, _ in requests_made if m in ("PUT", "PATCH") and "/blobs/" in _]


def test_pull_shows_progress_on_a_terminal(plain: RunningRegistry, tmp_path: Path) -> None:
    """Per blob: its name, the share done and the rate; -q: nothing."""
    import sys

    from terminal import in_pty

    big = fake_image(tmp_path / "big", size=2 << 20)
    invoke("push", "--no-tls-verify", str(big), f"{plain.host}/progress/app:v1")
    pull = [sys.executable, "-m", "cryptlayer", "pull", "--no-tls-verify",
            f"{plain.host}/progress/app:v1"]  # fmt: skip
    code, out = in_pty([*pull, str(tmp_path / "a")], [])
    assert code == 0, out
    assert "layer0.luks pull" in out and "100%" in out and "MiB/s" in out
    code, out = in_pty([*pull, "-q", str(tmp_path / "b")], [])
    assert code == 0, out
    assert "%" not in out and out.startswith("pulled ")


def test_bearer_token_auth(tmp_path: Path, auth: Path) -> None:
    """The token flow as Docker Hub and Harbor do it, against a small token-issuing server: a
    401 with `Bearer realm=...`, a token from the realm with the stored credentials, the request
    again with the token."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            host = f"127.0.0.1:{self.server.server_address[1]}"
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            if self.path.startswith("/token"):
                good = "Basic " + base64.b64encode(b"bob:hunter2").decode()
                ok = self.headers.get("Authorization") == good and "service=reg" in self.path
                self.send_response(200 if ok else 401)
                self.end_headers()
                if ok:
                    self.wfile.write(b'{"token": "t0k3n"}')
                return
            if self.headers.get("Authorization") == "Bearer t0k3n":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")
                return
            self.send_response(401)
            self.send_header("WWW-Authenticate",
                             f'Bearer realm="http://{host}/token",service="reg"')  # fmt: skip
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        code, _, err = invoke("login", "--no-tls-verify", "-u", "bob", "--password-stdin", host,
                              input="wrong\n")  # fmt: skip
        assert code == ExitCode.USAGE and "refused access (HTTP 401)" in err
        code, _, err = invoke("login", "--no-tls-verify", "-u", "bob", "--password-stdin", host,
                              input="hunter2\n")  # fmt: skip
        assert code == 0, err
        assert seen[-3:] == ["/v2/ None", "/token?service=reg " + "Basic "
                             + base64.b64encode(b"bob:hunter2").decode(),
                             "/v2/ Bearer t0k3n"]  # fmt: skip
    finally:
        server.shutdown()
