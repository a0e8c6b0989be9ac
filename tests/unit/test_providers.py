"""keys/providers.py: ocicrypt key providers, `cmd` and `grpc`, against test providers written
from ocicrypt's definition (tests/providers/provider.py), through keys.json and the CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from copyfixtures import one_line
from luksfixtures import fake_image

from cryptlayer.errors import ExitCode, UsageError
from cryptlayer.image import envelope
from cryptlayer.keys import providers
from cryptlayer.keys.providers import ProviderError
from cryptlayer.keys.recipients import load_identity, load_recipient
from cryptlayer.keys.sources import Credential
from cryptlayer.secret import Secret

PROVIDER = Path(__file__).resolve().parents[1] / "providers" / "provider.py"
KEY = b"k" * 32  # fake_image's


def cmd(name: str, kek: Path, mode: str = "normal", log: Path | None = None) -> dict[str, Any]:
    args = [str(PROVIDER), "cmd", "--name", name, "--kek", str(kek), "--mode", mode]
    return {"cmd": {"path": sys.executable, "args": args + (["--log", str(log)] if log else [])}}


@pytest.fixture
def kek(tmp_path: Path) -> Path:
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    return path


def configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: dict[str, Any], mode: int = 0o600
) -> Path:
    path = tmp_path / "ocicrypt_keyprovider.conf"
    path.unlink(missing_ok=True)
    path.write_text(json.dumps({"key-providers": entries}))
    path.chmod(mode)
    monkeypatch.setenv(providers.ENV, str(path))
    return path


class GrpcProvider:
    def __init__(self, tmp: Path, kek: Path, mode: str, name: str = "grpcp") -> None:
        self.log = tmp / f"grpc-{mode}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(PROVIDER), "grpc", "--name", name, "--kek", str(kek),
             "--mode", mode, "--log", str(self.log)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def grpc_kek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grpc") / "kek"
    path.write_bytes(os.urandom(32))
    return path


@pytest.fixture(scope="module")
def grpc_servers(
    tmp_path_factory: pytest.TempPathFactory, grpc_kek: Path
) -> Iterator[dict[str, GrpcProvider]]:
    """The test provider as a gRPC service, one per mode, started for this file."""
    tmp = tmp_path_factory.mktemp("grpc-servers")
    servers = {m: GrpcProvider(tmp, grpc_kek, m) for m in ("normal", "fail", "hang", "garbage")}
    yield servers
    for server in servers.values():
        server.stop()


def key_bytes(secret: Secret) -> bytes:
    with secret.view() as data:
        return bytes(data)


def round_trip(recipient: str, identity: str) -> tuple[bytes, list[envelope.Entry], Secret]:
    image_key = envelope.new_image_key()
    with envelope.Principals(recipients=[load_recipient(recipient)]) as chosen:
        entries = chosen.wrap(image_key)
    with Credential(identity=load_identity(identity)) as credential:
        opened = envelope.unlock(Path("/img"), entries, credential)
    return key_bytes(image_key), entries, opened


def test_requests_are_ocicrypts_json() -> None:
    """Field names, nesting and encodings as ocicrypt's WrapKeys/UnwrapKey marshal them: Go's
    encoding/json of KeyProviderKeyWrapProtocolInput, []byte as standard base64, EncryptConfig
    and DecryptConfig without JSON tags (Parameters, DecryptConfig), nil as null."""
    wrap = json.loads(providers.wrap_request("kms", b"Enabled", b"\x00\xffkey"))
    assert wrap == {
        "op": "keywrap",
        "keywrapparams": {
            "ec": {"Parameters": {"kms": ["RW5hYmxlZA=="]}, "DecryptConfig": {"Parameters": None}},
            "optsdata": "AP9rZXk=",
        },
        "keyunwrapparams": {"dc": None, "annotation": None},
    }
    unwrap = json.loads(providers.unwrap_request("kms", b"a=b", b"opaque"))
    assert unwrap == {
        "op": "keyunwrap",
        "keywrapparams": {"ec": None, "optsdata": None},
        "keyunwrapparams": {"dc": {"Parameters": {"kms": ["YT1i"]}}, "annotation": "b3BhcXVl"},
    }


def test_protobuf_messages_are_the_protos_one_bytes_field() -> None:
    """keyProviderKeyWrapProtocolInput/Output: `bytes ... = 1`; lengths past 127 take a longer
    varint; unknown fields are skipped, as protobuf does."""
    for size in (0, 1, 127, 128, 300, 70000):
        payload = os.urandom(size)
        encoded = providers.encode_message(payload)
        assert encoded[0] == 0x0A
        assert bytes(providers.decode_message(encoded)) == payload
    assert providers.encode_message(b"x" * 300)[:3] == b"\x0a\xac\x02"
    assert bytes(providers.decode_message(b"\x10\x05" + providers.encode_message(b"hi"))) == b"hi"
    for bad in (b"\x0a\x05ab", b"\x0a", b"\x0f"):
        with pytest.raises(ValueError):
            providers.decode_message(bad)


def test_cmd_provider_wraps_and_unwraps_through_keys_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    log = tmp_path / "log"
    configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek, log=log)})
    raw, entries, opened = round_trip("provider:cmdp:tenant=a:b", "provider:cmdp")
    assert key_bytes(opened) == raw
    (entry,) = entries
    assert (entry.kind, entry.id) == ("provider", "provider:cmdp")
    annotation = json.loads(base64.b64decode(entry.wrapped))  # the provider's own, kept as is
    assert set(annotation) == {"kid", "wrapped_data", "iv", "wrap_type"}
    assert len(entry.param("check")) == 16
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["op"] for c in calls] == ["keywrap", "keyunwrap"]
    # PARAMS as ocicrypt passes them (all after NAME:), "Enabled" when none were given
    assert [c["params"] for c in calls] == [{"cmdp": ["tenant=a:b"]}, {"cmdp": ["Enabled"]}]
    # the key went on stdin (keywrap's optsdata) and nowhere else the provider can see
    assert json.loads(calls[0]["request"])["keywrapparams"]["optsdata"] == (
        base64.b64encode(raw).decode()
    )
    for call in calls:
        seen = json.dumps([call["argv"], call["env"]])
        for form in (raw.hex(), base64.b64encode(raw).decode(), raw.decode("latin-1")):
            assert form not in seen


def test_grpc_provider_wraps_and_unwraps_through_keys_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grpc_servers: dict[str, GrpcProvider]
) -> None:
    server = grpc_servers["normal"]
    configure(tmp_path, monkeypatch, {"grpcp": {"grpc": f"127.0.0.1:{server.port}"}})
    raw, entries, opened = round_trip("provider:grpcp", "provider:grpcp")
    assert key_bytes(opened) == raw
    assert entries[0].id == "provider:grpcp"
    ops = [json.loads(line)["op"] for line in server.log.read_text().splitlines()]
    assert ops[-2:] == ["keywrap", "keyunwrap"]


def test_rekey_adds_a_provider_recipient_that_then_opens_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    """The CLI end to end without device-mapper: rekey --add-recipient provider:NAME, inspect
    lists it, rekey --identity provider:NAME unwraps through it (the key check of cryptsetup is
    the VM tier's: the fake layer has no real keyslot)."""
    monkeypatch.setattr("cryptlayer.tools.cryptsetup.test_key", lambda *_: None)
    configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek)})
    image = fake_image(tmp_path / "img", key=KEY)
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_bytes(KEY)
    other.write_bytes(b"o" * 32)
    for path in (key, other):
        path.chmod(0o600)
    code, out, err = invoke("rekey", str(image), "-k", str(key), "--add-recipient", "provider:cmdp")
    assert code == 0, err
    assert "provider:cmdp" in out
    code, out, err = invoke("inspect", str(image))
    assert code == 0, err
    assert "provider:cmdp" in out
    code, out, err = invoke(
        "rekey", str(image), "--identity", "provider:cmdp", "--add-key", str(other)
    )
    assert code == 0, err
    kinds = [e["type"] for e in json.loads((image / "keys.json").read_text())["entries"]]
    assert sorted(kinds) == ["key", "key", "provider"]
    # a provider answering for another key: told apart from a damaged image, naming it
    configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek, mode="wrongkey")})
    code, _, err = invoke(
        "rekey", str(image), "--identity", "provider:cmdp", "--remove", str(other)
    )
    assert code == ExitCode.FAILURE
    assert one_line(err) == (
        "error: key provider cmdp answered a key that does not open this image: is it the"
        " provider (and are they the parameters) the image was built for?"
    )


