"""Ranged reads of a blob (distribution/blobrange.py) against registries that misbehave on
purpose (issue 25, part 14): each a small http.server (registryfixtures.hostile) that answers
closed ranges only, redirects to a second server standing for object storage, expires its
presigned URLs, renews tokens, stalls, or answers ranges wrongly."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from registryfixtures import hostile, reply

from cryptlayer.distribution import blobrange
from cryptlayer.distribution.blobrange import BlobRanges
from cryptlayer.distribution.registry import Registry, parse_reference
from cryptlayer.distribution.wire import RegistryError
from cryptlayer.errors import UsageError

DATA = os.urandom(3 * (1 << 20) + 123)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
BLOB_PATH = f"/v2/lazy/app/blobs/{DIGEST}"
CLOSED = re.compile(r"bytes=([0-9]+)-([0-9]+)")


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


class Log:
    """What a server was sent: (path, Range, Authorization) of each request."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str | None, str | None]] = []
        self.lock = threading.Lock()

    def add(self, request: Any) -> None:
        with self.lock:
            self.entries.append((request.path, request.headers.get("Range"),
                                 request.headers.get("Authorization")))  # fmt: skip

    def paths(self, prefix: str) -> int:
        return sum(1 for path, _, _ in self.entries if path.startswith(prefix))


def send_range(request: Any, data: bytes = DATA) -> None:
    """A range as registries answer it: 206, Content-Range, no Accept-Ranges; an open-ended or
    malformed range is refused (as some registries do)."""
    m = CLOSED.fullmatch(request.headers.get("Range", ""))
    if not m or int(m[2]) >= len(data) or int(m[1]) > int(m[2]):
        reply(request, 416, b"closed ranges only")
        return
    a, b = int(m[1]), int(m[2])
    reply(request, 206, data[a : b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}"})


def registry_for(host: str, login: tuple[str, str] | None = None) -> Registry:
    registry = Registry(parse_reference(f"docker://{host}/lazy/app:v1"), tls_verify=False,
                        login=login)  # fmt: skip
    registry.conn.scheme = "http"  # as after the manifest's fetch, which comes first
    return registry


def simple_registry(log: Log) -> Callable[[Any], None]:
    def handle(request: Any) -> None:
        log.add(request)
        if request.path == BLOB_PATH:
            send_range(request)
        else:
            reply(request, 404)

    return handle


def test_ranged_reads_return_exact_bytes_and_ranges_are_closed() -> None:
    log = Log()
    with hostile(simple_registry(log)) as server:
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA))
        for offset, length in [(0, 1), (1, 4097), (1 << 20, 1 << 20), (len(DATA) - 1, 1),
                               (len(DATA) - 5000, 5000), (0, len(DATA))]:  # fmt: skip
            assert ranges.read(offset, length) == DATA[offset : offset + length]
    sent = [r for _, r, _ in log.entries]
    assert len(sent) == 6
    assert all(r is not None and CLOSED.fullmatch(r) for r in sent), sent
    assert f"bytes={len(DATA) - 1}-{len(DATA) - 1}" in sent  # the last byte: closed too


def test_over_tls_with_a_dripping_registry_too(tmp_path: Path) -> None:
    """HTTPS (the sockets the deadline shuts down are TLS ones there), reads that work, and a
    body dripped a byte at a time cut at the deadline. Failed before: an SSLSocket cannot be
    dup()ed, so every HTTPS read raised NotImplementedError."""
    drip = [False]

    def handle(request: Any) -> None:
        if drip[0]:
            dripping_body(request)
        else:
            send_range(request)

    with hostile(handle, tls=tmp_path / "tls") as server:
        registry = Registry(parse_reference(f"docker://{server.host}/lazy/app:v1"),
                            cert_dir=server.cert_dir)  # fmt: skip
        ranges = BlobRanges(registry, DIGEST, len(DATA), attempt_deadline=1.0, attempts=1)
        assert ranges.read(10, 20) == DATA[10:30]
        assert ranges.read(1 << 20, 1 << 20) == DATA[1 << 20 : 2 << 20]
        drip[0] = True
        with pytest.raises(RegistryError, match="no complete answer within 1 s"):
            ranges.read(0, 100)


def test_a_read_past_the_blob_is_refused_unsent() -> None:
    log = Log()
    with hostile(simple_registry(log)) as server:
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA))
        with pytest.raises(ValueError):
            ranges.read(len(DATA) - 1, 2)
    assert log.entries == []


def basic_registry(log: Log, cdn: list[str], expect: str) -> Callable[[Any], None]:
    """A registry that wants Basic auth and redirects blob GETs to cdn[0] (object storage)."""

    def handle(request: Any) -> None:
        log.add(request)
        if request.headers.get("Authorization") != expect:
            reply(request, 401, b"", {"WWW-Authenticate": 'Basic realm="r"'})
        elif request.path == BLOB_PATH:
            reply(request, 307, b"", {"Location": cdn[0]})
        else:
            reply(request, 404)

    return handle


