"""Who may open an image, against real images: every key source, passphrases typed on a
pseudo-terminal, X25519 and RSA recipients, and rekey without re-encryption."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MARKER_LOWER, Cli
from terminal import in_pty

from cryptlayer.errors import ExitCode

PASSPHRASE = "four words of test"
ITER_TIME = ["--iter-time", "200"]  # real Argon2id, calibrated small: emulation is slow


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pairs")
    cli = Cli.new()
    for kind in ("x25519", "rsa", "stranger"):
        cli.ok("keygen", "--rsa" if kind == "rsa" else "--x25519", str(base / kind))
    return {kind: base / kind for kind in ("x25519", "rsa", "stranger")}


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, pairs: dict[str, Path], busybox_tree: Path,
    data_tree: Path,
) -> Iterator[tuple[Path, Path]]:  # fmt: skip
    """One image anyone may open: a key file, a passphrase, an X25519 and an RSA recipient."""
    base = Path(os.environ.get("CRYPTLAYER_SCRATCH", tmp_path_factory.mktemp("images")))
    out = base / "every-opener"
    key = tmp_path_factory.mktemp("key") / "k"
    cli = Cli.new()
    cli.ok("keygen", str(key))
    cli.ok("build", "--key-file", str(key), "--passphrase", *ITER_TIME,
           "--recipient", f"{pairs['x25519']}.pub", "--recipient", f"{pairs['rsa']}.pub",
           "--output", str(out), "--cmd", "cat /data/hello.txt", str(busybox_tree), str(data_tree),
           input=f"{PASSPHRASE}\n")  # fmt: skip
    yield out, key
    shutil.rmtree(out)


def test_each_key_source_opens_the_image(cli: Cli, shared: tuple[Path, Path]) -> None:
    image, key_file = shared
    key = key_file.read_bytes()
    sources = {
        "file": ["--key-file", str(key_file)],
        "stdin": ["--key-file", "-"],
        "command": ["--key-command", f"cat {key_file}"],
        "keyring": ["--keyring", "cryptlayer-test"],
        "passphrase on a pipe": ["--passphrase"],
    }
    inputs = {"stdin": key, "passphrase on a pipe": f"{PASSPHRASE}\n".encode()}
    subprocess.run(["keyctl", "padd", "user", "cryptlayer-test", "@u"], input=key, check=True,
                   capture_output=True)  # fmt: skip
    try:
        for name, args in sources.items():
            out = cli.ok("run", "--keep", *args, str(image), input=inputs.get(name))
            assert out == f"{MARKER_LOWER}\n", name
    finally:
        subprocess.run(
            ["keyctl", "purge", "user", "cryptlayer-test"], check=False, capture_output=True
        )
    code, _, err = cli("run", "--keyring", "cryptlayer-test", str(image))
    assert code == ExitCode.RUN_FAILED  # USAGE for the other commands
    assert err.startswith("error: no user key 'cryptlayer-test' in the user or session keyring")
    code, _, err = cli("run", "--passphrase", str(image), input="not it\n")
    assert code == ExitCode.RUN_FAILED  # KEY for the other commands
    assert err == (
        "error: the passphrase does not open this image:"
        f" `cryptlayer inspect {image}` lists the keys and recipients that can\n"
    )


def test_passphrase_typed_on_a_terminal(shared: tuple[Path, Path]) -> None:
    """The process boundary is the point: a real terminal, echo off, as cryptsetup asks."""
    image = shared[0]
    code, out = in_pty([sys.executable, "-m", "cryptlayer", "run", "--keep", "--passphrase",
                        str(image)], [PASSPHRASE])  # fmt: skip
    assert code == 0, out
    assert f"Passphrase for {image}:" in out
    assert MARKER_LOWER in out
    assert PASSPHRASE not in out  # not echoed


def test_each_recipient_opens_and_a_stranger_does_not(
    cli: Cli, shared: tuple[Path, Path], pairs: dict[str, Path]
) -> None:
    image = shared[0]
    for kind in ("x25519", "rsa"):
        out = cli.ok("run", "--keep", "--identity", str(pairs[kind]), str(image))
        assert out == f"{MARKER_LOWER}\n", kind
    code, _, err = cli("run", "--identity", str(pairs["stranger"]), str(image))
    assert code == ExitCode.RUN_FAILED  # KEY for the other commands
    assert err.startswith(f"error: identity {pairs['stranger']} (x25519:SHA256:")
    assert err.endswith(
        f" is not a recipient of this image: `cryptlayer inspect {image}` lists who can open it\n"
    )
    shown = cli.ok("inspect", str(image))
    assert shown.count("opens:   ") == 4
    assert "opens:   passphrase:" in shown and "(argon2id, " in shown


def digests(image: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(image.glob("*.luks"))
    }


def test_rekey_changes_who_opens_without_touching_the_layers(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path, pairs: dict[str, Path]
) -> None:
    new_key = tmp_path / "new.key"
    cli.ok("keygen", str(new_key))
    before = digests(image)
    out = cli.ok("rekey", str(image), "--key-file", str(key_file), "--add-key", str(new_key),
                 "--add-recipient", f"{pairs['x25519']}.pub", "--remove", str(key_file))  # fmt: skip
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["added key", "added x25519", "removed key"]
    assert digests(image) == before  # layer data and LUKS headers are untouched

    assert cli.ok("run", "--keep", "--key-file", str(new_key), str(image)) == f"{MARKER_LOWER}\n"
    code, _, err = cli("run", "--key-file", str(key_file), str(image))
    assert code == ExitCode.RUN_FAILED, (
        "the removed key still opens the image"
    )  # KEY for the other commands
    assert err.startswith("error: the key does not open this image")

    # Revoke the recipient by its id, as inspect prints it.
    ident = next(line.split()[1] for line in lines if line.startswith("added x25519"))
    assert f"opens:   {ident}" in cli.ok("inspect", str(image))
    cli.ok("rekey", str(image), "--key-file", str(new_key), "--remove", ident)
    code, _, err = cli("run", "--identity", str(pairs["x25519"]), str(image))
    assert code == ExitCode.RUN_FAILED  # KEY for the other commands
    assert "is not a recipient of this image" in err
    assert digests(image) == before

    code, _, err = cli("rekey", str(image), "--key-file", str(new_key), "--remove", str(new_key))
    assert code == ExitCode.USAGE
    assert err == (
        "error: this would leave nobody able to open the image:"
        " add a key, passphrase or recipient in the same rekey\n"
    )
    code, _, err = cli("rekey", str(image), "--key-file", str(key_file), "--add-key", str(key_file))
    assert code == ExitCode.KEY  # a removed key cannot let itself back in


def test_an_ocicrypt_key_provider_builds_and_runs_the_image(
    cli: Cli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    busybox_tree: Path,
    data_tree: Path,
) -> None:
    """build --recipient provider:NAME, then run --identity provider:NAME, through the test
    providers written from ocicrypt's definition (tests/providers/provider.py): one `cmd`, one
    `grpc`; a provider that fails is named in one error."""
    provider = Path(__file__).resolve().parents[1] / "providers" / "provider.py"
    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    server = subprocess.Popen(
        [sys.executable, str(provider), "grpc", "--name", "grpcp", "--kek", str(kek)],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())

        def configure(mode: str) -> None:
            args = [str(provider), "cmd", "--name", "cmdp", "--kek", str(kek), "--mode", mode]
            config = tmp_path / f"keyprovider-{mode}.conf"
            config.write_text(json.dumps({"key-providers": {
                "cmdp": {"cmd": {"path": sys.executable, "args": args}},
                "grpcp": {"grpc": f"127.0.0.1:{port}"},
            }}))  # fmt: skip
            config.chmod(0o600)
            monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(config))

        configure("normal")
        base = Path(os.environ.get("CRYPTLAYER_SCRATCH", tmp_path))
        image = base / "by-provider"
        cli.ok("build", "--recipient", "provider:cmdp:tenant=a", "--recipient", "provider:grpcp",
               "--output", str(image), "--cmd", "cat /data/hello.txt", str(busybox_tree),
               str(data_tree))  # fmt: skip
        try:
            shown = cli.ok("inspect", str(image))
            assert "opens:   provider:cmdp" in shown and "opens:   provider:grpcp" in shown
            for name in ("cmdp", "grpcp"):
                out = cli.ok("run", "--keep", "--identity", f"provider:{name}", str(image))
                assert out == f"{MARKER_LOWER}\n", name
            configure("fail")
            code, _, err = cli("run", "--identity", "provider:cmdp", str(image))
            assert code == ExitCode.RUN_FAILED
            assert err.startswith(
                f"error: key provider cmdp (cmd {sys.executable}) failed (exit status 1):"
                " test provider: the KBS refused to release the key (test)"
            )
        finally:
            shutil.rmtree(image)
    finally:
        server.kill()
        server.wait()


def test_run_takes_the_nodes_key_for_its_signer(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cryptlayer run` given no key option: the node's `[[keys]]` entry for the principal whose
    trusted signature the image carries opens it (its key command's output). Signed only by a
    key the trust file does not name, it is refused at the signature check, before any key
    source is read: the key command never runs."""
    publisher, stranger = tmp_path / "publisher", tmp_path / "stranger"
    for path in (publisher, stranger):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    trust = tmp_path / "allowed_signers"
    trust.write_text(
        "release@example " + " ".join(Path(f"{publisher}.pub").read_text().split()[:2]) + "\n"
    )
    ran = tmp_path / "key-command-ran"
    config = tmp_path / "config.toml"
    config.write_text(f"""trust = "{trust}"
[[keys]]
image = "/nowhere/*"
key-file = "/nowhere/app.key"
[[keys]]
signer = "release@example"
key-command = "sh -c 'touch {ran}; cat {key_file}'"
""")
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(config))
    cli.ok("sign", str(image), "--sign-key", str(publisher), "--name", "release")
    assert cli.ok("run", "--keep", str(image)) == f"{MARKER_LOWER}\n"
    assert ran.exists()
    ran.unlink()
    (image / "signatures/release.sig").unlink()
    cli.ok("sign", str(image), "--sign-key", str(stranger), "--name", "other")
    code, out, err = cli("run", "--keep", str(image))
    assert (code, out) == (ExitCode.RUN_FAILED, "")
    assert err.startswith(f"error: no key of {trust} signed {image} (signatures/other.sig:"), err
    assert not ran.exists()


