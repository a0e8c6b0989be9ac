"""The node's keys (`[[keys]]` in config.toml, keys/node.py): an entry matches an image by its
path, its trusted signer, its digest or the repository it was pulled from, and gives its key
from a file, an identity, a command or the keyring; first match wins. The key is chosen only once
the image is open and its digest and signatures are checked (runtime/container.py, between
open_image and unlock), and `cryptlayer run`/`start` use it when no key option is given.

Signed images are real (luksfixtures.fake_image, signed with ssh-keygen's key, as
test_opener.py signs them); the assembly after the unlock needs dm-crypt (tests/vm)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from clirunner import invoke
from luksfixtures import fake_image

from cryptlayer import config
from cryptlayer.engine import encrypted
from cryptlayer.errors import ExitCode, TamperedImageError, UsageError, WrongKeyError
from cryptlayer.image import signatures
from cryptlayer.image.opener import Policy, open_image
from cryptlayer.keys import recipients, sources
from cryptlayer.keys.node import NodeKeys
from cryptlayer.runtime import container
from cryptlayer.secret import Secret

KEY = b"k" * 32  # fake_image's
DIGEST = "sha256:" + "cd" * 32


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(path))
    return path


@pytest.fixture(scope="module")
def publishers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two Ed25519 signing keys and a trust file: the first is publisher@example's, the second
    is trusted only as a pattern (`*@other`); a third key, not in it, is the stranger's."""
    folder = tmp_path_factory.mktemp("publishers")
    keys = []
    for name in ("publisher", "other", "stranger"):
        key = folder / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        keys.append(key)
    trust = folder / "allowed_signers"
    lines = [f"{who} {' '.join(Path(f'{key}.pub').read_text().split()[:2])}"
             for who, key in (("publisher@example", keys[0]), ("*@other", keys[1]))]  # fmt: skip
    trust.write_text("\n".join(lines) + "\n")
    return keys[0], keys[1], keys[2]


def trust_file(publishers: tuple[Path, Path, Path]) -> Path:
    return publishers[0].parent / "allowed_signers"


def signed(image: Path, key: Path) -> Path:
    (image / "signatures").mkdir(exist_ok=True)
    raw = (image / "manifest.json").read_bytes()
    text = signatures.sign(signatures.load_signing_key(key), raw)
    (image / "signatures" / f"{key.name}.sig").write_text(text)
    return image


def key_file(folder: Path, data: bytes = KEY, name: str = "app.key") -> Path:
    path = folder / name
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def unlocks(image: Path, node: NodeKeys, trust: Path | None) -> bytes:
    """The image key, opened as container.start opens it: open_image's checks, then the node's
    key chosen for what they found, then the unlock."""
    with (
        open_image(image, Policy(trust=trust)) as opened,
        container._chosen(node, opened) as chosen,
        opened.unlock(chosen) as key,
        key.view() as data,
    ):
        return bytes(data)


# -- matching


def test_each_matcher_and_first_match_wins(conf: Path) -> None:
    conf.write_text(f"""
[[keys]]
repository = "registry.example:5000/team/app"
key-file = "/k/pulled.key"
[[keys]]
digest = "{DIGEST}"
key-file = "/k/pinned.key"
[[keys]]
signer = "publisher@example"
keyring = "publisher"
[[keys]]
image = "/srv/*"
key-command = "/usr/local/bin/fetch-key --app 'x y'"
""")
    signer = ("publisher@example",)
    assert config.key_for(Path("/srv/a"), signers=signer, digest=DIGEST,
                          repository="registry.example:5000/team/app").key_file == "/k/pulled.key"  # fmt: skip
    assert config.key_for(Path("/srv/a"), signers=signer, digest=DIGEST).key_file == "/k/pinned.key"
    assert config.key_for(Path("/x"), signers=signer).keyring == "publisher"
    assert config.key_for(Path("/srv/a")) == config.ImageKey(
        image="/srv/*", key_command="/usr/local/bin/fetch-key --app 'x y'"
    )
    # a repository matches only an image pulled from it; an image a signer's line names among
    # others, exactly (OpenedImage.signers: a trust file line's principals, comma-separated)
    assert config.key_for(Path("/srv/a"), repository="registry.example:5000/team").image
    assert config.key_for(Path("/x"), signers=("ops@example,publisher@example",)).keyring
    for signers in (("publisher@example.org",), ("*@example",), ("!publisher@example",)):
        with pytest.raises(UsageError, match="no key for the image /x in"):
            config.key_for(Path("/x"), signers=signers)