def test_a_redirect_to_another_host_never_carries_the_registrys_authorization() -> None:
    log, cdn_log, cdn = Log(), Log(), [""]
    expect = "Basic " + base64.b64encode(b"bob:hunter2").decode()

    def storage(request: Any) -> None:
        cdn_log.add(request)
        send_range(request)

    with hostile(basic_registry(log, cdn, expect)) as server, hostile(storage) as other:
        cdn[0] = f"http://{other.host}/bucket/blob?X-Amz-Signature=abc"
        ranges = BlobRanges(registry_for(server.host, ("bob", "hunter2")), DIGEST, len(DATA))
        assert ranges.read(5, 1000) == DATA[5:1005]
        assert ranges.read(2 << 20, 4096) == DATA[2 << 20 : (2 << 20) + 4096]
    assert cdn_log.entries and all(auth is None for _, _, auth in cdn_log.entries)
    assert any(auth == expect for _, _, auth in log.entries)  # the registry got them
    # The presigned URL was kept: the second read went to object storage directly.
    assert log.paths(BLOB_PATH) == 2  # the 401, then the authenticated redirect
    assert cdn_log.paths("/bucket/blob") == 2


def test_object_storage_that_challenges_gets_no_credentials() -> None:
    """A 401 from the host the registry redirected to is not the registry's: its challenge is
    not answered (the registry is asked again, once, then the read fails naming that host)."""
    log, cdn_log, cdn = Log(), Log(), [""]
    expect = "Basic " + base64.b64encode(b"bob:hunter2").decode()

    def storage(request: Any) -> None:
        cdn_log.add(request)
        reply(request, 401, b"", {"WWW-Authenticate": 'Basic realm="give me yours"'})

    with hostile(basic_registry(log, cdn, expect)) as server, hostile(storage) as other:
        cdn[0] = f"http://{other.host}/bucket/blob"
        ranges = BlobRanges(registry_for(server.host, ("bob", "hunter2")), DIGEST, len(DATA))
        with pytest.raises(RegistryError, match=f"{other.host}, where registry .* refused"):
            ranges.read(0, 10)
    assert len(cdn_log.entries) == 2
    assert all(auth is None for _, _, auth in cdn_log.entries)


def test_an_expired_presigned_url_is_resolved_again() -> None:
    """Object storage refuses a URL once it expired (403, as S3 and CloudFront): the registry is
    asked again and the new URL used; failed before the re-resolution (HTTP 403)."""
    log, cdn_log = Log(), Log()
    valid = [1]
    issued = [0]
    host: list[str] = [""]

    def registry(request: Any) -> None:
        log.add(request)
        issued[0] += 1
        reply(request, 307, b"", {"Location": f"http://{host[0]}/b?sig={issued[0]}"})

    def storage(request: Any) -> None:
        cdn_log.add(request)
        if request.path != f"/b?sig={valid[0]}":
            reply(request, 403, b"<Error><Code>AccessDenied</Code>Request has expired</Error>")
        else:
            send_range(request)

    with hostile(registry) as server, hostile(storage) as other:
        host[0] = other.host
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA))
        assert ranges.read(0, 10) == DATA[:10]
        valid[0] = 2  # the first URL expired; the registry's next one is good
        assert ranges.read(100, 10) == DATA[100:110]
        assert len(log.entries) == 2
        valid[0] = 99  # expired, and the registry's next one is refused too: an error
        with pytest.raises(RegistryError, match="refused access"):
            ranges.read(200, 10)


def test_an_old_presigned_url_is_resolved_again_before_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log, cdn_log = Log(), Log()
    host: list[str] = [""]

    def registry(request: Any) -> None:
        log.add(request)
        reply(request, 307, b"", {"Location": f"http://{host[0]}/b"})

    def storage(request: Any) -> None:
        cdn_log.add(request)
        send_range(request)

    with hostile(registry) as server, hostile(storage) as other:
        host[0] = other.host
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA))
        ranges.read(0, 10)
        ranges.read(0, 10)
        assert len(log.entries) == 1
        monkeypatch.setattr(blobrange, "LOCATION_TTL", 0.0)
        ranges.read(0, 10)
        assert len(log.entries) == 2


