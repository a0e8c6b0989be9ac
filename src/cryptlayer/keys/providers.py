"""ocicrypt key providers: the image key wrapped and unwrapped by a program or a gRPC service.

ocicrypt (1.1 and later; skopeo, podman, buildah, containerd's imgcrypt, Confidential
Containers' attestation agent) defines the protocol, and a provider written for it works here
unchanged (github.com/containers/ocicrypt: config/keyprovider-config/config.go,
keywrap/keyprovider/keyprovider.go, utils/keyprovider/keyprovider.proto):

- The providers are listed in the JSON file named by $OCICRYPT_KEYPROVIDER_CONFIG:
  `{"key-providers": {NAME: {"cmd": {"path": P, "args": [...]}} | {"grpc": "host:port"}}}`.
- A request is the JSON `{"op": "keywrap" | "keyunwrap", "keywrapparams": {"ec": ..., "optsdata":
  B64}, "keyunwrapparams": {"dc": ..., "annotation": B64}}`; the answer is `{"keywrapresults":
  {"annotation": B64}, "keyunwrapresults": {"optsdata": B64}}`. Byte fields are standard base64
  (Go's encoding of []byte); ec and dc are ocicrypt's EncryptConfig and DecryptConfig, whose
  `Parameters` map the provider's NAME to the PARAMS of `provider:NAME[:PARAMS]` ("Enabled" when
  none were given).
- `cmd`: the program gets the request on its standard input and writes the answer on its
  standard output. `grpc`: `keyprovider.KeyProviderService/WrapKey` and `/UnWrapKey`, whose
  messages hold the request or answer JSON in their one bytes field (number 1).

What cryptlayer gives the provider to wrap (`optsdata`) is the 32-byte image key; what the
provider answers (`annotation`) is opaque to us and stored in keys.json (kind "provider", id
`provider:NAME`), with a 64-bit check of the image key, so that a provider that answers a wrong
key is told apart from a damaged image. The key goes to a `cmd` provider only through a pipe:
never on its argv, in its environment or in a file.

The operator's: the config file and a `cmd` provider's program must belong to root or to the
user running cryptlayer and be writable by no one else (as config.py holds /etc/cryptlayer/
config.toml), since cryptlayer runs them as root with the image key; a program's path must be
absolute (no $PATH search), and it is run through the descriptor it was checked by. A provider
gets DEFAULT_TIMEOUT seconds to answer; the operator may set another per provider with
`"cryptlayer-timeout": SECONDS` in the same file (ocicrypt ignores fields it does not know).
ocicrypt's `grpc-tls` is followed (root-ca-file, else the system's CAs; cert-file and key-file;
server-name) except `insecure-skip-verify`, which is refused; plain
gRPC should be reached over loopback or a unix socket (`unix:/path`) only: the image key crosses
that connection.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import selectors
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptlayer.errors import CryptlayerError, UsageError, printable
from cryptlayer.secret import Secret

ENV = "OCICRYPT_KEYPROVIDER_CONFIG"
PREFIX = "provider:"
ANNOTATION = "org.opencontainers.image.enc.keys.provider."  # + NAME, on an ocicrypt layer
SERVICE = "keyprovider.KeyProviderService"
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 3600.0
MAX_CONFIG = 1024 * 1024
MAX_ANSWER = 1024 * 1024  # an answer larger than this is not a key provider's
MAX_STDERR = 4096
MAX_LAYER_PARTS = 256  # wrapped keys in one layer annotation (ocicrypt: one per recipient)
ENABLED = b"Enabled"  # ocicrypt's parameter when `provider:NAME` gives none


class ProviderError(CryptlayerError):
    """A key provider failed, hung or answered something that is not ocicrypt's protocol."""


@dataclass(frozen=True)
class GrpcTls:
    """ocicrypt's `grpc-tls`: the CAs to verify the service with (None: the system's), a client
    certificate and key, the name to verify instead of the address's."""

    root_ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class Provider:
    """One entry of the key provider config: a program (`cmd`) or a gRPC address."""

    name: str
    path: str | None = None
    args: tuple[str, ...] = ()
    grpc: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    tls: GrpcTls | None = None

    @property
    def shown(self) -> str:
        how = f"cmd {self.path}" if self.path is not None else f"grpc {self.grpc}"
        return f"key provider {printable(self.name)} ({printable(how)})"


@dataclass(frozen=True)
class ProviderRecipient:
    """`provider:NAME[:PARAMS]` given to build --recipient or rekey --add-recipient."""

    name: str
    params: bytes = ENABLED
    kind: str = "provider"

    @property
    def id(self) -> str:
        return PREFIX + self.name


