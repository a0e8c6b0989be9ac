"""A real registry for the tests: Debian's docker-registry (CNCF distribution 2.8), started on
127.0.0.1 on a free port, plain HTTP or with htpasswd auth and TLS (a CA and a certificate made
here); and hostile(), a registry that is one function, for what a real one never sends (reply()
answers a request there; token_server() is one that records who sent it credentials)."""

from __future__ import annotations

import datetime
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER, PASSWORD = "alice", "correct horse"


@dataclass(frozen=True)
class RunningRegistry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    cert_dir: Path | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tls(base: Path) -> Path:
    """A CA (ca.crt in the returned directory, as --cert-dir wants it) and a server key pair."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cryptlayer test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    certs = base / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (base / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (base / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    return certs


@contextmanager
def registry(base: Path, *, secure: bool = False) -> Iterator[RunningRegistry]:
    base.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = ["version: 0.1", "log:", "  level: error", "storage:", "  filesystem:",
              f"    rootdirectory: {base / 'data'}", "  delete:", "    enabled: true",
              "http:", f"  addr: 127.0.0.1:{port}"]  # fmt: skip
    cert_dir = None
    if secure:
        import bcrypt

        cert_dir = _tls(base)
        config += [
            "  tls:",
            f"    certificate: {base / 'server.crt'}",
            f"    key: {base / 'server.key'}",
        ]
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
        (base / "htpasswd").write_text(f"{USER}:{hashed}\n")
        config += [
            "auth:",
            "  htpasswd:",
            "    realm: cryptlayer-test",
            f"    path: {base / 'htpasswd'}",
        ]
    (base / "config.yml").write_text("\n".join(config) + "\n")
    with open(base / "log", "wb") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(base / "config.yml")],
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError as err:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (base / "log").read_text()
                    raise RuntimeError(f"docker-registry did not start: {log_text}") from err
                time.sleep(0.05)
        yield RunningRegistry(f"127.0.0.1:{port}", base / "data", cert_dir)
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass(frozen=True)
class Hostile:
    host: str  # 127.0.0.1:PORT
    cert_dir: Path | None = None  # with tls: the self-signed certificate, as --cert-dir wants it


def self_signed(base: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made here, with cryptography): its directory for
    --cert-dir, the certificate, its key."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))  # fmt: skip
    certs = base / "certs"
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (base / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))  # fmt: skip
    return certs, certs / "ca.crt", base / "server.key"


@contextmanager
def hostile(handle: Callable[[Any], None], tls: Path | None = None) -> Iterator[Hostile]:
    """A registry (or token server, or CDN) that is one function: `handle(request)` answers every
    request (request.command, .path, .headers, .send_response, .wfile: http.server's). HTTP/1.0,
    each reply ends the connection. With `tls` (a directory), HTTPS with a self-signed
    certificate made there."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def answer(self) -> None:
            # the client may stop reading, as it should
            with suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                handle(self)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    cert_dir = None
    if tls is not None:
        cert_dir, cert, key = self_signed(tls)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)  # fmt: skip
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Hostile(f"127.0.0.1:{server.server_address[1]}", cert_dir)
    finally:
        server.shutdown()
        server.server_close()


def reply(request: Any, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
          length: int | None = None) -> None:  # fmt: skip
    """Answer a hostile() server's `request`: `status`, `headers`, `body` (Content-Length:
    `length` if given, whatever the body's)."""
    request.send_response(status)
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.send_header("Content-Length", str(len(body) if length is None else length))
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(body)


@contextmanager
def token_server() -> Iterator[tuple[Hostile, list[str | None]]]:
    """A token server (plain HTTP) that gives anyone the token "t", and the Authorization header
    of each request it got (None where there was none): the tests that no credentials may reach
    it expect the list empty."""
    sent: list[str | None] = []

    def handle(request: Any) -> None:
        sent.append(request.headers.get("Authorization"))
        reply(request, 200, b'{"token": "t"}')

    with hostile(handle) as server:
        yield server, sent
