"""build/ocicrypt.py: layers that Debian's skopeo (ocicrypt 1.0.3) encrypted with
`--encryption-key jwe:PUB.pem`, decrypted as they stream; wrong keys and tampered blobs refused."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cryptlayer import oci as oci_spec
from cryptlayer.build import oci, ocicrypt
from cryptlayer.build.sources import OciLayerSource
from cryptlayer.errors import ExitCode, TamperedImageError, UsageError, WrongKeyError
from cryptlayer.keys import providers
from cryptlayer.keys.providers import ProviderError
from tests.clirunner import invoke
from tests.ocifixtures import CONFIG, MIDDLE, TOP, image_files, write_dir

ENCRYPTED_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key pairs, a plain image (one gzip layer, one uncompressed), and skopeo's encryptions
    of it: `rsa` for the RSA key, `both` for the RSA and the EC key, an oci-archive too."""
    root = tmp_path_factory.mktemp("ocicrypt")
    _openssl("genrsa", "-out", str(root / "rsa.pem"), "2048")
    _openssl("rsa", "-in", str(root / "rsa.pem"), "-pubout", "-out", str(root / "rsa.pub"))
    _openssl("genrsa", "-out", str(root / "other.pem"), "2048")
    _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(root / "ec0.pem"))
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", str(root / "ec0.pem"),
             "-out", str(root / "ec.pem"))  # fmt: skip
    _openssl("ec", "-in", str(root / "ec.pem"), "-pubout", "-out", str(root / "ec.pub"))
    for pem in root.glob("*.pem"):
        pem.chmod(0o600)
    write_dir(root / "plain", image_files([(MIDDLE, "gzip"), (TOP, "none")], CONFIG))
    write_dir(root / "zplain", image_files([(MIDDLE, "zstd"), (TOP, "zstd")], CONFIG))

    def skopeo(dest: str, *pubs: str, src: str = "plain") -> None:
        keys = [arg for pub in pubs for arg in ("--encryption-key", f"jwe:{root / pub}")]
        subprocess.run(
            ["skopeo", "copy", "-q", *keys, f"oci:{root / src}:latest", dest],
            check=True, capture_output=True,
        )  # fmt: skip

    skopeo(f"oci:{root / 'rsa'}:latest", "rsa.pub")
    skopeo(f"oci:{root / 'both'}:latest", "rsa.pub", "ec.pub")
    skopeo(f"oci-archive:{root / 'rsa.tar'}:latest", "rsa.pub")
    skopeo(f"oci:{root / 'zstd'}:latest", "rsa.pub", src="zplain")
    return root


def _open(reference: str, keys: tuple[ocicrypt.DecryptionKey, ...] = ()) -> None:
    with oci.open_image(reference, keys):
        pass


def _keys(made: Path, *names: str) -> tuple[ocicrypt.DecryptionKey, ...]:
    return ocicrypt.load_keys([str(made / name) for name in names])


def _members(layer: oci.OciLayer) -> list[tuple[str, bytes]]:
    """The layer's tar as (name, data) pairs, read through the build's own stream."""
    out = []
    with OciLayerSource(layer)._stream() as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                f = tar.extractfile(member) if member.isfile() else None
                out.append((member.name, f.read() if f else b""))
        assert stream.drain() == layer.diff_id
    return out


def _plain_members(tar: bytes) -> list[tuple[str, bytes]]:
    import io

    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return [(m.name, t.extractfile(m).read() if m.isfile() else b"") for m in t]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("reference", "keys"),
    [
        ("oci:{}/rsa:latest", ("rsa.pem",)),
        ("oci:{}/both", ("ec.pem",)),  # the second recipient of a multi-recipient JWE
        ("oci:{}/both", ("other.pem", "rsa.pem")),  # each key tried, as ocicrypt does
        ("oci-archive:{}/rsa.tar", ("rsa.pem",)),
        ("oci:{}/zstd", ("rsa.pem",)),  # through `zstd -dc`
    ],
)
def test_skopeo_image_decrypts_to_the_plain_layers(
    made: Path, reference: str, keys: tuple[str, ...]
) -> None:
    with oci.open_image(reference.format(made), _keys(made, *keys)) as image:
        assert [layer.cipher is not None for layer in image.layers] == [True, True]
        for layer in image.layers:
            OciLayerSource(layer).measure()  # digest and HMAC of the ciphertext, then the tar
        assert _members(image.layers[0]) == _plain_members(MIDDLE)
        assert _members(image.layers[1]) == _plain_members(TOP)
        # The config is the original's (entrypoint, env...): ocicrypt leaves it alone.
        assert image.config.entrypoint == tuple(CONFIG["Entrypoint"])
        assert image.config.env == tuple(CONFIG["Env"])
        assert image.config.workdir == CONFIG["WorkingDir"]