def test_an_unknown_provider_or_none_configured_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    image = fake_image(tmp_path / "img", key=KEY)
    other = tmp_path / "other"
    other.write_bytes(b"o" * 32)
    other.chmod(0o600)
    monkeypatch.delenv(providers.ENV, raising=False)
    monkeypatch.delenv("SUDO_USER", raising=False)  # (under sudo the hint says more)
    code, _, err = invoke(
        "rekey", str(image), "--identity", "provider:kms", "--add-key", str(other)
    )
    assert code == ExitCode.USAGE
    assert one_line(err) == (
        f"error: no key providers: ${providers.ENV} is not set: set {providers.ENV} to"
        " ocicrypt's key provider config file (docs/keys.md)"
    )
    config = configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek)})
    code, _, err = invoke(
        "rekey", str(image), "--identity", "provider:kms", "--add-key", str(other)
    )
    assert code == ExitCode.USAGE
    assert one_line(err) == (
        f"error: unknown key provider kms (configured in {config}: cmdp): add it to"
        f" ${providers.ENV}'s file, or give a configured one"
    )
    code, _, err = invoke("rekey", str(image), "--identity", "provider:", "--add-key", str(other))
    assert code == ExitCode.USAGE
    assert "names no key provider" in one_line(err)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "failed (exit status 1): test provider: the KBS refused to release the key"
                 " (test)"),
        ("garbage", "answered something that is not JSON"),
        ("badb64", "answered a keyunwrapresults.optsdata that is not base64"),
        ("empty", "answered no keyunwrapresults.optsdata"),
        ("huge", f"answered more than {providers.MAX_ANSWER} bytes"),
    ],
)  # fmt: skip
def test_a_cmd_provider_that_misbehaves_is_named_in_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path, mode: str, message: str
) -> None:
    configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek)})
    image_key = envelope.new_image_key()
    with envelope.Principals(recipients=[load_recipient("provider:cmdp")]) as chosen:
        entries = chosen.wrap(image_key)
    configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek, mode=mode)})
    with (
        Credential(identity=load_identity("provider:cmdp")) as credential,
        pytest.raises(ProviderError) as caught,
    ):
        envelope.unlock(Path("/img"), entries, credential)
    assert caught.value.message == f"key provider cmdp (cmd {sys.executable}) {message}"
    assert caught.value.exit_code == ExitCode.FAILURE


