"""Publisher signatures without devices: OpenSSH's SSHSIG format both ways (ssh-keygen verifies
ours, we verify ssh-keygen's), allowed_signers, and `sign`/`verify`/`run --trust` on a copy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from luksfixtures import fake_image

from cryptlayer.errors import ExitCode, TamperedImageError, UsageError
from cryptlayer.image import signatures


def ssh_keygen(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh-keygen", *args], input=input, capture_output=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ssh")
    made = {}
    for kind, extra in (("ed25519", []), ("rsa", ["-b", "3072"])):
        path = base / kind
        assert ssh_keygen("-q", "-t", kind, *extra, "-N", "", "-C", f"{kind}@test",
                          "-f", str(path)).returncode == 0  # fmt: skip
        made[kind] = path
    return made


def allowed(path: Path, keys: dict[str, Path], *kinds: str, options: str = "") -> Path:
    lines = []
    for kind in kinds:
        pub = Path(f"{keys[kind]}.pub").read_text().split()
        lines.append(" ".join(x for x in (f"{kind}@test", options, pub[0], pub[1]) if x))
    path.write_text("\n".join(["# publishers", *lines]) + "\n")
    return path


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_ssh_keygen_verifies_ours(tmp_path: Path, keys: dict[str, Path], kind: str) -> None:
    message = b'{"format": "cryptlayer.image.v2"}\n'
    sig = tmp_path / "x.sig"
    sig.write_text(signatures.sign(signatures.load_signing_key(keys[kind]), message))
    signers = allowed(tmp_path / "allowed", keys, kind)
    verify = ["-Y", "verify", "-n", "cryptlayer-image", "-f", str(signers), "-I", f"{kind}@test",
              "-s", str(sig)]  # fmt: skip
    done = ssh_keygen(*verify, input=message)
    assert done.returncode == 0, done.stderr
    assert b'Good "cryptlayer-image" signature' in done.stdout
    assert ssh_keygen(*verify, input=message + b" ").returncode != 0


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_we_verify_ssh_keygens(tmp_path: Path, keys: dict[str, Path], kind: str) -> None:
    message = tmp_path / "manifest.json"
    message.write_bytes(b"statement bytes\n")
    assert ssh_keygen("-Y", "sign", "-n", "cryptlayer-image", "-f", str(keys[kind]),
                      str(message)).returncode == 0  # fmt: skip
    armored = Path(f"{message}.sig").read_bytes()
    key = signatures.verify(armored, b"statement bytes\n")
    fingerprint = ssh_keygen("-l", "-f", f"{keys[kind]}.pub").stdout.split()[1].decode()
    assert key.fingerprint == fingerprint
    with pytest.raises(ValueError, match="does not match the statement"):
        signatures.verify(armored, b"statement bytes!\n")


def test_another_namespace_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A signature the publisher made for something else (a git commit, a file) is not ours."""
    message = tmp_path / "m"
    message.write_bytes(b"x")
    ssh_keygen("-Y", "sign", "-n", "git", "-f", str(keys["ed25519"]), str(message))
    with pytest.raises(ValueError, match="made for namespace 'git'"):
        signatures.verify(Path(f"{message}.sig").read_bytes(), b"x")


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        ("a@b ssh-dss AAAA", "no key of a supported type"),
        ("a@b cert-authority ssh-ed25519 AAAA", "cert-authority lines are not supported"),
        ("a@b ssh-ed25519 !!!", "base64 data"),
        ("a@b frobnicate ssh-ed25519 AAAA", "unknown option frobnicate"),
        ('a@b valid-before="1 Jan" ssh-ed25519 AAAA', "a time is not YYYYMMDD[HHMM[SS]][Z]"),
        ('a@b valid-after="20200230" ssh-ed25519 AAAA', "20200230 is not a valid time"),
        ('a@b namespaces="x ssh-ed25519 AAAA', "unterminated quote"),
        ('a@b namespaces="x",  ssh-ed25519 AAAA', "its options end with a comma"),
        ("a@b", "no key"),
        ('a@b\tnamespaces="x"', "no key after its options"),
        ("a@b namespaces=x ssh-ed25519 AAAA", "namespaces is not in double quotes"),
    ],
)
def test_bad_trust_lines(tmp_path: Path, line: str, detail: str) -> None:
    path = tmp_path / "allowed"
    path.write_text(f"# ok\n\n{line}\n")
    with pytest.raises(UsageError) as caught:
        signatures.load_trust(path)
    assert caught.value.message.startswith(f"{path}, line 3: ")
    assert detail.lower() in caught.value.message.lower()