def test_layers_really_are_encrypted(made: Path) -> None:
    manifest = _manifest(made / "rsa")
    assert [d["mediaType"] for d in manifest["layers"]] == [ENCRYPTED_GZIP, ENCRYPTED_GZIP]
    for desc in manifest["layers"]:
        blob = (made / "rsa" / oci_spec.blob_path(desc["digest"])).read_bytes()
        assert not blob.startswith(b"\x1f\x8b") and b"etc/keep" not in blob


def _manifest(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    doc: dict[str, Any] = json.loads((layout / "blobs/sha256" / digest[7:]).read_bytes())
    return doc


def _rewrite(layout: Path, manifest: dict[str, Any]) -> None:
    """Store `manifest` as the image's (index.json pointing at it), as an attacker can."""
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


@pytest.fixture
def copy(made: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made / "rsa", tmp_path / "copy"))


def _flip_layer(layout: Path, index: int, fix_digest: bool) -> None:
    """Change one byte of a layer's ciphertext; with fix_digest, make the manifest name the
    changed blob (so only the HMAC can tell)."""
    manifest = _manifest(layout)
    desc = manifest["layers"][index]
    path = layout / "blobs/sha256" / desc["digest"][7:]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    if fix_digest:
        new = hashlib.sha256(blob).hexdigest()
        path.rename(layout / "blobs/sha256" / new)
        desc["digest"] = f"sha256:{new}"
        _rewrite(layout, manifest)


def test_tampered_ciphertext_fails_its_hmac(made: Path, copy: Path) -> None:
    _flip_layer(copy, 1, fix_digest=True)
    with oci.open_image(f"oci:{copy}", _keys(made, "rsa.pem")) as image:
        source = OciLayerSource(image.layers[1])
        with pytest.raises(TamperedImageError, match="its HMAC does not match"):
            source.measure()
        # The decrypting stream on its own refuses it too, at its end, whoever reads it.
        with pytest.raises(TamperedImageError, match="HMAC"):
            _members(image.layers[1])


def test_tampered_zstd_layer_fails_and_does_not_hang(made: Path, tmp_path: Path) -> None:
    # A zstd layer is fed to `zstd -dc` from a thread: a stream that raised there left zstd
    # waiting for more input, and the build hung (before the stream kept its verdict for its
    # owner).
    copy = Path(shutil.copytree(made / "zstd", tmp_path / "zcopy"))
    assert _manifest(copy)["layers"][0]["mediaType"].endswith("+zstd+encrypted")
    _flip_layer(copy, 0, fix_digest=True)
    with oci.open_image(f"oci:{copy}", _keys(made, "rsa.pem")) as image:
        with pytest.raises(TamperedImageError, match="HMAC"):
            _members(image.layers[0])
        with pytest.raises(TamperedImageError, match="HMAC"):
            OciLayerSource(image.layers[0]).measure()


