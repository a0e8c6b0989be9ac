"""Who may open an image: keys.json wrapping, recipients, identities, passphrases (no devices)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from terminal import in_pty

from cryptlayer.errors import ExitCode, UsageError, WrongKeyError
from cryptlayer.image import envelope
from cryptlayer.keys.recipients import load_identity, load_recipient
from cryptlayer.keys.sources import Credential, Secret, read_passphrase

FAST_MS = 50  # Argon2id calibrated to ~50 ms: real parameters, quick tests


def secret(data: bytes) -> Secret:
    return Secret(bytearray(data))


def image_key_bytes(image_key: Secret) -> bytes:
    with image_key.view() as data:
        return bytes(data)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An X25519 and an RSA key pair, made by `cryptlayer keygen`."""
    base = tmp_path_factory.mktemp("pairs")
    made = {}
    for kind in ("x25519", "rsa"):
        code, _, err = invoke("keygen", f"--{kind}", str(base / kind))
        assert code == 0, err
        assert f"{kind}:SHA256:" in err
        made[kind] = base / kind
    return made


def test_keygen_pairs_are_private_and_never_overwritten(pairs: dict[str, Path]) -> None:
    for kind, path in pairs.items():
        assert path.stat().st_mode & 0o777 == 0o600
        assert b"BEGIN PRIVATE KEY" in path.read_bytes()
        assert b"BEGIN PUBLIC KEY" in Path(f"{path}.pub").read_bytes()
        assert load_recipient(f"{path}.pub").id == load_identity(str(path)).id
        code, _, err = invoke("keygen", f"--{kind}", str(path))
        assert code == ExitCode.USAGE
        assert err == (
            f"error: {path} already exists: choose another name; keygen never overwrites\n"
        )


def test_every_kind_of_entry_opens_and_nothing_else_does(
    tmp_path: Path, pairs: dict[str, Path]
) -> None:
    key, other_key = secret(b"k" * 32), secret(b"o" * 32)
    phrase = secret(b"correct horse battery staple")
    with envelope.new_image_key() as image_key:
        expected = image_key_bytes(image_key)
        entries = envelope.Principals(
            keys=[key],
            passphrases=[phrase],
            recipients=[load_recipient(f"{p}.pub") for p in pairs.values()],
            iter_time_ms=FAST_MS,
        ).wrap(image_key)
    assert [e.kind for e in entries] == ["key", "passphrase", "x25519", "rsa"]
    envelope.save(tmp_path, entries, "")
    stored = envelope.load(tmp_path).entries
    assert stored == entries
    text = (tmp_path / envelope.FILE).read_text()
    assert expected.hex() not in text and "correct horse" not in text

    openers = [
        Credential(key=key),
        Credential(passphrase=phrase),
        *(Credential(identity=load_identity(str(p))) for p in pairs.values()),
    ]
    for credential in openers:
        with envelope.unlock(tmp_path, stored, credential) as got:
            assert image_key_bytes(got) == expected

    hint = f"`cryptlayer inspect {tmp_path}` lists the keys and recipients that can"
    with pytest.raises(WrongKeyError) as err:
        envelope.unlock(tmp_path, stored, Credential(key=other_key))
    assert str(err.value) == f"the key does not open this image: {hint}"
    with pytest.raises(WrongKeyError) as err:
        envelope.unlock(tmp_path, stored, Credential(passphrase=secret(b"Tr0ub4dor&3")))
    assert str(err.value) == f"the passphrase does not open this image: {hint}"


def test_a_stranger_identity_is_named(tmp_path: Path) -> None:
    assert invoke("keygen", "--x25519", str(tmp_path / "a"))[0] == 0
    assert invoke("keygen", "--x25519", str(tmp_path / "b"))[0] == 0
    with envelope.new_image_key() as image_key:
        entries = [envelope.for_recipient(image_key, load_recipient(f"{tmp_path}/a.pub"))]
    stranger = load_identity(str(tmp_path / "b"))
    with pytest.raises(WrongKeyError) as err:
        envelope.unlock(tmp_path, entries, Credential(identity=stranger))
    assert str(err.value) == (
        f"identity {tmp_path}/b ({stranger.id}) is not a recipient of this image:"
        f" `cryptlayer inspect {tmp_path}` lists who can open it"
    )