def test_a_401_renews_the_bearer_token() -> None:
    log = Log()
    current = ["t1"]
    tokens = [0]
    host: list[str] = [""]

    def handle(request: Any) -> None:
        log.add(request)
        if request.path.startswith("/token"):
            tokens[0] += 1
            reply(request, 200, b'{"token": "%s"}' % current[0].encode())
        elif request.headers.get("Authorization") != f"Bearer {current[0]}":
            challenge = f'Bearer realm="http://{host[0]}/token",service="s"'
            reply(request, 401, b"", {"WWW-Authenticate": challenge})
        else:
            send_range(request)

    with hostile(handle) as server:
        host[0] = server.host
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA))
        assert ranges.read(0, 100) == DATA[:100]
        assert tokens[0] == 1
        current[0] = "t2"  # the token expired
        assert ranges.read(100, 100) == DATA[100:200]
        assert tokens[0] == 2
        assert ranges.read(200, 100) == DATA[200:300]
        assert tokens[0] == 2


def test_a_registry_that_refuses_the_renewed_token_is_an_access_error() -> None:
    def handle(request: Any) -> None:
        reply(request, 401, b"", {"WWW-Authenticate": 'Basic realm="r"'})

    with hostile(handle) as server:
        ranges = BlobRanges(registry_for(server.host, ("bob", "wrong")), DIGEST, len(DATA))
        with pytest.raises(UsageError, match="refused access"):
            ranges.read(0, 10)


def dripping_body(request: Any) -> None:
    """Headers, then a byte every 0.2 s, forever: each read gets a byte before any timeout."""
    request.send_response(206)
    request.send_header("Content-Range", f"bytes 0-99/{len(DATA)}")
    request.send_header("Content-Length", "100")
    request.end_headers()
    while True:
        request.wfile.write(b"x")
        request.wfile.flush()
        time.sleep(0.2)


def dripping_headers(request: Any) -> None:
    """The status line, then a header byte every 0.2 s, forever."""
    request.wfile.write(b"HTTP/1.1 206 Partial Content\r\n")
    while True:
        request.wfile.write(b"X")
        request.wfile.flush()
        time.sleep(0.2)


def silent(request: Any) -> None:
    time.sleep(30)


@pytest.mark.parametrize("stall", [dripping_body, dripping_headers, silent])
def test_a_stalled_registry_is_an_error_within_the_deadline(stall: Any) -> None:
    """Read from a thread other than the main one (the NBD server's): SIGALRM cannot reach it,
    and a server that drips a byte at a time never lets a per-read timeout fire."""
    outcome: list[BaseException | bytes] = []
    with hostile(stall) as server:
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA), attempt_deadline=1.0,
                            attempts=2)  # fmt: skip

        def read() -> None:
            try:
                outcome.append(ranges.read(0, 100))
            except BaseException as err:
                outcome.append(err)

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=60)  # a bound for the test, not a measurement: the deadline is 2 s
        assert not reader.is_alive(), "the read hung"
    assert len(outcome) == 1 and isinstance(outcome[0], RegistryError), outcome
    assert "no complete answer within 1 s" in str(outcome[0])


def raw(request: Any, status: int, headers: dict[str, str], body: bytes) -> None:
    """An answer exactly as given (no Content-Length unless given: the body ends at the close)."""
    request.send_response(status)
    for name, value in headers.items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(body)


WRONG = {
    "whole blob (200)": lambda r: raw(r, 200, {"Content-Length": str(len(DATA))}, DATA),
    "shorter body": lambda r: raw(r, 206, {"Content-Range": f"bytes 0-99/{len(DATA)}",
                                          "Content-Length": "90"}, DATA[:90]),
    "shorter, unannounced": lambda r: raw(r, 206, {"Content-Range": f"bytes 0-99/{len(DATA)}"},
                                          DATA[:90]),
    "longer body": lambda r: raw(r, 206, {"Content-Range": f"bytes 0-99/{len(DATA)}",
                                         "Content-Length": "110"}, DATA[:110]),
    "longer, unannounced": lambda r: raw(r, 206, {"Content-Range": f"bytes 0-99/{len(DATA)}"},
                                         DATA[:110]),
    "lying length": lambda r: raw(r, 206, {"Content-Range": f"bytes 0-99/{len(DATA)}",
                                          "Content-Length": "100"}, DATA[:50]),
    "another range": lambda r: raw(r, 206, {"Content-Range": f"bytes 1-100/{len(DATA)}",
                                           "Content-Length": "100"}, DATA[1:101]),
    "another size": lambda r: raw(r, 206, {"Content-Range": "bytes 0-99/5000",
                                          "Content-Length": "100"}, DATA[:100]),
    "no content-range": lambda r: raw(r, 206, {"Content-Length": "100"}, DATA[:100]),
    "gzip": lambda r: raw(r, 206, {"Content-Range": f"bytes 0-99/{len(DATA)}",
                                  "Content-Encoding": "gzip", "Content-Length": "100"},
                          DATA[:100]),
}  # fmt: skip