def test_a_provider_that_fails_to_wrap_stops_the_rekey_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    image = fake_image(tmp_path / "img", key=KEY)
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    monkeypatch.setattr("cryptlayer.tools.cryptsetup.test_key", lambda *_: None)
    before = (image / "keys.json").read_bytes()
    configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek, mode="garbage")})
    code, _, err = invoke("rekey", str(image), "-k", str(key), "--add-recipient", "provider:cmdp")
    assert code == ExitCode.FAILURE
    assert one_line(err).startswith(
        f"error: key provider cmdp (cmd {sys.executable}) answered something that is not JSON"
    )
    assert (image / "keys.json").read_bytes() == before


@pytest.mark.parametrize("how", ["cmd", "grpc"])
def test_a_provider_repeating_the_key_in_its_message_is_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path, how: str
) -> None:
    server = None
    if how == "cmd":
        entry = cmd("p", kek, mode="echo")
    else:
        server = GrpcProvider(tmp_path, kek, "echo", name="p")
        entry = {"grpc": f"127.0.0.1:{server.port}"}
    try:
        configure(tmp_path, monkeypatch, {"p": entry})
        image_key = envelope.new_image_key()
        with pytest.raises(ProviderError) as caught:
            envelope.for_recipient(image_key, load_recipient("provider:p"))
    finally:
        if server is not None:
            server.stop()
    message = caught.value.message
    assert "test provider: cannot handle" in message
    assert '"optsdata":"<redacted>"' in message
    assert base64.b64encode(key_bytes(image_key)).decode() not in message