@dataclass(frozen=True)
class ProviderIdentity:
    """`provider:NAME[:PARAMS]` given to --identity: the provider unwraps the image key."""

    name: str
    params: bytes = ENABLED
    kind: str = "provider"

    @property
    def id(self) -> str:
        return PREFIX + self.name

    @property
    def path(self) -> str:  # what the user gave, as an identity file's path is shown
        return PREFIX + self.name


def is_provider(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _split(spec: str, what: str) -> tuple[str, bytes]:
    """(NAME, PARAMS) of `provider:NAME[:PARAMS]`, as ocicrypt splits it."""
    rest = spec[len(PREFIX) :]
    name, colon, params = rest.partition(":")
    if not name or not name.isprintable() or any(c in name for c in "/\\ ") or len(name) > 200:
        raise UsageError(
            f"{what} {printable(spec)} names no key provider",
            "write provider:NAME or provider:NAME:PARAMS, NAME from $" + ENV,
        )
    return name, params.encode() if colon else ENABLED


def recipient(spec: str) -> ProviderRecipient:
    """A provider recipient; UsageError unless the provider is configured."""
    name, params = _split(spec, "recipient")
    find(name)
    return ProviderRecipient(name, params)


def identity(spec: str) -> ProviderIdentity:
    """A provider identity; UsageError unless the provider is configured."""
    name, params = _split(spec, "identity")
    find(name)
    return ProviderIdentity(name, params)


def _owned_by_operator(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _who() -> str:
    return "root's" if os.geteuid() == 0 else f"root's or uid {os.geteuid()}'s"


def config_path() -> Path:
    value = os.environ.get(ENV, "")
    if not value:
        hint = f"set {ENV} to ocicrypt's key provider config file (docs/keys.md)"
        if os.environ.get("SUDO_USER"):
            hint += f"; sudo resets the environment: sudo {ENV}=FILE cryptlayer ..."
        raise UsageError(f"no key providers: ${ENV} is not set", hint)
    return Path(value)


def load_config() -> dict[str, Provider]:
    """The providers of $OCICRYPT_KEYPROVIDER_CONFIG; UsageError saying what is wrong."""
    path = config_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise UsageError(
            f"cannot read the key provider config {printable(str(path))} (${ENV}): {err.strerror}",
            "give ocicrypt's key provider config file (a regular file, not a symlink)",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _owned_by_operator(st):
            raise UsageError(
                f"the key provider config {printable(str(path))} is not {_who()} own regular"
                f" file, writable by no one else (owner uid {st.st_uid},"
                f" mode {stat.S_IMODE(st.st_mode):04o})",
                f"its programs get the image key: chown root {path}; chmod go-w {path}",
            )
        data = os.read(fd, MAX_CONFIG + 1)
    finally:
        os.close(fd)
    where = f"the key provider config {printable(str(path))}"
    try:
        if len(data) > MAX_CONFIG:
            raise ValueError(f"it is larger than {MAX_CONFIG} bytes")
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("key-providers"), dict):
            raise ValueError('it has no "key-providers" object')
        return {name: _provider(name, attrs) for name, attrs in doc["key-providers"].items()}
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(
            f"{where} is malformed: {err}",
            '{"key-providers": {"NAME": {"cmd": {"path": "/abs/path", "args": []}}}}'
            ' or {"NAME": {"grpc": "127.0.0.1:50000"}}',
        ) from None


def _provider(name: str, attrs: Any) -> Provider:
    shown = f"provider {printable(name)}"
    if not isinstance(attrs, dict):
        raise ValueError(f"{shown} is not an object")
    timeout = attrs.get("cryptlayer-timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise ValueError(f"{shown}'s cryptlayer-timeout is not a number of seconds")
    if not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"{shown}'s cryptlayer-timeout is not between 0 and {MAX_TIMEOUT:g}")
    cmd, grpc = attrs.get("cmd"), attrs.get("grpc")
    if cmd is not None:  # ocicrypt takes cmd first when both are given
        if not isinstance(cmd, dict):
            raise ValueError(f"{shown}'s cmd is not an object")
        path, args = cmd.get("path", ""), cmd.get("args") or []
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ValueError(f"{shown}'s cmd path is not an absolute path")
        if not isinstance(args, list) or not all(
            isinstance(a, str) and "\0" not in a for a in args
        ):
            raise ValueError(f"{shown}'s cmd args is not a list of strings")
        return Provider(name, path=path, args=tuple(args), timeout=float(timeout))
    if isinstance(grpc, str) and grpc and "\0" not in grpc:
        tls = _grpc_tls(shown, attrs.get("grpc-tls"))
        return Provider(name, grpc=grpc, timeout=float(timeout), tls=tls)
    raise ValueError(f"{shown} has neither cmd nor grpc")


TLS_FIELDS = ("root-ca-file", "cert-file", "key-file", "server-name", "insecure-skip-verify")


def _grpc_tls(shown: str, value: Any) -> GrpcTls | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{shown}'s grpc-tls is not an object")
    unknown = sorted(set(value) - set(TLS_FIELDS))
    if unknown:
        raise ValueError(f"{shown}'s grpc-tls has unknown fields {printable(', '.join(unknown))}")
    if value.get("insecure-skip-verify"):
        raise ValueError(
            f"{shown}'s grpc-tls asks for insecure-skip-verify, which cryptlayer refuses: the"
            " image key would go to whoever answers"
        )
    fields: dict[str, str | None] = {}
    for name in TLS_FIELDS[:4]:
        item = value.get(name) or None
        if item is not None and (not isinstance(item, str) or "\0" in item):
            raise ValueError(f"{shown}'s grpc-tls {name} is not a string")
        if item is not None and name != "server-name" and not item.startswith("/"):
            raise ValueError(f"{shown}'s grpc-tls {name} is not an absolute path")
        fields[name] = item
    if (fields["cert-file"] is None) != (fields["key-file"] is None):
        raise ValueError(f"{shown}'s grpc-tls gives one of cert-file and key-file, not both")
    return GrpcTls(
        fields["root-ca-file"], fields["cert-file"], fields["key-file"], fields["server-name"]
    )


def find(name: str) -> Provider:
    """The configured provider NAME; UsageError (naming it) when there is none."""
    providers = load_config()
    if name not in providers:
        known = ", ".join(printable(n) for n in sorted(providers)) or "none"
        raise UsageError(
            f"unknown key provider {printable(name)} (configured in {config_path()}: {known})",
            f"add it to ${ENV}'s file, or give a configured one",
        )
    return providers[name]


def _b64(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(data).decode()


def _params(name: str, params: bytes) -> dict[str, Any]:
    """ocicrypt's DecryptConfig (and EncryptConfig's Parameters) for one provider."""
    return {"Parameters": {name: [_b64(params)]}}


def wrap_request(name: str, params: bytes, optsdata: bytes | bytearray | memoryview) -> bytearray:
    """The keywrap request, as ocicrypt's WrapKeys marshals it (Go's field order)."""
    ec = {**_params(name, params), "DecryptConfig": {"Parameters": None}}
    doc = {
        "op": "keywrap",
        "keywrapparams": {"ec": ec, "optsdata": _b64(optsdata)},
        "keyunwrapparams": {"dc": None, "annotation": None},
    }
    return bytearray(json.dumps(doc, separators=(",", ":")).encode())


def unwrap_request(name: str, params: bytes, annotation: bytes) -> bytearray:
    """The keyunwrap request, as ocicrypt's UnwrapKey marshals it."""
    doc = {
        "op": "keyunwrap",
        "keywrapparams": {"ec": None, "optsdata": None},
        "keyunwrapparams": {"dc": _params(name, params), "annotation": _b64(annotation)},
    }
    return bytearray(json.dumps(doc, separators=(",", ":")).encode())


def _field(obj: Any, name: str) -> Any:
    """obj[name], matched as Go's encoding/json matches: exactly, else ignoring case."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    for key, value in obj.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


def parse_answer(provider: Provider, answer: bytes | bytearray, results: str, name: str) -> bytes:
    """The base64 field `results`.`name` of a provider's answer; ProviderError if it has none."""
    try:
        doc = json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        raise ProviderError(
            f"{provider.shown} answered something that is not JSON",
            "is it an ocicrypt key provider? run it by hand to see",
        ) from None
    value = _field(_field(doc, results), name)
    if not isinstance(value, str) or not value:
        raise ProviderError(
            f"{provider.shown} answered no {results}.{name}",
            "is it an ocicrypt key provider, and does it hold this key?",
        )
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ProviderError(
            f"{provider.shown} answered a {results}.{name} that is not base64",
            "is it an ocicrypt key provider? run it by hand to see",
        ) from None


def call(provider: Provider, request: bytearray, operation: str) -> bytearray:
    """The provider's answer to `request` (wiped here once sent); ProviderError when it fails,
    takes longer than its timeout or answers more than MAX_ANSWER bytes."""
    try:
        if provider.path is not None:
            return _run_cmd(provider, request)
        return _call_grpc(provider, request, operation)
    finally:
        request[:] = bytes(len(request))


def _run_cmd(provider: Provider, request: bytearray) -> bytearray:
    assert provider.path is not None
    try:  # the file checked is the file run: executed through this descriptor, not the path
        fd = os.open(provider.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as err:
        raise ProviderError(f"{provider.shown}: cannot run it: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _owned_by_operator(st):
            raise UsageError(
                f"{provider.shown}: the program is not {_who()} own regular file, writable by"
                f" no one else (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
                f"it gets the image key: chown root {provider.path}; chmod go-w {provider.path}",
            )
        try:
            proc = subprocess.Popen(  # the operator's program, argv without a shell
                [provider.path, *provider.args],
                executable=f"/proc/self/fd/{fd}",  # (a script's interpreter reopens it there)
                pass_fds=(fd,),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
                start_new_session=True,  # so that a hung provider's children go with it
            )
        except OSError as err:
            raise ProviderError(f"{provider.shown}: cannot run it: {err.strerror}") from None
    finally:
        os.close(fd)
    answer, stderr = bytearray(), bytearray()
    try:
        outcome = _exchange(proc, request, answer, stderr, provider.timeout)
    except BaseException:
        _kill(proc)
        answer[:] = bytes(len(answer))
        raise
    if outcome != "done":
        _kill(proc)
        answer[:] = bytes(len(answer))
        if outcome == "overflow":
            raise ProviderError(f"{provider.shown} answered more than {MAX_ANSWER} bytes")
        raise ProviderError(
            f"{provider.shown} did not answer within {provider.timeout:g} s",
            'is its service up? the operator may raise "cryptlayer-timeout" in $' + ENV,
        )
    try:  # it closed its output; it may not linger past its deadline either
        code = proc.wait(timeout=provider.timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        answer[:] = bytes(len(answer))
        raise ProviderError(
            f"{provider.shown} did not exit within {provider.timeout:g} s",
            'is its service up? the operator may raise "cryptlayer-timeout" in $' + ENV,
        ) from None
    if code != 0:
        answer[:] = bytes(len(answer))
        said = _redacted(bytes(stderr), request).decode(errors="replace")
        last = said.strip().splitlines()[-1:] or ["no message"]
        status = f"signal {-code}" if code < 0 else f"status {code}"
        raise ProviderError(
            f"{provider.shown} failed (exit {status}): {printable(last[0][:300])}",
            "see the provider's own logs; is this key its to unwrap?",
        )
    return answer


def _redacted(text: bytes, request: bytearray) -> bytes:
    """`text` (what a provider said) without the base64 key that `request` carries, should the
    provider repeat its input in a message; also the start of the key that ends `text` where
    MAX_STDERR cut it."""
    marker = b'"optsdata":"'
    start = request.find(marker) + len(marker)
    end = request.find(b'"', start)
    if start < len(marker) or end <= start:
        return text
    key = bytes(request[start:end])
    text = text.replace(key, b"<redacted>")
    for n in range(len(key) - 1, 3, -1):
        if text.endswith(key[:n]):
            return text[:-n] + b"<redacted>"
    return text


def _exchange(
    proc: subprocess.Popen[bytes],
    request: bytearray,
    answer: bytearray,
    stderr: bytearray,
    timeout: float,
) -> str:
    """Write `request` to the program's stdin and read its stdout and stderr until both end:
    "done", or "timeout" when the deadline passed first, "overflow" when it answered more than
    MAX_ANSWER bytes (stderr beyond MAX_STDERR is read and dropped)."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    sent = 0
    with selectors.DefaultSelector() as sel, memoryview(request) as view:
        if request:
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, answer)
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, stderr)
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                for key, _ in sel.select(left):
                    if key.fd == stdin_fd:
                        try:
                            sent += os.write(stdin_fd, view[sent:])
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # it answers without reading all: its choice
                            sent = len(request)
                        if sent >= len(request):
                            sel.unregister(stdin_fd)
                            proc.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                    elif key.data is answer:
                        answer += chunk
                        if len(answer) > MAX_ANSWER:
                            return "overflow"
                    else:
                        stderr += chunk[: max(0, MAX_STDERR - len(stderr))]
        finally:
            if not proc.stdin.closed:
                proc.stdin.close()
    return "done"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def encode_message(data: bytes | bytearray) -> bytes:
    """keyProviderKeyWrapProtocolInput/Output: field 1, bytes (protobuf wire format)."""
    out = bytearray(b"\x0a")
    n = len(data)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out + data)


def decode_message(data: bytes) -> bytearray:
    """Field 1 of a protobuf message (the last one, as protobuf merges); other fields skipped;
    ValueError when it is not protobuf."""
    pos, found = 0, bytearray()

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            varint()
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length = varint()
            if pos + length > len(data):
                raise ValueError("truncated field")
            if number == 1:
                found = bytearray(data[pos : pos + length])
            pos += length
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data) or number == 0:
            raise ValueError("malformed message")
    return found


def _call_grpc(provider: Provider, request: bytearray, operation: str) -> bytearray:
    import grpc

    method = "WrapKey" if operation == "keywrap" else "UnWrapKey"
    options: list[tuple[str, str | int]] = [
        ("grpc.enable_http_proxy", 0),  # the key goes to the provider, not through a proxy
        ("grpc.max_receive_message_length", MAX_ANSWER + 64),
    ]
    assert provider.grpc is not None
    if provider.tls is None:
        channel = grpc.insecure_channel(provider.grpc, options=options)
    else:
        tls = provider.tls
        if tls.server_name is not None:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        credentials = grpc.ssl_channel_credentials(
            _tls_file(provider, "root-ca-file", tls.root_ca_file),
            _tls_file(provider, "key-file", tls.key_file),
            _tls_file(provider, "cert-file", tls.cert_file),
        )
        channel = grpc.secure_channel(provider.grpc, credentials, options=options)
    with channel:
        stub = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=encode_message,
            response_deserializer=_decode_response,
        )
        try:
            answer: bytearray = stub(request, timeout=provider.timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            detail = err.details() if hasattr(err, "details") else str(err)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ProviderError(
                    f"{provider.shown} did not answer within {provider.timeout:g} s",
                    'is its service up? the operator may raise "cryptlayer-timeout" in $' + ENV,
                ) from None
            name = code.name if code is not None else "error"
            said = _redacted(str(detail).encode(), request).decode(errors="replace")
            raise ProviderError(
                f"{provider.shown} failed: {name}: {printable(said[:300])}",
                "is the provider's service up and listening there?",
            ) from None
    return answer


def _tls_file(provider: Provider, what: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read(MAX_CONFIG)
    except OSError as err:
        raise UsageError(
            f"{provider.shown}: cannot read its grpc-tls {what} {printable(path)}: {err.strerror}",
            f"fix ${ENV}'s file",
        ) from None


def _decode_response(data: bytes) -> bytearray:
    try:
        return decode_message(data)
    except ValueError:
        return bytearray(b"\0not protobuf")  # parse_answer says: not JSON


def wrap(who: ProviderRecipient, image_key: Secret) -> bytes:
    """The provider's annotation for the image key (ocicrypt's keywrap)."""
    provider = find(who.name)
    with image_key.view() as data:
        request = wrap_request(who.name, who.params, data)
    answer = call(provider, request, "keywrap")
    try:
        return parse_answer(provider, answer, "keywrapresults", "annotation")
    finally:
        answer[:] = bytes(len(answer))


def unwrap(who: ProviderIdentity, annotation: bytes) -> Secret:
    """The optsdata the provider unwraps from `annotation` (ocicrypt's keyunwrap)."""
    provider = find(who.name)
    answer = call(provider, unwrap_request(who.name, who.params, annotation), "keyunwrap")
    try:
        return Secret(bytearray(parse_answer(provider, answer, "keyunwrapresults", "optsdata")))
    finally:
        answer[:] = bytes(len(answer))


def unwrap_layer_annotation(who: ProviderIdentity, value: str) -> Secret:
    """An ocicrypt layer's `org.opencontainers.image.enc.keys.provider.NAME` annotation (base64
    annotations, comma-separated, as ocicrypt's preWrapKeys joins them) unwrapped to the
    layer's optsdata (its PrivateLayerBlockCipherOptions JSON): the first that the provider
    unwraps, as ocicrypt's preUnwrapKey tries them; ProviderError with the last failure."""
    parts = value.split(",")
    if len(parts) > MAX_LAYER_PARTS:  # each one a call to the provider; an image is anyone's
        raise UsageError(
            f"the layer's {ANNOTATION}{printable(who.name)} annotation has {len(parts)} wrapped"
            f" keys, more than {MAX_LAYER_PARTS}",
            "the image is damaged or hostile",
        )
    failure: ProviderError | None = None
    for part in parts:
        try:
            annotation = base64.b64decode(part, validate=True)
        except binascii.Error:
            raise UsageError(
                f"the layer's {ANNOTATION}{printable(who.name)} annotation is not base64",
                "the image is damaged",
            ) from None
        try:
            return unwrap(who, annotation)
        except ProviderError as err:
            failure = err
    assert failure is not None
    raise failure