@pytest.mark.parametrize("wrong", WRONG)
def test_a_range_answered_wrongly_is_refused(wrong: str) -> None:
    with hostile(WRONG[wrong]) as server:
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA), attempt_deadline=5.0,
                            attempts=2)  # fmt: skip
        with pytest.raises(RegistryError):
            ranges.read(0, 100)


def test_a_whole_blob_read_may_be_answered_with_200() -> None:
    small = b"0123456789"
    digest = "sha256:" + hashlib.sha256(small).hexdigest()
    with hostile(lambda r: reply(r, 200, small)) as server:
        assert BlobRanges(registry_for(server.host), digest, 10).read(0, 10) == small


def test_a_redirect_to_another_scheme_is_refused() -> None:
    with hostile(lambda r: reply(r, 307, b"", {"Location": "file:///etc/passwd"})) as server:
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA))
        with pytest.raises(RegistryError, match="only http and https"):
            ranges.read(0, 10)


def test_a_server_error_is_retried() -> None:
    calls = [0]

    def flaky(request: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            reply(request, 503, b"busy")
        else:
            send_range(request)

    with hostile(flaky) as server:
        registry = registry_for(server.host)
        # wire's own retries of a 503 are the session's; count ours alone
        ranges = BlobRanges(registry, DIGEST, len(DATA))
        for prefix in ("http://", "https://"):
            registry.conn.session.get_adapter(prefix).max_retries.total = 0
        assert ranges.read(7, 7) == DATA[7:14]
    assert calls[0] == 2


def test_reads_start_no_thread_each_and_read_the_environment_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-request costs figure 14 found on the read path (bench/lazyhost.py): a
    threading.Timer per attempt (a thread started per request) and requests' look-up of
    proxies and CA bundles in the environment per request. Failed before: 10 of each."""
    log = Log()
    starts: list[str] = []
    real_start = threading.Thread.start

    def counted_start(thread: threading.Thread) -> None:
        if "process_request" not in thread.name:  # (the test's server: a thread per request)
            starts.append(thread.name)
        real_start(thread)

    with hostile(simple_registry(log)) as server:
        registry = registry_for(server.host)
        merges = 0
        real_merge = registry.conn.session.merge_environment_settings

        def counted_merge(*args: Any) -> Any:
            nonlocal merges
            merges += 1
            return real_merge(*args)

        monkeypatch.setattr(registry.conn.session, "merge_environment_settings", counted_merge)
        ranges = BlobRanges(registry, DIGEST, len(DATA))
        ranges.read(0, 10)  # (the process's one deadline thread may start here)
        monkeypatch.setattr(threading.Thread, "start", counted_start)
        for n in range(10):
            assert ranges.read(n * 4096, 4096) == DATA[n * 4096 : n * 4096 + 4096]
    assert starts == []
    assert merges == 1


def test_a_proxy_in_the_environment_is_still_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment's settings are looked up once per origin, not dropped: a read of a
    registry behind HTTP_PROXY goes to the proxy, as pull's requests do."""
    log = Log()

    def proxy(request: Any) -> None:
        log.add(request)
        if request.path == f"http://registry.invalid:5000{BLOB_PATH}":
            send_range(request)
        else:
            reply(request, 404)

    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    with hostile(proxy) as server:
        monkeypatch.setenv("HTTP_PROXY", f"http://{server.host}")
        monkeypatch.setenv("http_proxy", f"http://{server.host}")
        ranges = BlobRanges(registry_for("registry.invalid:5000"), DIGEST, len(DATA))
        for n in range(3):
            assert ranges.read(n * 4096, 4096) == DATA[n * 4096 : n * 4096 + 4096]
    assert len(log.entries) == 3


def test_one_connection_is_kept_alive_across_reads(
    plain: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's registry (HTTP/1.1): every read, of any size, over the one kept-alive
    connection; each body read whole in one call and the connection handed back."""
    import urllib3.util.connection

    registry = Registry(parse_reference(f"docker://{plain.host}/lazy/alive:v1"),
                        tls_verify=False)  # fmt: skip
    registry.conn.scheme = "http"
    (tmp_path / "blob").write_bytes(DATA)
    with open(tmp_path / "blob", "rb") as f:
        registry.push_blob(f, DIGEST, len(DATA), lambda _: None)
    connects = 0
    real = urllib3.util.connection.create_connection

    def counted(*args: Any, **kw: Any) -> Any:
        nonlocal connects
        connects += 1
        return real(*args, **kw)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    ranges = BlobRanges(registry, DIGEST, len(DATA))
    for offset, length in [(0, 1), (5, 3 << 20), (1 << 20, 4096), (0, len(DATA)), (7, 7)] * 3:
        assert ranges.read(offset, length) == DATA[offset : offset + length]
    assert connects == 1