def test_tampered_wrap_does_not_open(tmp_path: Path, pairs: dict[str, Path]) -> None:
    key = secret(b"k" * 32)
    with envelope.new_image_key() as image_key:
        entries = envelope.Principals(
            keys=[key], recipients=[load_recipient(f"{pairs['x25519']}.pub")]
        ).wrap(image_key)
    flipped = [
        envelope.Entry(
            e.kind,
            e.id,
            e.wrapped[:8] + ("A" if e.wrapped[8] != "A" else "B") + e.wrapped[9:],
            e.params,
        )
        for e in entries
    ]
    for credential in (
        Credential(key=key),
        Credential(identity=load_identity(str(pairs["x25519"]))),
    ):
        with pytest.raises(WrongKeyError):
            envelope.unlock(tmp_path, flipped, credential)


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("{", "is not valid JSON"),
        ('{"format": "x", "entries": []}', "is malformed: format is 'x'"),
        (
            '{"format": "cryptlayer.keys.v1", "entries": [{"id": "a"}]}',
            "is malformed: missing 'type'",
        ),
    ],
)
def test_malformed_keys_json(tmp_path: Path, content: str, detail: str) -> None:
    (tmp_path / envelope.FILE).write_text(content)
    with pytest.raises(UsageError, match=detail):
        envelope.load(tmp_path)


def test_argon2id_is_calibrated_to_the_time_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real probe gives at least the minimums; the scaling is checked against a machine whose
    # cost is known (100 ns per KiB and pass), not against this shared CPU's load of the moment.
    quick = envelope.calibrate(FAST_MS)
    assert quick[0] >= envelope.MIN_ITERATIONS and quick[1] >= envelope.MIN_MEMORY_KIB
    monkeypatch.setattr(envelope, "_probe", lambda iterations, kib: iterations * kib * 1e-7)
    monkeypatch.setattr(envelope, "available_memory_kib", lambda: 64 << 20)
    for ms in (FAST_MS, 40 * FAST_MS, 2000):
        iterations, kib = envelope.calibrate(ms)
        assert 0.5 <= iterations * kib * 1e-7 / (ms / 1000) <= 1.01, (ms, iterations, kib)
        assert envelope.MIN_MEMORY_KIB <= kib <= envelope.MAX_MEMORY_KIB


def test_recipient_and_identity_file_errors(tmp_path: Path, pairs: dict[str, Path]) -> None:
    x = pairs["x25519"]
    with pytest.raises(UsageError) as err:
        load_recipient(str(x))
    assert str(err.value) == (
        f"recipient {x} is not a PEM public key or an ssh-rsa line:"
        " that is a private key; give its .pub"
    )
    with pytest.raises(UsageError) as err:
        load_identity(f"{x}.pub")
    assert str(err.value).startswith(f"identity {x}.pub is accessible by others (mode 0644)")
    shared = tmp_path / "shared"
    shared.write_bytes(x.read_bytes())
    shared.chmod(0o640)
    with pytest.raises(UsageError, match=r"accessible by others \(mode 0640\): chmod 600"):
        load_identity(str(shared))
    with pytest.raises(UsageError, match="does not exist"):
        load_recipient(str(tmp_path / "nope.pub"))


def test_openssh_rsa_keys_work(tmp_path: Path) -> None:
    """An existing ssh key pair can be a recipient and an identity."""
    key = tmp_path / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-f", str(key)],
                   check=True)  # fmt: skip
    assert load_recipient(f"{key}.pub").id == load_identity(str(key)).id
    protected = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "pw", "-f", str(protected)],
                   check=True)  # fmt: skip
    with pytest.raises(UsageError, match="is protected by a password"):
        load_identity(str(protected))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ed")],
                   check=True)  # fmt: skip
    with pytest.raises(UsageError, match="not an X25519 or RSA key"):
        load_recipient(f"{tmp_path}/ed.pub")