def test_keys_kept_in_a_tpm_and_a_token_build_and_run(
    cli: Cli, tmp_path: Path, busybox_tree: Path, data_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keygen --tpm2 (swtpm) and a SoftHSM token's key as recipients of one image; run opens it
    with each (the PIN on standard input), and not after the TPM's PCR changed."""
    from hwfixtures import USER_PIN, softhsm_conf, softhsm_import, softhsm_token, swtpm, tpm2

    monkeypatch.setenv("SOFTHSM2_CONF", str(softhsm_conf(tmp_path / "softhsm")))
    token = softhsm_token(Path(os.environ["SOFTHSM2_CONF"]), "ops")
    cli.ok("keygen", "--rsa", str(tmp_path / "token-key"))
    softhsm_import(token, tmp_path / "token-key", "img-key", "01")
    (tmp_path / "token-key").unlink()
    base = Path(os.environ.get("CRYPTLAYER_SCRATCH", tmp_path))
    image = base / "hardware-keys"
    with swtpm(tmp_path / "tpm") as tcti:
        monkeypatch.setenv("TPM2TOOLS_TCTI", tcti)
        cli.ok("keygen", "--tpm2", "--pcrs", "sha256:7", str(tmp_path / "tpm-key"))
        cli.ok("build", "--recipient", f"{tmp_path}/tpm-key.pub",
               "--recipient", f"{tmp_path}/token-key.pub", "--output", str(image),
               "--cmd", "cat /data/hello.txt", str(busybox_tree), str(data_tree))  # fmt: skip
        try:
            out = cli.ok("run", "--keep", "--identity", f"tpm2:{tmp_path}/tpm-key", str(image))
            assert out == f"{MARKER_LOWER}\n"
            out = cli.ok("run", "--keep", "--identity", token.uri("img-key"), str(image),
                         input=f"{USER_PIN}\n")  # fmt: skip
            assert out == f"{MARKER_LOWER}\n"
            tpm2(tcti, "tpm2_pcrextend", "7:sha256=" + "03" * 32)
            code, _, err = cli("run", "--identity", f"tpm2:{tmp_path}/tpm-key", str(image))
            assert code == ExitCode.RUN_FAILED  # KEY for the other commands
            assert err.startswith("error: the TPM's PCRs (sha256:7) no longer match")
        finally:
            shutil.rmtree(image)