def test_a_signer_negated_on_its_line_is_not_that_signer(conf: Path) -> None:
    conf.write_text('[[keys]]\nsigner = "publisher@example"\nkey-file = "/k"\n')
    with pytest.raises(UsageError, match="no key for the image"):
        config.key_for(Path("/x"), signers=("*@example,publisher@example,!publisher@example",))


def test_a_signer_a_negated_pattern_of_its_line_refuses_is_not_that_signer(conf: Path) -> None:
    """OpenSSH refuses a principal any negated pattern of the line matches (match_pattern_list):
    `ssh-keygen -Y verify -I publisher@example` fails for these lines' keys, so their images are
    not publisher@example's and get no key of its entry (found by review: only `!NAME` itself
    was looked for)."""
    conf.write_text('[[keys]]\nsigner = "publisher@example"\nkey-file = "/k"\n')
    for line in ("ops@example,publisher@example,!publisher@*", "publisher@example,!*",
                 "publisher@example,!pub?isher@example", "publisher@example,!*@example"):  # fmt: skip
        with pytest.raises(UsageError, match="no key for the image"):
            config.key_for(Path("/x"), signers=(line,))
    # a negated pattern that does not match it leaves it named
    for line in ("publisher@example,!mallory@*", "publisher@example,!publisher@example.org",
                 "publisher@example,!publisher?example.org"):  # fmt: skip
        assert config.key_for(Path("/x"), signers=(line,)).key_file == "/k"


def test_signer_entries_choose_by_the_verified_signature(
    conf: Path, tmp_path: Path, publishers: tuple[Path, Path, Path]
) -> None:
    """The signer's entry gives its key to the image its key signed; an image signed by a key
    the trust file trusts only by a pattern gets the next entry's; the image's own claims
    (its directory's name) choose nothing."""
    trust = trust_file(publishers)
    right = key_file(tmp_path)
    wrong = key_file(tmp_path, b"w" * 32, "other.key")
    conf.write_text(f"""trust = "{trust}"
[[keys]]
signer = "publisher@example"
key-file = "{right}"
[[keys]]
image = "/"
key-file = "{wrong}"
[[keys]]
image = "{tmp_path}/*"
key-file = "{wrong}"
""")
    image = signed(fake_image(tmp_path / "publisher@example"), publishers[0])
    assert len(unlocks(image, NodeKeys(), trust)) == 32
    other = signed(fake_image(tmp_path / "other"), publishers[1])
    with pytest.raises(WrongKeyError):
        unlocks(other, NodeKeys(), trust)  # *@other: the glob's key (the wrong one)
    # opened without a trust file (allow-unsigned): no signer is known, none matches
    with pytest.raises(WrongKeyError):
        unlocks(image, NodeKeys(), None)


def test_no_key_is_chosen_for_an_image_a_stranger_signed(
    conf: Path, tmp_path: Path, publishers: tuple[Path, Path, Path]
) -> None:
    """The key command never runs for an image whose signature does not verify against the
    trust file: the choice comes after open_image's checks, not before."""
    trust = trust_file(publishers)
    ran = tmp_path / "ran"
    conf.write_text(f"""trust = "{trust}"
[[keys]]
image = "{tmp_path}/*"
key-command = "sh -c 'touch {ran}; printf %s {KEY.decode()}'"
""")
    image = signed(fake_image(tmp_path / "img"), publishers[2])
    with pytest.raises(TamperedImageError, match=r"no key of .* signed"):
        unlocks(image, NodeKeys(), trust)
    assert not ran.exists()
    signed(image, publishers[0])
    assert len(unlocks(image, NodeKeys(), trust)) == 32
    assert ran.exists()


