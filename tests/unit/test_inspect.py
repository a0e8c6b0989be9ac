"""`inspect` and `ps` as skopeo and podman users type them: --format, `inspect docker://REF`
without pulling the layers (against Debian's docker-registry, and a hostile registry), and
output that reads as typed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from copyfixtures import DAMAGE, one_line
from luksfixtures import fake_image
from registryfixtures import RunningRegistry
from test_manifest import GOOD, set_path

from cryptlayer.distribution import artifact
from cryptlayer.errors import ExitCode
from cryptlayer.runtime import state


@pytest.fixture(autouse=True)
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return fake_image(tmp_path / "img", cmd=("sh", "-c", "echo 'hi there'; ls"))


def test_inspect_format(image: Path) -> None:
    code, out, _ = invoke("inspect", "--json", str(image))
    assert code == 0
    doc = json.loads(out)
    assert invoke("inspect", "--format", "json", str(image))[1] == out
    code, out, err = invoke("inspect", "--format", "{{.Digest}}", str(image))
    assert (code, out, err) == (0, doc["digest"] + "\n", "")
    code, out, _ = invoke("inspect", "-f", "{{.Config.Cmd}}\\t{{json .config.env}}", str(image))
    assert out == '["sh", "-c", "echo \'hi there\'; ls"]\t[]\n'


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{.Digst}}", "error: --format '{{.Digst}}': the document has no field 'Digst': its"
         " fields are .image, .signatures, .digest, .cipher, .created, .state, .layers, .access,"
         " .config\n"),
        ("{{.Config.Command}}", "error: --format '{{.Config.Command}}': .Config has no field"
         " 'Command': its fields are .entrypoint, .cmd, .env, .workdir, .user, .exposed_ports,"
         " .labels\n"),
        ("{{printf \"%s\" .Digest}}", "error: --format '{{printf \"%s\" .Digest}}':"
         " {{printf \"%s\" .Digest}} is not a field: write {{.Field}} or {{json .Field}}: no"
         " other template functions are supported\n"),
        ("{{.Digest", "error: --format '{{.Digest': an unclosed {{ or }}: write {{.Field}}\n"),
    ],
)  # fmt: skip
def test_inspect_format_refuses_what_it_does_not_know(
    image: Path, template: str, message: str
) -> None:
    code, out, err = invoke("inspect", "--format", template, str(image))
    assert (code, out, err) == (ExitCode.USAGE, "", message)


def test_inspect_shows_the_command_with_its_quoting(image: Path) -> None:
    """It printed `sh -c echo 'hi there'; ls`: not the command the image runs."""
    code, out, _ = invoke("inspect", str(image))
    assert code == 0
    assert "command: sh -c 'echo '\"'\"'hi there'\"'\"'; ls'\n" in out


def test_template_values_cannot_forge_lines(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "evil", cmd=("a\nforged: line\x1b[2J",))
    code, out, _ = invoke("inspect", "--format", "{{.Config.Cmd}}|{{.Created}}", str(image))
    assert code == 0 and out.count("\n") == 1 and "\x1b" not in out
    code, out, _ = invoke("inspect", "--format", "{{.Image}}\\n", str(image))
    assert out == f"{image}\n\n"  # the template's own \n is a newline


def _record(name: str) -> None:
    state.create(state.Record(name, f"/srv/{name}", True, state.Mode.START, 0, rootfs=f"/run/{name}",
                              created="2026-11-29T08:00:00+00:00", layers=2,
                              boot=state.boot_id()))  # fmt: skip


def test_ps_format() -> None:
    code, out, err = invoke("ps", "--format", "{{.Name}}\\t{{.Status}}")
    assert (code, out, err) == (0, "", "")
    code, _, err = invoke("ps", "--format", "{{.Names}}")  # podman's name for it
    assert code == ExitCode.USAGE  # refused even with no container to show
    assert err == ("error: --format '{{.Names}}': the document has no field 'Names': its fields"
                   " are .name, .image, .mode, .status, .rootfs, .layers, .shred_on_stop,"
                   " .created\n")  # fmt: skip
    _record("job1")
    _record("job2")
    code, out, _ = invoke("ps", "--format", "{{.Name}}\\t{{.Status}}\\t{{.ShredOnStop}}")
    assert (code, out) == (0, "job1\tassembled\ttrue\njob2\tassembled\ttrue\n")
    code, out, _ = invoke("ps", "--format", "json")
    assert [row["name"] for row in json.loads(out)] == ["job1", "job2"]


# -- inspect docker://REF ----------------------------------------------------------------------


@pytest.fixture
def requests_made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    import requests

    made: list[tuple[str, str]] = []
    original = requests.Session.request

    def counting(self: Any, method: str, url: str, *args: Any, **kw: Any) -> Any:
        made.append((method, url))
        return original(self, method, url, *args, **kw)

    monkeypatch.setattr(requests.Session, "request", counting)
    return made


def test_inspect_a_registry_image_without_pulling_its_layers(
    plain: RunningRegistry, image: Path, tmp_path: Path, requests_made: list[tuple[str, str]]
) -> None:
    """As `skopeo inspect`: the image digest, the manifest digest, signers and layers, with
    only the manifest and the small blobs fetched."""
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    assert invoke("sign", str(image), "--sign-key", str(key))[0] == 0
    ref = f"docker://{plain.host}/team/inspect:v1"
    code, _, err = invoke("push", "--no-tls-verify", str(image), ref)
    assert code == 0, err
    import requests

    pushed = _sha(requests.get(f"http://{plain.host}/v2/team/inspect/manifests/v1", timeout=10,
                               headers={"Accept": artifact.MANIFEST_TYPE}).content)  # fmt: skip
    local = json.loads(invoke("inspect", "--json", str(image))[1])
    requests_made.clear()
    code, out, err = invoke("inspect", "--no-tls-verify", "--json", ref)
    assert code == 0, err
    remote = json.loads(out)
    assert remote["image"] == ref
    assert remote["digest"] == local["digest"]  # the image digest, as of the local copy
    assert remote["manifest_digest"] == pushed
    assert [s["status"] for s in remote["signatures"]] == ["valid"]
    assert remote["signatures"][0]["key"] == local["signatures"][0]["key"]
    assert remote["access"] == local["access"]
    assert remote["config"] == local["config"]
    assert remote["state"] == "in the registry"
    layer = remote["layers"][0]
    assert (layer["file"], layer["keyslots"], layer["state"]) == ("layer0.luks", None,
                                                                   "in the registry")  # fmt: skip
    assert layer["digest"] == _sha((image / "layer0.luks").read_bytes())
    fetched = [url.rsplit("/", 1)[-1] for method, url in requests_made if "/blobs/" in url]
    assert layer["digest"] not in fetched  # no layer, no hash tree
    assert _sha((image / "layer0.verity").read_bytes()) not in fetched
    assert len(fetched) == 3  # the statement, keys.json, the signature
    code, out, _ = invoke("inspect", "--no-tls-verify", "-f", "{{.ManifestDigest}}", ref)
    assert (code, out) == (0, pushed + "\n")
    code, out, _ = invoke("inspect", "--no-tls-verify", ref)
    assert code == 0
    assert f"digest:  {local['digest']}\nmanifest: {pushed}" in out
    assert f"layer 0: layer0.luks {layer['size']} bytes, {layer['digest']} (in the registry)" in out


@contextmanager
def hostile_registry(
    manifest: dict[str, Any], blobs: dict[str, bytes], encoding: str = ""
) -> Iterator[tuple[str, list[str]]]:
    """A registry that serves `manifest` for every tag and `blobs` by digest; yields HOST:PORT
    and the digests of the blobs asked for."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            if "/manifests/" in self.path:
                body = json.dumps(manifest).encode()
            elif "/blobs/" in self.path:
                asked.append(self.path.rsplit("/", 1)[-1])
                body = blobs.get(self.path.rsplit("/", 1)[-1], b"")
            else:
                body = b"{}"
            self.send_response(200)
            if encoding and "/blobs/" in self.path:
                self.send_header("Content-Encoding", encoding)  # asked for identity or not
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    asked: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _manifest_of(image: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The OCI manifest `push` makes of `image`, and its blobs by digest."""
    statement = (image / "manifest.json").read_bytes()
    files = [("layer0.luks", artifact.LAYER_TYPE), ("layer0.verity", artifact.TREE_TYPE),
             ("keys.json", artifact.KEYS_TYPE)]  # fmt: skip
    data = {name: (image / name).read_bytes() for name, _ in files}
    doc = {
        "schemaVersion": 2,
        "mediaType": artifact.MANIFEST_TYPE,
        "artifactType": artifact.ARTIFACT_TYPE,
        "config": {"mediaType": artifact.STATEMENT_TYPE, "digest": _sha(statement),
                   "size": len(statement)},
        "layers": [{"mediaType": kind, "digest": _sha(data[name]), "size": len(data[name]),
                    "annotations": {artifact.TITLE: name}} for name, kind in files],
    }  # fmt: skip
    blobs = {_sha(statement): statement, **{_sha(d): d for d in data.values()}}
    return doc, blobs


def test_inspect_refuses_a_changed_statement(image: Path) -> None:
    doc, blobs = _manifest_of(image)
    statement = doc["config"]["digest"]
    blobs[statement] = blobs[statement].replace(b'"sh"', b'"SH"')
    with hostile_registry(doc, blobs) as (host, _):
        code, out, err = invoke("inspect", "--no-tls-verify", f"docker://{host}/x/y:v1")
    assert (code, out) == (ExitCode.TAMPERED, "")
    assert err == (f"error: blob {statement} from {host} does not match its digest: the registry"
                   " or the network changed it\n")  # fmt: skip


def test_inspect_never_inflates_a_compressed_blob(image: Path) -> None:
    """A statement sent gzip-encoded (64 MiB of zeros in 64 KiB) is taken as the bytes sent,
    not inflated: it does not match its digest."""
    import gzip

    doc, blobs = _manifest_of(image)
    statement = doc["config"]["digest"]
    blobs[statement] = gzip.compress(bytes(64 << 20))
    with hostile_registry(doc, blobs, encoding="gzip") as (host, _):
        code, _, err = invoke("inspect", "--no-tls-verify", f"docker://{host}/x/y:v1")
    assert code == ExitCode.TAMPERED
    assert err.startswith(f"error: blob {statement} from {host} does not match its digest")


def test_inspect_does_not_fetch_a_huge_statement(image: Path) -> None:
    doc, blobs = _manifest_of(image)
    doc["config"]["size"] = 1 << 40
    with hostile_registry(doc, blobs) as (host, asked):
        code, _, err = invoke("inspect", "--no-tls-verify", f"docker://{host}/x/y:v1")
    assert code == ExitCode.TAMPERED  # as pull refuses it (exit 2 before)
    assert f"with {1 << 40} bytes, more than {4 << 20}" in err
    assert asked == []  # refused before asking


def test_inspect_refuses_an_oversized_keys_json_as_pull_does(image: Path, tmp_path: Path) -> None:
    """keys.json listed at 1 TiB: inspect and pull both exit 8 (the manifest was changed), before
    asking for it. Failed before: inspect exited 2 ("not a cryptlayer image as this version
    knows one") where pull exits 8."""
    doc, blobs = _manifest_of(image)
    keys = next(d for d in doc["layers"] if d["annotations"][artifact.TITLE] == "keys.json")
    keys["size"] = 1 << 40
    with hostile_registry(doc, blobs) as (host, asked):
        inspected = invoke("inspect", "--no-tls-verify", f"docker://{host}/x/y:v1")
        pulled = invoke("pull", "--no-tls-verify", f"docker://{host}/x/y:v1", str(tmp_path / "x"))
    assert inspected[0] == pulled[0] == ExitCode.TAMPERED, (inspected, pulled)
    assert inspected[2] == (f"error: docker://{host}/x/y:v1 lists blob {keys['digest']} with"
                            f" {1 << 40} bytes, more than {4 << 20}: the manifest was changed;"
                            " pull from the publisher\n")  # fmt: skip
    assert keys["digest"] not in asked


def test_not_a_cryptlayer_image_says_so_once(image: Path) -> None:
    """It read "is not a cryptlayer image (it is not a cryptlayer image (...))"."""
    doc, blobs = _manifest_of(image)
    doc["artifactType"] = "application/vnd.other"
    doc["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
    with hostile_registry(doc, blobs) as (host, _):
        code, _, err = invoke("inspect", "--no-tls-verify", f"docker://{host}/x/y:v1")
    assert code == ExitCode.USAGE
    assert err == (f"error: docker://{host}/x/y:v1 is not a cryptlayer image (neither its"
                   " artifactType nor its config's media type is cryptlayer's): push one with"
                   " `cryptlayer push`\n")  # fmt: skip


def test_inspect_does_not_fetch_more_signatures_than_an_image_may_hold(image: Path) -> None:
    """A manifest listing 2000 signatures of 16 KiB (31 MiB fetched into a temporary directory,
    2000 requests) is refused before any is fetched, as `pull` refuses it. Failed before: every
    one was fetched, then the signatures were found to be too many."""
    doc, blobs = _manifest_of(image)
    sig = b"x" * 16384
    blobs[_sha(sig)] = sig
    doc["layers"] += [{"mediaType": artifact.SIGNATURE_TYPE, "digest": _sha(sig), "size": len(sig),
                       "annotations": {artifact.TITLE: f"signatures/s{i}.sig"}}
                      for i in range(2000)]  # fmt: skip
    with hostile_registry(doc, blobs) as (host, asked):
        code, out, err = invoke("inspect", "--no-tls-verify", f"docker://{host}/x/y:v1")
    assert (code, out) == (ExitCode.TAMPERED, "")
    assert err.startswith(f"error: docker://{host}/x/y:v1 lists 2000 signatures, more than 64")
    assert err.count("\n") == 1, err
    assert asked == []


def test_pull_does_not_fetch_a_huge_statement(image: Path, tmp_path: Path) -> None:
    """`pull` (with --trust or not) of a manifest whose config claims 64 MiB (and a registry that sends them):
    refused before the statement is asked for, as inspect refuses it, since no statement is
    larger than 4 MiB (a local one is read with that cap). Failed before: the 64 MiB (up to the
    terabyte a manifest may claim) were written to the work directory before the digest or the
    trust check refused them."""
    doc, blobs = _manifest_of(image)
    doc["config"]["size"] = 64 << 20
    blobs[doc["config"]["digest"]] = bytes(64 << 20)
    with hostile_registry(doc, blobs) as (host, asked):
        code, _, err = invoke("pull", "--no-tls-verify", f"docker://{host}/x/y:v1",
                              str(tmp_path / "x"))  # fmt: skip
    assert code == ExitCode.TAMPERED, err
    assert err == (f"error: docker://{host}/x/y:v1 lists its statement (manifest.json) with"
                   f" {64 << 20} bytes, more than {4 << 20}: the manifest was changed; pull from"
                   " the publisher\n")  # fmt: skip
    assert asked == []


def test_a_reader_that_went_away_is_no_error(tmp_path: Path, state_root: Path) -> None:
    """`cryptlayer inspect IMG | head -1`: the reader closing the pipe early is what the user
    asked for, not "error: Broken pipe" (exit 141, as a shell reports a process SIGPIPE ended)."""
    image = fake_image(tmp_path / "big", cmd=("x" * 200_000,))  # more than a pipe holds
    cli = str(Path(sys.executable).with_name("cryptlayer"))
    env = {**os.environ, "CRYPTLAYER_ROOT": str(state_root)}
    with subprocess.Popen([cli, "inspect", str(image)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env) as child:  # fmt: skip
        assert child.stdout is not None and child.stderr is not None
        child.stdout.read(10)
        child.stdout.close()
        err = child.stderr.read()
    assert (child.returncode, err) == (141, b"")


def test_inspect_shows_image_strings_escaped(tmp_path: Path) -> None:
    """Terminal escapes in the manifest cannot forge inspect's lines (its `state:`)."""
    forged = "x\x1b[1A\x1b[2K\rstate:   intact\n"
    doc = set_path(GOOD, ("config", "cmd"), [forged])
    doc = set_path(doc, ("layers", 0, "source"), forged)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    (tmp_path / "layer0.luks").write_bytes(bytes(4096))
    code, out, _ = invoke("inspect", str(tmp_path))
    assert code == 0
    assert "\x1b" not in out and "\r" not in out
    assert [line for line in out.splitlines() if line.startswith("state:")] == ["state:   damaged"]
    assert "x\\x1b[1A\\x1b[2K\\rstate:   intact\\n" in out


@pytest.mark.parametrize("case", ["manifest.json not JSON", "manifest.json malformed"])
def test_inspect_exits_8_on_a_damaged_statement(tmp_path: Path, case: str) -> None:
    image = fake_image(tmp_path / "img")
    name, damage = DAMAGE[case]
    damage(image / name)  # type: ignore[operator]
    code, _, err = invoke("inspect", str(image))
    assert code == ExitCode.TAMPERED
    assert one_line(err).startswith(f"error: {image}/manifest.json is ")


@pytest.mark.parametrize(
    ("case", "state"),
    [("layer truncated", "damaged"), ("layer grown", "damaged"), ("layer missing", "missing"),
     ("hash tree truncated", "damaged"), ("hash tree missing", "missing")],
)  # fmt: skip
def test_inspect_never_calls_a_damaged_layer_intact(tmp_path: Path, case: str, state: str) -> None:
    image = fake_image(tmp_path / "img")
    info = json.loads(invoke("inspect", "--json", str(image))[1])
    assert (info["state"], info["layers"][0]["state"]) == ("intact", "intact")
    name, damage = DAMAGE[case]
    damage(image / name)  # type: ignore[operator]
    code, out, _ = invoke("inspect", "--json", str(image))
    assert code == 0  # inspect reports; verify is the check that fails
    info = json.loads(out)
    assert (info["state"], info["layers"][0]["state"]) == ("damaged", state)
    code, out, _ = invoke("inspect", str(image))
    assert "state:   damaged" in out.splitlines()
    assert f"({state}), from" in out