def test_measuring_an_encrypted_layer_decrypts_it_once(
    made: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # measure() checked the blob in a pass of its own, then decrypted it again to scan the tar:
    # with populate, a build decrypted each layer three times (figure 13 of docs/benchmarks).
    # The scanning stream checks digest, size and HMAC at its end just as well.
    opened: list[str] = []
    real_open = oci.DirBlobs.open

    def counting_open(self: oci.DirBlobs, name: str) -> Any:
        opened.append(name)
        return real_open(self, name)

    with oci.open_image(f"oci:{made / 'rsa'}", _keys(made, "rsa.pem")) as image:
        monkeypatch.setattr(oci.DirBlobs, "open", counting_open)
        measure = OciLayerSource(image.layers[0]).measure()
    assert opened == [image.layers[0].path]
    assert measure.content_bytes == sum(len(data) for _, data in _plain_members(MIDDLE))


def test_tampered_ciphertext_fails_its_digest(made: Path, copy: Path) -> None:
    _flip_layer(copy, 0, fix_digest=False)
    with (
        oci.open_image(f"oci:{copy}", _keys(made, "rsa.pem")) as image,
        pytest.raises(TamperedImageError, match="does not match its digest"),
    ):
        OciLayerSource(image.layers[0]).measure()
        assert TamperedImageError.exit_code == ExitCode.TAMPERED


def test_truncated_ciphertext_fails(made: Path, copy: Path) -> None:
    manifest = _manifest(copy)
    desc = manifest["layers"][0]
    path = copy / "blobs/sha256" / desc["digest"][7:]
    blob = path.read_bytes()[:-7]
    new = hashlib.sha256(blob).hexdigest()
    (copy / "blobs/sha256" / new).write_bytes(blob)
    desc.update(digest=f"sha256:{new}", size=len(blob))
    _rewrite(copy, manifest)
    with (
        oci.open_image(f"oci:{copy}", _keys(made, "rsa.pem")) as image,
        pytest.raises(TamperedImageError, match="HMAC"),
    ):
        OciLayerSource(image.layers[0]).measure()


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_populate_refuses_a_stream_whose_hmac_fails(made: Path, copy: Path, tmp_path: Path) -> None:
    # What a blob swapped between measuring and filling meets: the fill itself fails.
    _flip_layer(copy, 0, fix_digest=True)
    target = tmp_path / "target"
    target.mkdir()
    with (
        oci.open_image(f"oci:{copy}", _keys(made, "rsa.pem")) as image,
        pytest.raises(TamperedImageError, match="HMAC"),
    ):
        OciLayerSource(image.layers[0]).populate(target)


def test_wrong_key_and_no_key(made: Path) -> None:
    with pytest.raises(WrongKeyError, match="no --decryption-key unwraps its layer key"):
        _open(f"oci:{made}/rsa", _keys(made, "other.pem", "ec.pem"))
    with pytest.raises(UsageError, match="is encrypted with ocicrypt") as err:
        _open(f"oci:{made}/rsa")
    assert "--decryption-key PRIVATE.pem" in str(err.value)


def _edit_annotation(layout: Path, key: str, edit: Any) -> None:
    manifest = _manifest(layout)
    for desc in manifest["layers"]:
        desc["annotations"][key] = edit(desc["annotations"][key])
    _rewrite(layout, manifest)


def test_unknown_cipher(made: Path, copy: Path) -> None:
    def other_cipher(value: str) -> str:
        doc = json.loads(base64.b64decode(value))
        doc["cipher"] = "AES_256_GCM"
        return base64.b64encode(json.dumps(doc).encode()).decode()

    _edit_annotation(copy, ocicrypt.PUBOPTS, other_cipher)
    with pytest.raises(UsageError, match="unsupported ocicrypt cipher 'AES_256_GCM'"):
        _open(f"oci:{copy}", _keys(made, "rsa.pem"))


def test_malformed_annotations(made: Path, copy: Path) -> None:
    _edit_annotation(copy, ocicrypt.KEYS_JWE, lambda _v: "not base64!")
    with pytest.raises(UsageError, match="is not valid base64"):
        _open(f"oci:{copy}", _keys(made, "rsa.pem"))
    _edit_annotation(copy, ocicrypt.KEYS_JWE, lambda _v: base64.b64encode(b"{}").decode())
    with pytest.raises(UsageError, match="holds no JWE"):
        _open(f"oci:{copy}", _keys(made, "rsa.pem"))


def test_pgp_only_layer_names_its_scheme(made: Path, copy: Path) -> None:
    manifest = _manifest(copy)
    for desc in manifest["layers"]:
        desc["annotations"]["org.opencontainers.image.enc.keys.pgp"] = "eA=="
        del desc["annotations"][ocicrypt.KEYS_JWE]
    _rewrite(copy, manifest)
    with pytest.raises(UsageError, match="for pgp keys only"):
        _open(f"oci:{copy}", _keys(made, "rsa.pem"))


def test_key_files(made: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no key providers: \$OCICRYPT_KEYPROVIDER_CONFIG"):
        ocicrypt.load_keys(["provider:attestation-agent"])
    with pytest.raises(UsageError, match="does not exist"):
        ocicrypt.load_keys([str(tmp_path / "none.pem")])
    with pytest.raises(UsageError, match="a password after ':' is not taken"):
        ocicrypt.load_keys([f"{made / 'rsa.pem'}:secret"])
    with pytest.raises(UsageError, match=r"is a public key|not a PEM or DER private key"):
        shutil.copy(made / "rsa.pub", tmp_path / "pub.pem")
        (tmp_path / "pub.pem").chmod(0o600)
        ocicrypt.load_keys([str(tmp_path / "pub.pem")])
    open_key = tmp_path / "open.pem"
    shutil.copy(made / "rsa.pem", open_key)
    open_key.chmod(0o644)
    with pytest.raises(UsageError, match="accessible by others"):
        ocicrypt.load_keys([str(open_key)])
    locked = tmp_path / "locked.pem"
    subprocess.run(
        ["openssl", "pkey", "-in", str(made / "rsa.pem"), "-aes256", "-passout", "pass:pw",
         "-out", str(locked)], check=True, capture_output=True,
    )  # fmt: skip
    locked.chmod(0o600)
    with pytest.raises(UsageError, match="protected by a password"):
        ocicrypt.load_keys([str(locked)])
    # A JWK, as ocicrypt also takes one, opens the same image.
    jwk_file = tmp_path / "key.jwk"
    jwk_file.write_text(_keys(made, "rsa.pem")[0].jwk.export_private())
    jwk_file.chmod(0o600)
    with oci.open_image(f"oci:{made}/rsa", ocicrypt.load_keys([str(jwk_file)])) as image:
        assert _members(image.layers[0]) == _plain_members(MIDDLE)


def test_cli_build_errors(made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build's own error lines and exit codes, before anything is formatted."""
    key = tmp_path / "image.key"
    invoke("keygen", str(key))

    def build(*args: str) -> tuple[int, str]:
        code, _, err = invoke("build", "--key-file", str(key), "-o", str(tmp_path / "img"), *args)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not (tmp_path / "img").exists()
        assert not list(tmp_path.glob(".img.partial-*"))
        return code, lines[0]

    code, line = build("--decryption-key", str(made / "other.pem"), f"oci:{made}/rsa")
    assert code == ExitCode.KEY and "no --decryption-key unwraps its layer key" in line
    code, line = build(f"oci:{made}/rsa")
    assert code == ExitCode.USAGE and "give its private key with --decryption-key" in line
    monkeypatch.delenv(providers.ENV, raising=False)
    code, line = build("--decryption-key", "provider:kbs", f"oci:{made}/rsa")
    assert code == ExitCode.USAGE and "no key providers: $OCICRYPT_KEYPROVIDER_CONFIG" in line


def test_decrypting_reader_rewinds(made: Path) -> None:
    """decompressed() sniffs the first bytes and rewinds: the stream starts over, clean."""
    with oci.open_image(f"oci:{made}/rsa", _keys(made, "rsa.pem")) as image:
        layer = image.layers[0]
        with layer.open() as stream:
            head = stream.read(6)
            assert head.startswith(b"\x1f\x8b")
            stream.seek(0)
            whole = stream.read()
        assert whole.startswith(head)


# ---- layers wrapped by an ocicrypt key provider ---------------------------------------------

PROVIDER = Path(__file__).resolve().parents[1] / "providers" / "provider.py"
KMS = providers.ANNOTATION + "kms"


def _cmd(name: str, kek: Path, mode: str = "normal") -> dict[str, Any]:
    args = [str(PROVIDER), "cmd", "--name", name, "--kek", str(kek), "--mode", mode]
    return {"cmd": {"path": sys.executable, "args": args}}


def _configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: dict[str, Any]) -> None:
    path = tmp_path / "ocicrypt_keyprovider.conf"
    path.write_text(json.dumps({"key-providers": entries}))
    path.chmod(0o600)
    monkeypatch.setenv(providers.ENV, str(path))


def _provider_wrap(kek: Path, optsdata: bytes) -> str:
    """What an ocicrypt with key providers stores for one provider (encryption.go, preWrapKeys):
    WrapKeys' request as it marshals it, sent to the test provider, and the answer's annotation
    bytes base64'd."""
    b64 = base64.b64encode
    request = {
        "op": "keywrap",
        "keywrapparams": {
            "ec": {"Parameters": {"kms": [b64(b"Enabled").decode()]},
                   "DecryptConfig": {"Parameters": None}},
            "optsdata": b64(optsdata).decode(),
        },
        "keyunwrapparams": {"dc": None, "annotation": None},
    }  # fmt: skip
    answer = subprocess.run(
        [sys.executable, str(PROVIDER), "cmd", "--name", "kms", "--kek", str(kek)],
        input=json.dumps(request).encode(), capture_output=True, check=True,
    ).stdout  # fmt: skip
    annotation = base64.b64decode(json.loads(answer)["keywrapresults"]["annotation"])
    return b64(annotation).decode()


def _provider_image(
    made: Path, dest: Path, kek: Path, keep_jwe: bool = False, edit: Any = None
) -> Path:
    """skopeo's JWE image re-wrapped for the key provider `kms`, as an ocicrypt with providers
    writes one: each layer's private options unwrapped from its JWE with the private key, wrapped
    again through the provider under org.opencontainers.image.enc.keys.provider.kms, the JWE
    annotation dropped (unless keep_jwe); the ciphertext unchanged. `edit` changes the options
    before they are wrapped."""
    from jwcrypto import jwe, jwk  # type: ignore[import-untyped]

    layout = Path(shutil.copytree(made / "rsa", dest))
    manifest = _manifest(layout)
    key = jwk.JWK.from_pem((made / "rsa.pem").read_bytes())
    for desc in manifest["layers"]:
        annotations = desc["annotations"]
        message = jwe.JWE()
        message.deserialize(base64.b64decode(annotations[ocicrypt.KEYS_JWE]).decode())
        message.decrypt(key)
        optsdata = message.payload
        if edit is not None:
            optsdata = json.dumps(edit(json.loads(optsdata))).encode()
        annotations[KMS] = _provider_wrap(kek, optsdata)
        if not keep_jwe:
            del annotations[ocicrypt.KEYS_JWE]
    _rewrite(layout, manifest)
    return layout


@pytest.fixture(scope="module")
def kms_kek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kms") / "kek"
    path.write_bytes(os.urandom(32))
    return path


@pytest.fixture(scope="module")
def kms_image(made: Path, kms_kek: Path) -> Path:
    return _provider_image(made, made / "kms", kms_kek)


def test_provider_image_is_what_ocicrypt_would_write(made: Path, kms_image: Path) -> None:
    """The same ciphertext as skopeo's, its layer keys now for the provider only."""
    ours, skopeos = _manifest(kms_image), _manifest(made / "rsa")
    assert [d["digest"] for d in ours["layers"]] == [d["digest"] for d in skopeos["layers"]]
    for desc in ours["layers"]:
        assert desc["mediaType"] == ENCRYPTED_GZIP
        assert sorted(desc["annotations"]) == [KMS, ocicrypt.PUBOPTS]
        wrapped = json.loads(base64.b64decode(desc["annotations"][KMS]))
        assert wrapped["kid"] == "test/kms" and "symkey" not in json.dumps(wrapped)


@pytest.mark.parametrize(
    "given",
    [
        ("provider:kms",),
        ("provider:kms:Enabled",),  # PARAMS as ocicrypt passes them
        ("other.pem", "provider:kms"),  # mixed with key files, each tried in turn
    ],
)
def test_provider_image_decrypts_to_the_plain_layers(
    made: Path,
    kms_image: Path,
    kms_kek: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: tuple[str, ...],
) -> None:
    _configure(tmp_path, monkeypatch, {"kms": _cmd("kms", kms_kek)})
    keys = ocicrypt.load_keys([g if g.startswith("provider:") else str(made / g) for g in given])
    with oci.open_image(f"oci:{kms_image}", keys) as image:
        assert [layer.cipher is not None for layer in image.layers] == [True, True]
        for layer in image.layers:
            OciLayerSource(layer).measure()  # digest and HMAC of the ciphertext, then the tar
        assert _members(image.layers[0]) == _plain_members(MIDDLE)
        assert _members(image.layers[1]) == _plain_members(TOP)
        assert image.config.entrypoint == tuple(CONFIG["Entrypoint"])


def test_a_failing_provider_is_passed_over_for_a_key_that_opens_the_layer(
    made: Path, kms_kek: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both annotations, as ocicrypt writes for a jwe and a provider recipient: the refusing
    # provider is tried first, as given, then the private key opens the layer.
    both = _provider_image(made, tmp_path / "both", kms_kek, keep_jwe=True)
    _configure(tmp_path, monkeypatch, {"kms": _cmd("kms", kms_kek, mode="fail")})
    keys = ocicrypt.load_keys(["provider:kms", str(made / "rsa.pem")])
    with oci.open_image(f"oci:{both}", keys) as image:
        assert _members(image.layers[0]) == _plain_members(MIDDLE)
    with pytest.raises(ProviderError, match="the KBS refused"):
        _open(f"oci:{both}", ocicrypt.load_keys(["provider:kms", str(made / "other.pem")]))


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "failed (exit status 1): test provider: the KBS refused to release the key"),
        ("garbage", "answered something that is not JSON"),
        ("empty", "answered no keyunwrapresults.optsdata"),
        ("wrongkey", "to something that is not ocicrypt's layer options (JSON)"),
    ],
)
def test_a_provider_that_fails_is_its_own_error(
    kms_image: Path,
    kms_kek: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    message: str,
) -> None:
    _configure(tmp_path, monkeypatch, {"kms": _cmd("kms", kms_kek, mode=mode)})
    with pytest.raises(ProviderError) as caught:
        _open(f"oci:{kms_image}", ocicrypt.load_keys(["provider:kms"]))
    assert message in caught.value.message and "kms" in caught.value.message
    assert "\n" not in str(caught.value) and caught.value.exit_code == ExitCode.FAILURE