@pytest.mark.parametrize("how", ["program", "directory", "link"])
def test_a_key_command_others_could_change_never_runs(conf: Path, tmp_path: Path, how: str) -> None:
    """The key command runs as root (cryptlayer-runtime's user) and its output is the key: a
    program another user could change or replace (itself, a directory above it, where a
    symbolic link leads) is refused before it runs, as the runtime `[runtime]` names is (found
    by review: only key and identity files were checked)."""
    bin_dir, ran = tmp_path / "bin", tmp_path / "ran"
    bin_dir.mkdir()
    program = bin_dir / "fetch-key"
    program.write_text(f"#!/bin/sh\ntouch {ran}\nprintf %s {KEY.decode()}\n")
    program.chmod(0o755)
    named, loose = program, {"program": program, "directory": bin_dir}.get(how)
    if how == "link":  # a link of root's, in a directory of root's, to another's directory
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        (theirs / "fetch-key").write_bytes(program.read_bytes())
        (theirs / "fetch-key").chmod(0o755)
        named = tmp_path / "fetch-key"
        named.symlink_to(theirs / "fetch-key")
        os.chown(theirs, 65534, 65534)
    else:
        assert loose is not None
        loose.chmod(0o757 if how == "program" else 0o777)
    conf.write_text(f'[[keys]]\nimage = "/x"\nkey-command = "{named} --app x"\n')
    with pytest.raises(UsageError, match="another user could change the key command") as err:
        NodeKeys().choose(Path("/x"), signers=(), digest=DIGEST)
    why = "owned by uid 65534" if how == "link" else "writable by group or others"
    assert why in str(err.value)
    assert not ran.exists()
    if how == "link":
        os.chown(tmp_path / "theirs", 0, 0)
    else:
        assert loose is not None
        loose.chmod(0o755)
    with NodeKeys().choose(Path("/x"), signers=(), digest=DIGEST) as credential:
        assert credential.key is not None
        with credential.key.view() as data:
            assert bytes(data) == KEY
    assert ran.exists()