def test_passphrase_from_a_pipe_is_its_first_line(monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    os.write(write, b"first line\nsecond\n")
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        monkeypatch.setattr(sys, "stdin", stream)
        with read_passphrase("unused", confirm=True) as got, got.view() as data:
            assert bytes(data) == b"first line"
        with read_passphrase("unused", confirm=True) as got, got.view() as data:
            assert bytes(data) == b"second"
        with pytest.raises(UsageError, match="the passphrase is empty"):
            read_passphrase("unused", confirm=False)


PROMPT_CHILD = """
import sys
from cryptlayer.keys.sources import read_passphrase
from cryptlayer.errors import UsageError
try:
    with read_passphrase("Passphrase: ", confirm=True) as p, p.view() as d:
        print("LEN", len(d), flush=True)
except UsageError as err:
    print("ERR", err, flush=True)
"""


def test_passphrase_prompt_on_a_terminal_does_not_echo() -> None:
    _, out = in_pty([sys.executable, "-c", PROMPT_CHILD], ["s3cret-typed", "s3cret-typed"])
    assert "Passphrase:" in out and "Verify passphrase:" in out
    assert "LEN 12" in out
    assert "s3cret" not in out
    _, out = in_pty([sys.executable, "-c", PROMPT_CHILD], ["one-thing", "another"])
    assert "ERR the passphrases do not match: try again" in out
    assert "one-thing" not in out and "another" not in out


def test_exactly_one_way_to_open(tmp_path: Path) -> None:
    for args in ([], ["--key-file", "a", "--identity", "b"], ["--passphrase", "--keyring", "x"]):
        code, _, err = invoke("start", "--name", "c", str(tmp_path), *args)
        assert code == ExitCode.USAGE, err
        assert err.startswith(
            "error: give exactly one of --key-file, --key-command, --keyring, --passphrase"
            " and --identity: e.g. --key-file image.key"
        )


def test_build_needs_someone_who_can_open(tmp_path: Path) -> None:
    code, _, err = invoke("build", "-o", str(tmp_path / "img"), str(tmp_path))
    assert code == ExitCode.USAGE
    assert err == (
        "error: nobody could open the image: give --key-file, --key-command, --keyring,"
        " --passphrase or --recipient\n"
    )


def _passphrase_entry(i: int, iterations: int, memory_kib: int) -> envelope.Entry:
    import base64

    params = (("iterations", iterations), ("kdf", "argon2id"), ("lanes", envelope.LANES),
              ("memory_kib", memory_kib), ("salt", base64.b64encode(bytes(16)).decode()))  # fmt: skip
    wrapped = base64.b64encode(bytes(40)).decode()
    return envelope.Entry(envelope.EntryKind.PASSPHRASE, f"passphrase:{i}", wrapped, params)


def test_one_argon2id_budget_across_all_passphrase_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight entries at 64 iterations over 1 GiB each (512 GiB of memory passes, minutes of
    work) are each within bounds but not together: refused before any Argon2id runs. No
    timing: the derivation is replaced by one that counts its calls."""
    gib = 1024 * 1024
    monkeypatch.setattr(envelope, "available_memory_kib", lambda: 8 * gib)  # any host
    runs: list[tuple[int, int]] = []

    def counted(_phrase: Secret, _salt: bytes, iterations: int, memory: int) -> Secret:
        runs.append((iterations, memory))
        return secret(bytes(32))

    monkeypatch.setattr(envelope, "_passphrase_kek", counted)
    guess = Credential(passphrase=secret(b"guess"))
    hostile = [_passphrase_entry(i, 64, gib) for i in range(8)]
    with pytest.raises(UsageError) as err:
        envelope.unlock(tmp_path, hostile, guess)
    assert str(err.value) == (
        f"{tmp_path}/keys.json asks for 512 GiB of Argon2id memory passes in all (8 passphrase"
        " entries), more than the 64 GiB cryptlayer spends on trying a passphrase: the image"
        " is damaged or hostile; rebuild it"
    )
    assert runs == []
    # within the budget in all, every entry is tried
    fair = [_passphrase_entry(i, 16, gib) for i in range(4)]
    with pytest.raises(WrongKeyError):
        envelope.unlock(tmp_path, fair, guess)
    assert runs == [(16, gib)] * 4


def test_keys_json_is_never_written_beyond_the_budget(tmp_path: Path) -> None:
    """rekey --passphrase must not make an image no passphrase can open."""
    gib = 1024 * 1024
    entries = [_passphrase_entry(i, 32, gib) for i in range(3)]
    with pytest.raises(UsageError) as err:
        envelope.save(tmp_path, entries, "")
    assert str(err.value) == (
        f"{tmp_path}/keys.json would ask for 96 GiB of Argon2id memory passes in all (3"
        " passphrase entries), more than the 64 GiB cryptlayer spends on trying a passphrase:"
        " remove a passphrase first (rekey --remove), or add it with a smaller --iter-time"
    )
    assert not (tmp_path / "keys.json").exists()
    envelope.save(tmp_path, entries[:2], "")
    assert len(envelope.load(tmp_path).entries) == 2


def test_keys_json_errors_read_as_text(tmp_path: Path) -> None:
    """Names and values in messages as a person writes them, not as Python prints a list."""
    import json

    entry = {"type": "passphrase", "id": "p", "wrapped": "AAAA", "kdf": ["pbkdf2"]}
    for doc, detail in (
        ({"format": envelope.FORMAT, "entries": [entry], "zz": 1, "aa": 2},
         "it has unknown fields aa, zz"),
        ({"format": envelope.FORMAT, "entries": [entry]},
         "entry 0's kdf [\"pbkdf2\"] is not argon2id"),
    ):  # fmt: skip
        (tmp_path / "keys.json").write_text(json.dumps(doc))
        with pytest.raises(UsageError) as err:
            envelope.load(tmp_path)
        assert err.value.message == f"{tmp_path}/keys.json is malformed: {detail}"


@pytest.mark.parametrize(("kind", "other"), [("x25519", "rsa"), ("rsa", "x25519"),
                                             ("x25519", "key"), ("rsa", "passphrase")])  # fmt: skip
def test_an_entry_of_another_kind_under_the_identitys_id(
    tmp_path: Path, pairs: dict[str, Path], kind: str, other: str
) -> None:
    """A hostile keys.json files an entry of another kind under the identity's id: that entry
    does not open the image (WrongKeyError), never an AttributeError or TypeError from the
    library ("unexpected ...", exit 1)."""
    import base64

    identity = load_identity(str(pairs[kind]))
    salt = base64.b64encode(b"s" * 16).decode()
    argon2 = (("iterations", 4), ("kdf", "argon2id"), ("lanes", 4), ("memory_kib", 8192))
    params: tuple[tuple[str, str | int], ...] = {
        "key": (("salt", salt),),
        "passphrase": (*argon2, ("salt", salt)),
    }.get(other, ())
    entry = envelope.Entry(envelope.EntryKind(other), identity.id,
                           base64.b64encode(b"x" * 40).decode(), params)  # fmt: skip
    with pytest.raises(WrongKeyError):
        envelope.unlock(tmp_path, [entry], Credential(identity=identity))


def _keys(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": envelope.FORMAT, "entries": entries}


KEY_ENTRY = {"type": "key", "id": "key:1", "wrapped": base64.b64encode(bytes(40)).decode(),
             "salt": base64.b64encode(bytes(16)).decode()}  # fmt: skip


PASS_ENTRY = {"type": "passphrase", "id": "passphrase:1", "kdf": "argon2id", "lanes": 4,
              "iterations": 4, "memory_kib": 8192, "salt": base64.b64encode(bytes(16)).decode(),
              "wrapped": base64.b64encode(bytes(40)).decode()}  # fmt: skip


KEYS_CASES = [
    [], "x", [1], [{**KEY_ENTRY, "type": "evil"}], [{**KEY_ENTRY, "wrapped": "%%%"}],
    [{**KEY_ENTRY, "salt": "not base64!"}], [{**KEY_ENTRY, "salt": 5}], [{**KEY_ENTRY, "id": 1}],
    [{k: v for k, v in KEY_ENTRY.items() if k != "salt"}], [{**PASS_ENTRY, "iterations": "4"}],
    [{**PASS_ENTRY, "memory_kib": None}], [{**PASS_ENTRY, "kdf": "pbkdf2"}],
    [{**PASS_ENTRY, "lanes": True}], [KEY_ENTRY] * 300,
]  # fmt: skip


@pytest.mark.parametrize("entries", KEYS_CASES, ids=[f"keys-{i}" for i in range(len(KEYS_CASES))])
def test_every_keys_field_malformed_is_a_usage_error(tmp_path: Path, entries: Any) -> None:
    (tmp_path / "keys.json").write_text(json.dumps(_keys(entries)))
    with pytest.raises(UsageError, match=r"keys\.json is malformed"):
        envelope.load(tmp_path)


@pytest.mark.parametrize(
    "cost",
    [{"memory_kib": 4 << 20}, {"iterations": 1000, "memory_kib": 1 << 20},
     {"iterations": 0}, {"lanes": 64}, {"memory_kib": 1}],
)  # fmt: skip
def test_argon2id_cost_is_bounded_before_any_work(tmp_path: Path, cost: dict[str, int]) -> None:
    """keys.json may not demand 4 GiB x 1000 iterations (measured: it would run for hours)."""
    (tmp_path / "keys.json").write_text(json.dumps(_keys([{**PASS_ENTRY, **cost}])))
    entries = envelope.load(tmp_path).entries
    credential = Credential(passphrase=Secret(bytearray(b"guess")))
    with pytest.raises(UsageError, match="asks for an Argon2id cost out of bounds"):
        envelope.unlock(tmp_path, entries, credential)


def test_number_of_passphrase_entries_tried_is_bounded(tmp_path: Path) -> None:
    many = [{**PASS_ENTRY, "id": f"passphrase:{i}"} for i in range(20)]
    (tmp_path / "keys.json").write_text(json.dumps(_keys(many)))
    credential = Credential(passphrase=Secret(bytearray(b"guess")))
    with pytest.raises(UsageError, match="has 20 passphrase entries, more than 8"):
        envelope.unlock(tmp_path, envelope.load(tmp_path).entries, credential)


def test_calibration_stays_within_the_bounds_it_enforces() -> None:
    iterations, memory = envelope.calibrate(50)
    assert iterations * memory <= envelope.MAX_WORK_KIB
    assert iterations <= envelope.MAX_ITERATIONS