def test_a_provider_without_the_layers_annotation_is_a_wrong_key(
    made: Path, kms_image: Path, kms_kek: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _configure(tmp_path, monkeypatch, {"kms": _cmd("kms", kms_kek), "kbs": _cmd("kbs", kms_kek)})
    with pytest.raises(WrongKeyError, match="no --decryption-key unwraps its layer key") as err:
        _open(f"oci:{kms_image}", ocicrypt.load_keys(["provider:kbs", str(made / "rsa.pem")]))
    assert err.value.hint == (
        f"tried provider:kbs, {made / 'rsa.pem'}; it is wrapped for provider:kms: give the"
        " private key or provider it was encrypted for"
    )
    # And a JWE layer named only a provider: the same, naming jwe.
    with pytest.raises(WrongKeyError, match="it is wrapped for jwe"):
        _open(f"oci:{made}/rsa", ocicrypt.load_keys(["provider:kms"]))
    # A provider that is not configured: refused before any image is read.
    with pytest.raises(UsageError, match="unknown key provider nope"):
        ocicrypt.load_keys(["provider:nope"])


def test_provider_options_get_the_same_checks(
    made: Path, kms_kek: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def short_key(opts: dict[str, Any]) -> dict[str, Any]:
        return {**opts, "symkey": base64.b64encode(os.urandom(16)).decode()}

    def bad_nonce(opts: dict[str, Any]) -> dict[str, Any]:
        return {**opts, "cipheroptions": {"nonce": "***"}}

    _configure(tmp_path, monkeypatch, {"kms": _cmd("kms", kms_kek)})
    keys = ocicrypt.load_keys(["provider:kms"])
    short = _provider_image(made, tmp_path / "short", kms_kek, edit=short_key)
    with pytest.raises(UsageError, match=r"options of the wrong size \(key 16, nonce 16"):
        _open(f"oci:{short}", keys)
    nonce = _provider_image(made, tmp_path / "nonce", kms_kek, edit=bad_nonce)
    with pytest.raises(UsageError, match="nonce is not valid base64"):
        _open(f"oci:{nonce}", keys)


def test_a_tampered_provider_layer_fails_its_hmac(
    kms_image: Path, kms_kek: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = Path(shutil.copytree(kms_image, tmp_path / "kcopy"))
    _flip_layer(copy, 1, fix_digest=True)
    _configure(tmp_path, monkeypatch, {"kms": _cmd("kms", kms_kek)})
    with (
        oci.open_image(f"oci:{copy}", ocicrypt.load_keys(["provider:kms"])) as image,
        pytest.raises(TamperedImageError, match="its HMAC does not match"),
    ):
        OciLayerSource(image.layers[1]).measure()


def test_cli_build_with_a_provider(
    made: Path, kms_image: Path, kms_kek: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build's error lines for a provider: one line each, nothing left."""
    key = tmp_path / "image.key"
    invoke("keygen", str(key))

    def build(*args: str) -> tuple[int, str]:
        code, _, err = invoke("build", "--key-file", str(key), "-o", str(tmp_path / "img"), *args)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not (tmp_path / "img").exists()
        assert not list(tmp_path.glob(".img.partial-*"))
        return code, lines[0]

    _configure(tmp_path, monkeypatch, {"kms": _cmd("kms", kms_kek, mode="fail"),
                                       "kbs": _cmd("kbs", kms_kek)})  # fmt: skip
    code, line = build("--decryption-key", "provider:kms", f"oci:{kms_image}")
    assert code == ExitCode.FAILURE and "key provider kms" in line and "the KBS refused" in line
    code, line = build("--decryption-key", "provider:kbs", f"oci:{kms_image}")
    assert code == ExitCode.KEY and "tried provider:kbs; it is wrapped for provider:kms" in line
    code, line = build("--decryption-key", "provider:nope", f"oci:{kms_image}")
    assert code == ExitCode.USAGE and "unknown key provider nope" in line


def test_a_compressed_jwe_cannot_inflate_past_the_private_options_size(
    made: Path, copy: Path
) -> None:
    """Anyone with the PUBLIC key can make a JWE for it: one with `zip: DEF` whose payload is the
    real private options followed by 40 MB of blanks (40 KB compressed; json.loads takes the
    blanks) must not be inflated in memory (jwcrypto's own cap is 100 MB). Failed before: the
    layer opened."""
    from jwcrypto import jwe, jwk

    private = _keys(made, "rsa.pem")[0].jwk
    public = jwk.JWK.from_pem((made / "rsa.pub").read_bytes())

    def bomb(value: str) -> str:
        message = jwe.JWE()
        message.deserialize(base64.b64decode(value.split(",")[0]).decode())
        message.decrypt(private)
        payload = message.payload + b" " * (40 << 20)
        header = {"alg": "RSA-OAEP", "enc": "A256GCM", "zip": "DEF"}
        token = jwe.JWE(payload, protected=json.dumps(header))
        token.add_recipient(public)
        return base64.b64encode(token.serialize().encode()).decode()

    _edit_annotation(copy, ocicrypt.KEYS_JWE, bomb)
    assert len(json.dumps(_manifest(copy))) < 1 << 20  # small on the wire
    with pytest.raises(UsageError, match="larger than 65536 bytes once decompressed"):
        _open(f"oci:{copy}", _keys(made, "rsa.pem"))


def test_a_jwe_with_thousands_of_recipients_is_refused_before_any_is_tried(
    made: Path, copy: Path
) -> None:
    """Each recipient of each JWE is an RSA private-key operation per --decryption-key (and
    jwcrypto tries every one): 16 MB of manifest hold some 30000. Failed before: all were
    tried (minutes with a 4096-bit key) and the error was 'no --decryption-key unwraps'."""

    def crowd(value: str) -> str:
        doc = json.loads(base64.b64decode(value.split(",")[0]))
        recipients = doc.get("recipients") or [
            {"header": doc.pop("header", {}), "encrypted_key": doc.pop("encrypted_key")}
        ]
        doc["recipients"] = recipients * 2000
        return base64.b64encode(json.dumps(doc).encode()).decode()

    _edit_annotation(copy, ocicrypt.KEYS_JWE, crowd)
    with pytest.raises(UsageError, match="JWE recipients, more than 256"):
        _open(f"oci:{copy}", _keys(made, "other.pem"))


def test_skopeos_key_password_form_is_not_repeated_in_the_error(made: Path) -> None:
    """`--decryption-key KEY:PASSWORD` is refused, but the error echoed the whole argument, so
    the password went on to stderr and whatever log keeps it. Failed before."""
    with pytest.raises(UsageError) as caught:
        ocicrypt.load_keys([f"{made / 'rsa.pem'}:hunter2"])
    message = str(caught.value)
    assert "a password after ':' is not taken" in message
    assert "hunter2" not in message
    assert f"--decryption-key {made / 'rsa.pem'}:..." in message