def test_digest_entries_choose_by_the_statement(conf: Path, tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img")
    with open_image(image, Policy(layers=False)) as opened:
        digest = opened.manifest.digest
    conf.write_text(f"""
[[keys]]
digest = "{DIGEST}"
key-file = "{key_file(tmp_path, b"w" * 32, "other.key")}"
[[keys]]
digest = "{digest}"
key-file = "{key_file(tmp_path)}"
""")
    assert len(unlocks(image, NodeKeys(), None)) == 32
    (image / "manifest.json").write_bytes((image / "manifest.json").read_bytes() + b"\n")
    with pytest.raises(UsageError) as err:  # another statement is another image
        unlocks(image, NodeKeys(), None)
    assert str(err.value).startswith(f"no key for the image {image} in {conf}")


def test_the_repository_is_what_the_create_pulled(conf: Path, tmp_path: Path) -> None:
    conf.write_text(f'[[keys]]\nrepository = "registry.example/team/app"\n'
                    f'key-file = "{key_file(tmp_path)}"\n')  # fmt: skip
    image = fake_image(tmp_path / "img")
    with pytest.raises(UsageError, match="no key for the image"):
        unlocks(image, encrypted.credential_for(image), None)
    node = encrypted.credential_for(image, repository="registry.example/team/app")
    assert len(unlocks(image, node, None)) == 32


# -- sources


def test_each_source_reads_its_key(
    conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = key_file(tmp_path)
    conf.write_text(f"""
[[keys]]
image = "/a"
key-command = "cat {key}"
[[keys]]
image = "/b"
keyring = "app"
[[keys]]
image = "/c"
identity = "provider:hsm"
""")
    asked: list[str] = []

    def keyring(name: str) -> Secret:
        asked.append(name)
        return Secret(bytearray(b"r" * 32))

    def identity(name: str) -> recipients.Identity:
        asked.append(name)
        raise UsageError(f"stand-in identity loader: {name}")

    monkeypatch.setattr(sources, "read_keyring", keyring)
    monkeypatch.setattr(recipients, "load_identity", identity)
    node = NodeKeys()
    for image, expected in (("/a", KEY), ("/b", b"r" * 32)):
        with node.choose(Path(image), signers=(), digest=DIGEST) as credential:
            assert credential.key is not None
            with credential.key.view() as data:
                assert bytes(data) == expected
    # an identity of another kind goes to the loader --identity uses, as written (no path check)
    with pytest.raises(UsageError, match="stand-in identity loader: provider:hsm"):
        node.choose(Path("/c"), signers=(), digest=DIGEST)
    assert asked == ["app", "provider:hsm"]


def test_an_identity_file_others_may_write_is_refused(conf: Path, tmp_path: Path) -> None:
    identity = tmp_path / "id.pem"
    recipients.write_key_pair(identity, recipients.KeyKind.X25519)
    identity.chmod(0o620)
    conf.write_text(f'[[keys]]\nimage = "/a"\nidentity = "{identity}"\n')
    with pytest.raises(UsageError) as err:
        NodeKeys().choose(Path("/a"), signers=(), digest=DIGEST)
    assert str(err.value) == (
        f"the key {identity} is not root's own file, writable by no one else: chown root"
        f" {identity}; chmod 600 {identity}"
    )
    identity.chmod(0o600)
    with NodeKeys().choose(Path("/a"), signers=(), digest=DIGEST) as credential:
        assert credential.identity is not None


# -- cryptlayer run and start without a key option


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """container.start up to the unlock on this host (no dm-crypt here): the kernel check is
    skipped, and the assembly stops right after the key opened the image (the image keys
    that did, returned)."""
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("CRYPTLAYER_RUNDIR", str(tmp_path / "run"))
    monkeypatch.setattr(container, "require_kernel", lambda: None)
    opened: list[bytes] = []

    def stop_here(record: object, image: object, key: Secret, *_: object) -> None:
        with key.view() as data:
            opened.append(bytes(data))
        raise UsageError("stand-in: the assembly needs dm-crypt")

    monkeypatch.setattr(container, "_assemble_record", stop_here)
    return opened


def test_start_without_a_key_option_uses_the_nodes_key(
    conf: Path, tmp_path: Path, publishers: tuple[Path, Path, Path], host: list[bytes]
) -> None:
    trust = trust_file(publishers)
    image = signed(fake_image(tmp_path / "img"), publishers[0])
    conf.write_text(f"""trust = "{trust}"
[[keys]]
signer = "publisher@example"
key-file = "{key_file(tmp_path)}"
""")
    code, _, err = invoke("start", str(image), "--name", "c1", "--keep")
    assert (code, err.splitlines()[-1]) == (2, "error: stand-in: the assembly needs dm-crypt")
    assert len(host) == 1 and len(host[0]) == 32
    # a key option wins over the node's (here a wrong one)
    wrong = key_file(tmp_path, b"w" * 32, "wrong.key")
    code, _, err = invoke("start", str(image), "--name", "c1", "--keep", "--key-file", str(wrong))
    assert code == WrongKeyError.exit_code and len(host) == 1, err


def test_run_without_a_key_option_and_no_match_says_what_to_do(
    conf: Path, tmp_path: Path, publishers: tuple[Path, Path, Path], host: list[bytes]
) -> None:
    trust = trust_file(publishers)
    image = signed(fake_image(tmp_path / "img"), publishers[1])  # trusted, not that signer
    conf.write_text(f"""trust = "{trust}"
[[keys]]
signer = "publisher@example"
key-file = "{key_file(tmp_path)}"
""")
    code, _, err = invoke("run", "--keep", str(image))
    assert code == ExitCode.RUN_FAILED and not host, err  # run's, for what came before the run
    assert err.splitlines()[-1] == (
        f"error: no key for the image {image} in {conf}: add an entry for it, e.g."
        f" {config.KEYS_EXAMPLE}, or give --key-file (or --key-command, --keyring, --passphrase,"
        " --identity)"
    )
    # a node without [[keys]]: the options' error, as it always was
    conf.write_text(f'trust = "{trust}"\n')
    code, _, err = invoke("run", "--keep", str(image))
    assert code == ExitCode.RUN_FAILED and not host
    assert err.splitlines()[-1].startswith("error: give exactly one of --key-file, --key-command")