def test_sign_verify_and_trust(tmp_path: Path, keys: dict[str, Path]) -> None:
    image = fake_image(tmp_path / "img")
    digest = json.loads(invoke("inspect", "--json", str(image))[1])["digest"]
    code, _, err = invoke("sign", str(image), "--sign-key", str(keys["ed25519"]), "--name", "rel")
    assert code == 0 and err == f"signed {digest}: {image}/signatures/rel.sig\n"
    # ssh-keygen agrees, with the command line the docs give
    signers = allowed(tmp_path / "allowed", keys, "ed25519")
    done = subprocess.run(["ssh-keygen", "-Y", "verify", "-n", "cryptlayer-image", "-f",
                           str(signers), "-I", "ed25519@test", "-s", f"{image}/signatures/rel.sig"],
                          input=(image / "manifest.json").read_bytes(), capture_output=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    code, out, _ = invoke("verify", str(image), "--trust", str(signers))
    assert code == 0, out
    assert out.splitlines() == [f"image:   {digest}", "signed:  ed25519@test",
                                "layers:  1, each as the statement records it"]  # fmt: skip
    info = json.loads(invoke("inspect", "--json", str(image))[1])
    assert info["digest"] == digest  # signing does not change the digest
    assert [s["status"] for s in info["signatures"]] == ["valid"]
    # a signer the trust file does not name
    only_rsa = allowed(tmp_path / "rsa-only", keys, "rsa")
    code, _, err = invoke("verify", str(image), "--trust", str(only_rsa))
    assert code == ExitCode.TAMPERED
    assert err.startswith(
        f"error: no key of {only_rsa} signed {image} (signatures/rel.sig: SHA256:"
    )


def test_trust_restricted_to_other_namespaces(tmp_path: Path, keys: dict[str, Path]) -> None:
    image = fake_image(tmp_path / "img")
    invoke("sign", str(image), "--sign-key", str(keys["ed25519"]))
    git_only = allowed(tmp_path / "a", keys, "ed25519", options='namespaces="git,file"')
    assert invoke("verify", str(image), "--trust", str(git_only))[0] == ExitCode.TAMPERED
    ours = allowed(tmp_path / "b", keys, "ed25519", options='namespaces="git,cryptlayer-image"')
    assert invoke("verify", str(image), "--trust", str(ours))[0] == 0


def test_changed_statement_fails_every_signature(tmp_path: Path, keys: dict[str, Path]) -> None:
    image = fake_image(tmp_path / "img")
    invoke("sign", str(image), "--sign-key", str(keys["ed25519"]), "--name", "rel")
    doc = json.loads((image / "manifest.json").read_text())
    doc["config"]["cmd"] = ["sh", "-c", "evil"]
    (image / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    code, _, err = invoke("verify", str(image))
    assert (code, err) == (ExitCode.TAMPERED, (
        f"error: a signature of {image} does not verify (signatures/rel.sig: it does not match"
        " the statement (changed since it was signed)): the image changed since it was signed,"
        " or the signature is damaged\n"))  # fmt: skip


def test_verify_checks_layer_headers(tmp_path: Path) -> None:
    from luksfixtures import metadata, write_layer

    image = fake_image(tmp_path / "img")
    meta = metadata()
    meta["segments"]["0"]["encryption"] = "cipher_null-ecb"
    write_layer(image / "layer0.luks", meta)
    code, _, err = invoke("verify", str(image))
    assert code == ExitCode.TAMPERED
    assert "cipher_null-ecb" in err and err.startswith(f"error: the LUKS2 header of {image}/layer0")


def test_run_and_start_with_trust_refuse_an_unsigned_image(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    """Refused before the key is used or any device touched (so this runs on any host)."""
    image = fake_image(tmp_path / "img")
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    signers = allowed(tmp_path / "allowed", keys, "ed25519")
    for args in (("run", "--keep", "--trust", str(signers), "-k", str(key), str(image)),
                 ("start", "--keep", "--name", "t", "--trust", str(signers), "-k", str(key),
                  str(image))):  # fmt: skip
        code, _, err = invoke(*args)  # (after any warning about this host's swap or cores)
        own = ExitCode.RUN_FAILED if args[0] == "run" else ExitCode.TAMPERED  # (podman's 125)
        assert (code, err.splitlines()[-1]) == (own, (
            f"error: no key of {signers} signed {image} (it has no signatures/*.sig): run only"
            " images your publishers signed; check with `cryptlayer verify`")), args  # fmt: skip


def test_default_trust_from_the_config(
    tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = fake_image(tmp_path / "img")
    signers = allowed(tmp_path / "allowed", keys, "rsa")
    config = tmp_path / "config.toml"
    config.write_text(f'trust = "{signers}"\n')
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(config))
    invoke("sign", str(image), "--sign-key", str(keys["ed25519"]))
    code, _, err = invoke("verify", str(image))
    assert code == ExitCode.TAMPERED and f"no key of {signers} signed" in err
    config.write_text(f'trst = "{signers}"\n')
    code, _, err = invoke("verify", str(image))
    assert (code, err) == (ExitCode.USAGE, f"error: {config}: unknown setting trst (known:"
                                           " allow-unsigned, block-cache-size, keys, pull, quiet-warnings, registries, runtime, trust): fix or remove it\n")  # fmt: skip
    config.write_text("trust = 5\n")
    code, _, err = invoke("verify", str(image))
    assert (code, err) == (ExitCode.USAGE, f"error: {config}: trust is not a path: e.g. trust ="
                                           ' "/etc/cryptlayer/signers"\n')  # fmt: skip


def test_encrypted_signing_key_asks_its_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "k"
    ssh_keygen("-q", "-t", "ed25519", "-N", "secret words", "-f", str(path))
    image = fake_image(tmp_path / "img")
    code, _, err = invoke("sign", str(image), "--sign-key", str(path), input="wrong\n")
    assert (code, err) == (ExitCode.USAGE, f"error: wrong passphrase for {path}\n")
    assert invoke("sign", str(image), "--sign-key", str(path), input="secret words\n")[0] == 0
    assert len(signatures.read_all(image, (image / "manifest.json").read_bytes())[0]) == 1


def test_hostile_signature_files(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Symlinks, FIFOs, huge or garbage files under signatures/: reasons, never a hang."""
    import os

    image = fake_image(tmp_path / "img")
    (image / "signatures").mkdir()
    (image / "signatures/link.sig").symlink_to("/dev/zero")
    os.mkfifo(image / "signatures/fifo.sig")
    (image / "signatures/garbage.sig").write_text("-----BEGIN SSH SIGNATURE-----\n!!\n"
                                                  "-----END SSH SIGNATURE-----\n")  # fmt: skip
    (image / "signatures/huge.sig").write_bytes(b"x" * (1 << 20))
    good, bad = signatures.read_all(image, (image / "manifest.json").read_bytes())
    assert good == [] and [b.file for b in bad] == ["fifo.sig", "garbage.sig", "huge.sig",
                                                    "link.sig"]  # fmt: skip
    with pytest.raises(TamperedImageError):
        signatures.require_trusted(image, b"", allowed(tmp_path / "a", keys, "ed25519"))


@pytest.mark.parametrize(
    ("where", "target", "offset"),
    [
        ("keyslot area", "layer0.luks", 150_000),  # no header checksum covers it
        ("data start", "layer0.luks", 294_912),
        ("last byte", "layer0.luks", -1),
        ("hash tree", "layer0.verity", 0),
    ],
)
def test_verify_finds_a_changed_byte_anywhere(
    tmp_path: Path, where: str, target: str, offset: int
) -> None:
    image = fake_image(tmp_path / "img")
    assert invoke("verify", str(image))[0] == 0
    path = image / target
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))
    code, _, err = invoke("verify", str(image))
    assert (code, err) == (ExitCode.TAMPERED, (
        f"error: layer file {image}/layer0.luks does not match its dm-verity hash tree"
        f" ({image}/layer0.verity) and the statement's root hash: it was changed after the build:"
        " do not use this copy; copy the image again from a source you trust\n")), where  # fmt: skip


def test_verify_of_a_shredded_copy_says_so(tmp_path: Path) -> None:
    from luksfixtures import metadata, write_layer

    image = fake_image(tmp_path / "img")
    meta = metadata()
    meta["keyslots"] = {}  # what luksErase leaves
    write_layer(image / "layer0.luks", meta, seqid=2)
    code, _, err = invoke("verify", str(image))
    assert (code, err) == (ExitCode.ERASED, (
        f"error: image {image} was shredded (crypto-erased): no key can open it any more:"
        " build or copy a fresh image\n"))  # fmt: skip


# ---- allowed_signers as OpenSSH reads it: each case checked against `ssh-keygen -Y verify` ----

TRUSTED, REFUSED = True, False
KEY = "{key}"  # the ed25519 test key, "ssh-ed25519 AAAA..."
AGREE_CASES = [
    # (case, allowed_signers text, trusted by ssh-keygen and by cryptlayer)
    ("plain", f"ed25519@test {KEY}", TRUSTED),
    ("our namespace", f'ed25519@test namespaces="cryptlayer-image" {KEY}', TRUSTED),
    ("another namespace", f'ed25519@test namespaces="git" {KEY}', REFUSED),
    ("tab after principals", f'ed25519@test\tnamespaces="git" {KEY}', REFUSED),
    ("tabs everywhere", f'ed25519@test\t\tnamespaces="git"\t{KEY}', REFUSED),
    ("tabs, our namespace", f'ed25519@test\tnamespaces="git,cryptlayer-image"\t{KEY}', TRUSTED),
    ("namespace pattern", f'ed25519@test namespaces="crypt*-im?ge" {KEY}', TRUSTED),
    ("namespace pattern elsewhere", f'ed25519@test namespaces="git*,file" {KEY}', REFUSED),
    ("namespace negated", f'ed25519@test namespaces="!cryptlayer-image,*" {KEY}', REFUSED),
    ("negated last", f'ed25519@test namespaces="*,!cryptlayer-*" {KEY}', REFUSED),
    ("option case", f'ed25519@test NAMESPACES="git" {KEY}', REFUSED),
    ("expired", f'ed25519@test valid-before="20200101" {KEY}', REFUSED),
    ("expired, UTC", f'ed25519@test valid-before="202001011200Z" {KEY}', REFUSED),
    ("expired, tab", f'ed25519@test\tvalid-before="20200101"\t{KEY}', REFUSED),
    ("not yet valid", f'ed25519@test valid-after="20990101" {KEY}', REFUSED),
    (
        "within its time",
        f'ed25519@test valid-after="20200101Z",valid-before="20990101" {KEY}',
        TRUSTED,
    ),
    ("seconds", f'ed25519@test valid-before="20990101123456Z" {KEY}', TRUSTED),
    (
        "both options",
        f'ed25519@test namespaces="cryptlayer-image",valid-before="20200101" {KEY}',
        REFUSED,
    ),
    ("bad time", f'ed25519@test valid-before="2099-01-01" {KEY}', REFUSED),
    (
        "before after after",
        f'ed25519@test valid-after="20990101",valid-before="20980101" {KEY}',
        REFUSED,
    ),
    ("twice", f'ed25519@test namespaces="cryptlayer-image",namespaces="git" {KEY}', REFUSED),
    ("unquoted", f"ed25519@test namespaces=cryptlayer-image {KEY}", REFUSED),
    ("principal pattern", f"*@test,other {KEY}", TRUSTED),
    ("comment after the key", f"ed25519@test {KEY} alice's laptop", TRUSTED),
    (
        "expired, then not",
        f'ed25519@test valid-before="20200101" {KEY}\ned25519@test {KEY}',
        TRUSTED,
    ),
    (
        "other namespace, then ours",
        f'ed25519@test namespaces="git" {KEY}\ned25519@test namespaces="cryptlayer-image" {KEY}',
        TRUSTED,
    ),
    ("cert-authority", f"ed25519@test cert-authority {KEY}", REFUSED),
    ("quoted principal", f'"ed25519@test" {KEY}', TRUSTED),
    ("leading blanks, CRLF", f" \t ed25519@test {KEY}\r", TRUSTED),
    # principals that no `-I` matches: ssh-keygen never verifies with such a line
    ("empty principals", f'"" {KEY}', REFUSED),
    ("negated principal", f"!ed25519@test {KEY}", REFUSED),
    ("all negated", f"!*,* {KEY}", REFUSED),
    ("negated, then any", f"!other@test,* {KEY}", TRUSTED),
    ("NUL after the principal", f"ed25519@test\0 {KEY}", REFUSED),  # ssh reads up to the NUL
    # after options only blanks (space, tab) may come before the key type, not a CR
    ("CR before the key", f'ed25519@test namespaces="cryptlayer-image" \r{KEY}', REFUSED),
    ("CR after the principal", f"ed25519@test \r{KEY}", TRUSTED),
]


@pytest.fixture(scope="module")
def signed_by_ssh_keygen(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Path:
    """An image whose one signature ssh-keygen made (signatures/ed25519.sig)."""
    image = fake_image(tmp_path_factory.mktemp("agree") / "img")
    (image / "signatures").mkdir()
    done = ssh_keygen("-Y", "sign", "-n", "cryptlayer-image", "-f", str(keys["ed25519"]),
                      input=(image / "manifest.json").read_bytes())  # fmt: skip
    assert done.returncode == 0, done.stderr
    (image / "signatures/ed25519.sig").write_bytes(done.stdout)
    return image


@pytest.mark.parametrize(("case", "text", "expected"), AGREE_CASES, ids=[c[0] for c in AGREE_CASES])
def test_allowed_signers_read_as_ssh_keygen_reads_them(
    tmp_path: Path, keys: dict[str, Path], signed_by_ssh_keygen: Path,
    case: str, text: str, expected: bool,
) -> None:  # fmt: skip
    """ssh-keygen -Y verify and cryptlayer, on the same files, agree on each line's meaning:
    time limits honoured, whitespace is spaces or tabs, namespaces a pattern list."""
    image = signed_by_ssh_keygen
    pub = " ".join(Path(f"{keys['ed25519']}.pub").read_text().split()[:2])
    trust = tmp_path / "allowed_signers"
    trust.write_text(text.replace(KEY, pub) + "\n")
    manifest = (image / "manifest.json").read_bytes()
    done = ssh_keygen("-Y", "verify", "-f", str(trust), "-I", "ed25519@test", "-n",
                      "cryptlayer-image", "-s", str(image / "signatures/ed25519.sig"),
                      input=manifest)  # fmt: skip
    assert (done.returncode == 0) == expected, (case, done.stderr)
    try:
        signatures.require_trusted(image, manifest, trust)
        ours = TRUSTED
    except (TamperedImageError, UsageError):
        ours = REFUSED
    assert ours == expected, case


def test_an_expired_signer_is_named_as_expired(
    tmp_path: Path, keys: dict[str, Path], signed_by_ssh_keygen: Path
) -> None:
    """The refusal says why the line did not count, as ssh-keygen says "key has expired"."""
    pub = " ".join(Path(f"{keys['ed25519']}.pub").read_text().split()[:2])
    trust = tmp_path / "allowed_signers"
    trust.write_text(f'ed25519@test\tvalid-before="20200101Z" {pub}\n')
    code, _, err = invoke("verify", str(signed_by_ssh_keygen), "--trust", str(trust))
    assert code == ExitCode.TAMPERED
    assert (f"signatures/ed25519.sig: its key (ed25519@test, {trust} line 1) expired at"
            " 2020-01-01 00:00:00 UTC") in err  # fmt: skip


@pytest.mark.parametrize(
    ("patterns", "string", "expected"),
    [
        ("*@test", "ed25519@test", 1),
        ("a?c", "abc", 1),
        ("a?c", "ac", 0),
        ("a*b*c", "axxbyyc", 1),
        ("[ab]", "a", 0),  # no character classes in OpenSSH patterns
        ("[ab]", "[ab]", 1),
        ("!ed*,*", "ed25519@test", -1),
        ("*,!ed*", "ed25519@test", -1),
        ("!x,*", "y", 1),
        ("!y", "x", 0),
        ("", "", 0),
        ("a,,b", "b", 1),
    ],
)
def test_openssh_pattern_lists(patterns: str, string: str, expected: int) -> None:
    assert signatures.match_pattern_list(string, patterns) == expected


# ---- `sign`'s key: what a user gives by mistake gets an answer, not a library's text ---------


def _sign_process(image: Path, key: Path) -> subprocess.CompletedProcess[str]:
    """`cryptlayer sign` as a process whose standard input is no terminal and empty (a CI job,
    a cron line)."""
    import sys

    return subprocess.run([sys.executable, "-m", "cryptlayer", "sign", str(image), "--sign-key",
                           str(key)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)  # fmt: skip


def test_encrypted_signing_key_without_a_terminal(tmp_path: Path) -> None:
    """sign has no --key-file: the error says what works instead."""
    path = tmp_path / "k"
    ssh_keygen("-q", "-t", "ed25519", "-N", "secret words", "-f", str(path))
    image = fake_image(tmp_path / "img")
    done = _sign_process(image, path)
    assert (done.returncode, done.stderr) == (ExitCode.USAGE, (
        f"error: the signing key {path} is passphrase-protected and there is no terminal to ask"
        " for its passphrase (standard input is not one, and gave none): run it on a terminal,"
        " pipe the passphrase on standard input, or sign with ssh-keygen (which can use"
        f" ssh-agent): ssh-keygen -Y sign -n cryptlayer-image -f {path} IMAGE/manifest.json,"
        " then move manifest.json.sig to IMAGE/signatures/NAME.sig\n"))  # fmt: skip
    assert "--key-file" not in done.stderr
    code, _, err = invoke("sign", str(image), "--sign-key", str(path), input="")
    assert code == ExitCode.USAGE and "is passphrase-protected and there is no terminal" in err


def test_public_key_given_to_sign(tmp_path: Path, keys: dict[str, Path]) -> None:
    image = fake_image(tmp_path / "img")
    pub = Path(f"{keys['ed25519']}.pub")
    code, _, err = invoke("sign", str(image), "--sign-key", str(pub))
    assert (code, err) == (ExitCode.USAGE, (
        f"error: {pub} is a public key: give the private key (without .pub):"
        f" --sign-key {keys['ed25519']}\n"))  # fmt: skip
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    code, _, err = invoke("sign", str(image), "--sign-key", str(garbage))
    assert (code, err) == (ExitCode.USAGE, (
        f"error: {garbage} is not a private key: give an OpenSSH or PEM private key (Ed25519"
        " or RSA), e.g. ~/.ssh/id_ed25519\n"))  # fmt: skip
    assert "http" not in err


def test_signing_key_others_can_read_is_refused_as_ssh_keygen_refuses_it(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    import shutil

    image = fake_image(tmp_path / "img")
    key = tmp_path / "id_ed25519"
    shutil.copy(keys["ed25519"], key)
    key.chmod(0o644)
    done = ssh_keygen("-Y", "sign", "-n", "cryptlayer-image", "-f", str(key),
                      input=b"x")  # fmt: skip
    assert done.returncode != 0 and b"are too open" in done.stderr  # what ssh-keygen says
    code, _, err = invoke("sign", str(image), "--sign-key", str(key))
    assert (code, err) == (ExitCode.USAGE, (
        f"error: permissions 0644 for {key} are too open (a private key must not be"
        f" accessible by others): chmod 600 {key}\n"))  # fmt: skip
    assert not (image / "signatures").exists()
    key.chmod(0o600)
    assert invoke("sign", str(image), "--sign-key", str(key))[0] == 0


@pytest.mark.parametrize("valid_before", ["202007010030", "202007010100", "202006302330Z"])
@pytest.mark.parametrize("at", ["202006302345Z", "202006302315Z"])
def test_local_times_read_as_ssh_keygen_reads_them(
    tmp_path: Path, keys: dict[str, Path], signed_by_ssh_keygen: Path,
    monkeypatch: pytest.MonkeyPatch, valid_before: str, at: str,
) -> None:  # fmt: skip
    """A time without Z is local time as mktime(3) reads OpenSSH's zeroed struct tm (standard
    time, even in summer): checked at fixed moments (ssh-keygen's -Overify-time) in Berlin."""
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        pub = " ".join(Path(f"{keys['ed25519']}.pub").read_text().split()[:2])
        trust = tmp_path / "allowed_signers"
        trust.write_text(f'ed25519@test valid-before="{valid_before}" {pub}\n')
        image = signed_by_ssh_keygen
        manifest = (image / "manifest.json").read_bytes()
        done = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(trust), "-I", "ed25519@test", "-n",
             "cryptlayer-image", "-s", str(image / "signatures/ed25519.sig"),
             f"-Overify-time={at}"],
            input=manifest, capture_output=True, env={"TZ": "Europe/Berlin"}, check=False,
        )  # fmt: skip
        key = signatures.read_all(image, manifest)[0][0].key
        ours = signatures.trusted(signatures.load_trust(trust), key, signatures.parse_time(at))
        assert bool(ours) == (done.returncode == 0), done.stderr
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_principal_patterns_cannot_make_trust_checking_hang(
    tmp_path: Path, keys: dict[str, Path], signed_by_ssh_keygen: Path
) -> None:
    """Principals are patterns matched against patterns (which principals can match at all):
    `!*a*a*a*a*a*a*a*a*c,*a*a*...*b` made a backtracking matcher take hours. Matched as OpenSSH
    matches (`*` any run, `?` one character) in time linear in both lengths: the check ends,
    and says the line trusts its key (as `*a*a...*b` names someone)."""
    pub = " ".join(Path(f"{keys['ed25519']}.pub").read_text().split()[:2])
    trust = tmp_path / "allowed_signers"
    trust.write_text("!" + "*a" * 12 + "*c," + "*a" * 300 + "b " + pub + "\n")
    check = ("import sys; from pathlib import Path; from cryptlayer.image import signatures as s;"
             " print(s.require_trusted(Path(sys.argv[1]), Path(sys.argv[1], 'manifest.json')"
             ".read_bytes(), Path(sys.argv[2]))[0][:4])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", check, str(signed_by_ssh_keygen), str(trust)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "!*a*\n"), done.stderr


def test_principals_are_bounded(tmp_path: Path, keys: dict[str, Path]) -> None:
    """Principals are matched against each other (which names a line can match): quadratic in
    their length, so a line's are at most 4096 characters (`"*aaa...ab"` negations against
    `aaa...a` names, 1 MiB of them, took hours even in linear-time matching)."""
    pub = " ".join(Path(f"{keys['ed25519']}.pub").read_text().split()[:2])
    trust = tmp_path / "allowed_signers"
    slow = ",".join(["!*" + "a" * 500 + "b"] * 8 + ["a" * 1000] * 2 + ["!*"])
    trust.write_text(f"{slow} {pub}\n")
    with pytest.raises(UsageError, match="line 1: its principals are longer than 4096 char"):
        signatures.load_trust(trust)
    trust.write_text(f"{slow[:4000]},* {pub}\n")
    assert len(signatures.load_trust(trust)) == 1


@pytest.mark.parametrize("seed", range(3))
def test_pattern_matching_is_openssh_glob(seed: int) -> None:
    """The linear matcher against a plain regex translation, on random short strings."""
    import random
    import re

    rng = random.Random(seed)
    for _ in range(3000):
        pattern = "".join(rng.choice("ab*?") for _ in range(rng.randrange(7)))
        string = "".join(rng.choice("ab*?") for _ in range(rng.randrange(7)))
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        expected = re.fullmatch(regex, string, re.DOTALL) is not None
        assert signatures.match_pattern(string, pattern) == expected, (string, pattern)


# ---- `sign` writes by descriptor, in a directory only root may write -------------------------


@pytest.fixture
def key(keys: dict[str, Path]) -> Path:
    return keys["ed25519"]


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
    from cryptlayer.image import manifest

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


def test_sign_takes_an_image_path_through_a_symlink_as_every_command(
    image: Path, tmp_path: Path, key: Path
) -> None:
    """The path the user gave is resolved, then nothing below it followed (as opener.py does
    for run, verify, inspect...). Failed before: sign read manifest.json through the link, then
    refused the same path as "not an image directory (Too many levels of symbolic links)"."""
    link = tmp_path / "current"
    link.symlink_to(image)
    code, _, err = invoke("sign", str(link), "--sign-key", str(key), "--name", "rel")
    assert code == 0, err
    assert (image / "signatures/rel.sig").read_text().startswith("-----BEGIN SSH SIGNATURE")
    code, _, err = invoke("verify", str(link))
    assert code == 0, err