def test_a_hung_cmd_provider_is_killed_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    pidfile = tmp_path / "pid"
    script = tmp_path / "hang.sh"  # a provider whose child holds its stdout open, too
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nsleep 3600 &\nsleep 3600\n")
    script.chmod(0o700)
    entry = {"cmd": {"path": str(script)}, "cryptlayer-timeout": 0.5}
    configure(tmp_path, monkeypatch, {"slow": entry})
    with pytest.raises(ProviderError) as caught:
        providers.unwrap(load_identity("provider:slow"), b"x")  # type: ignore[arg-type]
    assert caught.value.message == f"key provider slow (cmd {script}) did not answer within 0.5 s"
    group = int(pidfile.read_text())  # the provider's session: its child is gone with it
    for _ in range(100):  # SIGKILL is delivered to its child a moment later
        alive = [pid for pid, state in processes_of(group) if state != "Z"]
        if not alive:
            break
        time.sleep(0.1)
    assert alive == []


def processes_of(group: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes in process group `group` (zombies included)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == group:
            found.append((int(entry.name), fields[0]))
    return found


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "failed: INTERNAL: test provider: the KBS refused to release the key (test)"),
        ("garbage", "answered something that is not JSON"),
        ("hang", "did not answer within 0.5 s"),
    ],
)
def test_a_grpc_provider_that_misbehaves_is_named_in_one_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    grpc_servers: dict[str, GrpcProvider],
    mode: str,
    message: str,
) -> None:
    address = f"127.0.0.1:{grpc_servers[mode].port}"
    configure(tmp_path, monkeypatch, {"grpcp": {"grpc": address, "cryptlayer-timeout": 0.5}})
    with pytest.raises(ProviderError) as caught:
        providers.unwrap(load_identity("provider:grpcp"), b"x")  # type: ignore[arg-type]
    assert caught.value.message == f"key provider grpcp (grpc {address}) {message}"


def test_a_grpc_provider_nobody_listens_for_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    configure(tmp_path, monkeypatch, {"gone": {"grpc": address, "cryptlayer-timeout": 5}})
    with pytest.raises(ProviderError) as caught:
        providers.unwrap(load_identity("provider:gone"), b"x")  # type: ignore[arg-type]
    assert caught.value.message.startswith(
        f"key provider gone (grpc {address}) failed: UNAVAILABLE"
    )


@pytest.mark.parametrize(
    ("entries", "mode", "message"),
    [
        ({"p": {"cmd": {"path": "provider"}}}, 0o600, "provider p's cmd path is not an absolute"
                                                      " path"),
        ({"p": {"grpc": "h:1", "grpc-tls": {"insecure-skip-verify": True}}}, 0o600,
         "provider p's grpc-tls asks for insecure-skip-verify, which cryptlayer refuses: the"
         " image key would go to whoever answers"),
        ({"p": {"grpc": "h:1", "grpc-tls": {"cert-file": "/c"}}}, 0o600,
         "provider p's grpc-tls gives one of cert-file and key-file, not both"),
        ({"p": {"grpc": "h:1", "grpc-tls": {"root-ca-file": "ca.pem"}}}, 0o600,
         "provider p's grpc-tls root-ca-file is not an absolute path"),
        ({"p": {}}, 0o600, "provider p has neither cmd nor grpc"),
        ({"p": {"grpc": "h:1", "cryptlayer-timeout": "1"}}, 0o600, "provider p's"
                                                                   " cryptlayer-timeout is not a"
                                                                   " number of seconds"),
        ({"p": {"grpc": "h:1", "cryptlayer-timeout": 0}}, 0o600, "provider p's"
                                                                 " cryptlayer-timeout is not"
                                                                 " between 0 and 3600"),
        ([], 0o600, 'it has no "key-providers" object'),
    ],
)  # fmt: skip
def test_a_bad_config_is_refused_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: Any, mode: int, message: str
) -> None:
    path = configure(tmp_path, monkeypatch, entries, mode)
    with pytest.raises(UsageError) as caught:
        load_identity("provider:p")
    assert caught.value.message == f"the key provider config {path} is malformed: {message}"


def test_the_config_and_the_program_must_be_the_operators(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    """Whoever can write either chooses what runs as root with the image key."""
    path = configure(tmp_path, monkeypatch, {"cmdp": cmd("cmdp", kek)}, mode=0o666)
    with pytest.raises(UsageError) as caught:
        load_identity("provider:cmdp")
    assert caught.value.message == (
        f"the key provider config {path} is not root's own regular file, writable by no one else"
        " (owner uid 0, mode 0666)"
    )
    os.chown(path, 65534, 65534)
    path.chmod(0o644)
    with pytest.raises(UsageError, match="owner uid 65534, mode 0644"):
        load_identity("provider:cmdp")
    program = tmp_path / "prog"
    program.write_text("#!/bin/sh\ncat\n")
    program.chmod(0o777)
    configure(tmp_path, monkeypatch, {"p": {"cmd": {"path": str(program)}}})
    image_key = envelope.new_image_key()
    with pytest.raises(UsageError) as caught:
        envelope.for_recipient(image_key, load_recipient("provider:p"))
    assert caught.value.message == (
        f"key provider p (cmd {program}): the program is not root's own regular file, writable"
        " by no one else (owner uid 0, mode 0777)"
    )


def test_keys_json_with_a_provider_entry_is_checked_when_read(tmp_path: Path) -> None:
    image = fake_image(tmp_path / "img", key=KEY)
    doc = json.loads((image / "keys.json").read_text())
    entry = {"type": "provider", "id": "provider:kms", "wrapped": "eA==", "check": "00" * 8}
    doc["entries"].append(entry)
    (image / "keys.json").write_text(json.dumps(doc))
    loaded = envelope.load(image)
    assert [e.kind for e in loaded.entries][-1] == "provider"
    for bad, why in (({"check": "xyz"}, "entry 1's check is not 16 hex digits"),
                     ({"check": None}, "entry 1's check is not 16 hex digits")):  # fmt: skip
        doc["entries"][-1] = {**entry, **bad}
        (image / "keys.json").write_text(json.dumps(doc))
        with pytest.raises(UsageError, match=why):
            envelope.load(image)
    del doc["entries"][-1]["check"]
    (image / "keys.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"entry 1 \(provider\) lacks check"):
        envelope.load(image)


def test_an_ocicrypt_layer_annotation_unwraps_through_the_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    """A layer as an ocicrypt with key providers writes it (encryption.go: preWrapKeys): under
    org.opencontainers.image.enc.keys.provider.NAME, each WrapKeys answer base64'd, joined with
    commas; the first one this provider cannot unwrap (another key's) is passed over, as
    preUnwrapKey does, and the second gives the layer's PrivateLayerBlockCipherOptions."""
    other = tmp_path / "other-kek"
    other.write_bytes(os.urandom(32))
    opts = json.dumps(
        {
            "symkey": base64.b64encode(os.urandom(32)).decode(),
            "cipheroptions": {"nonce": base64.b64encode(os.urandom(16)).decode()},
            "digest": "sha256:" + "ab" * 32,
        }
    ).encode()

    def wrapped_by(key: Path) -> str:
        """What ocicrypt's WrapKeys sends (an EncryptConfig with every recipient's Parameters)
        and keeps: the provider's annotation, base64'd."""
        request = {
            "op": "keywrap",
            "keywrapparams": {
                "ec": {"Parameters": {"kms": [base64.b64encode(b"Enabled").decode()],
                                      "pubkeys": [base64.b64encode(b"PEM").decode()]},
                       "DecryptConfig": {"Parameters": {}}},
                "optsdata": base64.b64encode(opts).decode(),
            },
            "keyunwrapparams": {"dc": None, "annotation": None},
        }  # fmt: skip
        answer = subprocess.run(
            [sys.executable, str(PROVIDER), "cmd", "--name", "kms", "--kek", str(key)],
            input=json.dumps(request).encode(), capture_output=True, check=True,
        ).stdout  # fmt: skip
        annotation = base64.b64decode(json.loads(answer)["keywrapresults"]["annotation"])
        return base64.b64encode(annotation).decode()

    annotations = {
        providers.ANNOTATION + "kms": wrapped_by(other) + "," + wrapped_by(kek),
        "org.opencontainers.image.enc.pubopts": base64.b64encode(b'{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"","compressed":false}').decode(),
    }  # fmt: skip
    configure(tmp_path, monkeypatch, {"kms": cmd("kms", kek)})
    who = load_identity("provider:kms")
    value = annotations[providers.ANNOTATION + "kms"]
    with providers.unwrap_layer_annotation(who, value) as optsdata:  # type: ignore[arg-type]
        assert key_bytes(optsdata) == opts
    configure(tmp_path, monkeypatch, {"kms": cmd("kms", other, mode="fail")})
    with pytest.raises(ProviderError, match="the KBS refused"):
        providers.unwrap_layer_annotation(who, value)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="annotation is not base64"):
        providers.unwrap_layer_annotation(who, "***")  # type: ignore[arg-type]


def make_pki(base: Path) -> dict[str, Path]:
    """A CA, a server certificate for provider.test and 127.0.0.1, a client certificate, and
    another CA that signed none of them (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    files: dict[str, Path] = {}

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(label: str, data: bytes) -> Path:
        files[label] = base / f"{label}.pem"
        files[label].write_bytes(data)
        return files[label]

    def cert(
        subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool, sans: list[Any]
    ) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def private(key: Any) -> bytes:
        return key.private_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    write("ca", cert("test CA", ca_key, "test CA", ca_key, True, []))
    write("other-ca", cert("other CA", other_key, "other CA", other_key, True, []))
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("provider.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", cert("provider.test", server_key, "test CA", ca_key, False, sans))
    write("server-key", private(server_key))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", cert("cryptlayer", client_key, "test CA", ca_key, False, []))
    write("client-key", private(client_key))
    return files


def test_grpc_tls_as_ocicrypt_configures_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    """grpc-tls: the service verified against root-ca-file under server-name, with a client
    certificate the service requires; a service the CA did not certify is not sent the key."""
    pki = make_pki(tmp_path)
    server = subprocess.Popen(
        [sys.executable, str(PROVIDER), "grpc", "--name", "tlsp", "--kek", str(kek),
         "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server-key"]),
         "--client-ca", str(pki["ca"]), "--log", str(tmp_path / "log")],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        tls = {"root-ca-file": str(pki["ca"]), "cert-file": str(pki["client"]),
               "key-file": str(pki["client-key"]), "server-name": "provider.test"}  # fmt: skip
        entry = {"grpc": f"localhost:{port}", "grpc-tls": tls, "cryptlayer-timeout": 10}
        configure(tmp_path, monkeypatch, {"tlsp": entry})
        raw, _, opened = round_trip("provider:tlsp", "provider:tlsp")
        assert key_bytes(opened) == raw
        ops = [json.loads(line)["op"] for line in (tmp_path / "log").read_text().splitlines()]
        assert ops == ["keywrap", "keyunwrap"]
        configure(tmp_path, monkeypatch, {"tlsp": {**entry,
                  "grpc-tls": {**tls, "root-ca-file": str(pki["other-ca"])}}})  # fmt: skip
        image_key = envelope.new_image_key()
        with pytest.raises(ProviderError) as caught:
            envelope.for_recipient(image_key, load_recipient("provider:tlsp"))
        assert caught.value.message.startswith(
            f"key provider tlsp (grpc localhost:{port}) failed: UNAVAILABLE"
        )
        assert len((tmp_path / "log").read_text().splitlines()) == 2  # nothing reached it
        configure(tmp_path, monkeypatch, {"tlsp": {**entry,
                  "grpc-tls": {**tls, "root-ca-file": str(tmp_path / "absent.pem")}}})  # fmt: skip
        with pytest.raises(UsageError, match="cannot read its grpc-tls root-ca-file"):
            envelope.for_recipient(image_key, load_recipient("provider:tlsp"))
    finally:
        server.kill()
        server.wait()


def test_a_key_cut_by_the_stderr_cap_is_redacted_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider that logs the key after 4 KB of chatter: what cryptlayer keeps of its stderr
    (the first MAX_STDERR bytes) ends inside the key, where the whole-key redaction does not
    see it. Failed before: 30 of the key's 44 base64 characters were in the error."""
    script = tmp_path / "chatty.py"
    script.write_text(
        "import json, sys\n"
        "key = json.load(sys.stdin)['keywrapparams']['optsdata']\n"
        f"sys.stderr.write('x' * {providers.MAX_STDERR - 40} + '\\nwrapping key ' + key)\n"
        "sys.exit(1)\n"
    )
    configure(
        tmp_path, monkeypatch, {"p": {"cmd": {"path": sys.executable, "args": [str(script)]}}}
    )
    image_key = envelope.new_image_key()
    with pytest.raises(ProviderError) as caught:
        envelope.for_recipient(image_key, load_recipient("provider:p"))
    message = caught.value.message
    assert "wrapping key <redacted>" in message
    assert base64.b64encode(key_bytes(image_key)).decode()[:12] not in message


def test_a_fifo_as_the_config_is_refused_not_waited_on(tmp_path: Path) -> None:
    """$OCICRYPT_KEYPROVIDER_CONFIG naming a FIFO: open() waited for a writer for ever (run in a
    child with a deadline so the test itself cannot hang). Failed before: the child hung."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    code = "from cryptlayer.keys import providers; providers.load_config()"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, providers.ENV: str(fifo)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "own regular file" in done.stderr and "mode 0600" in done.stderr


def test_the_program_checked_is_the_program_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The program was checked by path (os.stat) and then run by path: a user who can rename in
    its directory swaps in their own between the two and gets the image key on its stdin. The
    swap is made here at the last moment (as Popen is called). Failed before: the other user's
    program ran and kept the request."""
    stolen = tmp_path / "stolen"
    program = tmp_path / "bin" / "kp"
    program.parent.mkdir()
    program.write_text(
        '#!/bin/sh\ncat >/dev/null\necho \'{"keywrapresults": {"annotation": "QUJD"}}\'\n'
    )
    program.chmod(0o755)
    theirs = tmp_path / "bin" / "theirs"
    theirs.write_text(f"#!/bin/sh\ncat >{stolen}\nexit 1\n")
    theirs.chmod(0o755)
    os.chown(theirs, 65534, 65534)
    configure(tmp_path, monkeypatch, {"p": {"cmd": {"path": str(program)}}})
    real = subprocess.Popen

    def swap_then_popen(*args: Any, **kwargs: Any) -> Any:
        theirs.rename(program)
        return real(*args, **kwargs)

    monkeypatch.setattr(providers.subprocess, "Popen", swap_then_popen)
    image_key = envelope.new_image_key()
    entry = envelope.for_recipient(image_key, load_recipient("provider:p"))
    assert base64.b64decode(entry.wrapped) == b"ABC"
    assert not stolen.exists()


def test_no_config_under_sudo_says_that_sudo_dropped_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new user exports $OCICRYPT_KEYPROVIDER_CONFIG and runs `sudo cryptlayer run ...`:
    sudo's env_reset drops it, and 'set it' alone sends them in circles. Failed before: the
    hint did not say so."""
    monkeypatch.delenv(providers.ENV, raising=False)
    monkeypatch.setenv("SUDO_USER", "alice")
    with pytest.raises(UsageError) as caught:
        providers.config_path()
    assert f"sudo resets the environment: sudo {providers.ENV}=FILE cryptlayer ..." in str(
        caught.value
    )


def test_a_layer_annotation_with_thousands_of_parts_is_refused_before_any_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kek: Path
) -> None:
    """Each comma-separated part of an ocicrypt layer's provider annotation is a call to the
    provider (a process, up to its deadline each); an image is anyone's to write. Failed
    before: every part was sent to the provider."""
    log = tmp_path / "calls.log"
    configure(tmp_path, monkeypatch, {"kms": cmd("kms", kek, mode="fail", log=log)})
    who = load_identity("provider:kms")
    value = ",".join([base64.b64encode(b"junk").decode()] * 300)
    with pytest.raises(UsageError, match="has 300 wrapped keys, more than 256"):
        providers.unwrap_layer_annotation(who, value)  # type: ignore[arg-type]
    assert not log.exists() or not log.read_text()
