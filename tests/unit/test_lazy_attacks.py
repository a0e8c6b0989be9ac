"""Lazy start attacked (issue 25, part 14's review; docs/lazy.md, "Attacks checked"): a hostile
registry, object storage or network against blobrange.py's ranged reads, and a client that goes
away against nbdserver.py. Each attack is a small http.server (registryfixtures.hostile); the
ones that found a bug say so."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from registryfixtures import hostile, reply

from cryptlayer.distribution import nbdserver
from cryptlayer.distribution.blobrange import BlobRanges
from cryptlayer.distribution.registry import Registry, parse_reference
from cryptlayer.distribution.wire import RegistryError
from cryptlayer.errors import CryptlayerError, UsageError

DATA = os.urandom((1 << 20) + 4321)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
BLOB_PATH = f"/v2/lazy/app/blobs/{DIGEST}"
CLOSED = re.compile(r"bytes=([0-9]+)-([0-9]+)")
BASIC = "Basic " + base64.b64encode(b"bob:hunter2").decode()


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


class Seen:
    """The Authorization header of each request a server got, by path."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def add(self, request: Any) -> None:
        with self.lock:
            self.entries.append((request.path, request.headers.get("Authorization")))


def send_range(request: Any) -> None:
    m = CLOSED.fullmatch(request.headers.get("Range", ""))
    if not m:
        reply(request, 416)
        return
    a, b = int(m[1]), int(m[2])
    reply(request, 206, DATA[a : b + 1], {"Content-Range": f"bytes {a}-{b}/{len(DATA)}"})


def registry_for(host: str, login: tuple[str, str] | None = ("bob", "hunter2")) -> Registry:
    registry = Registry(parse_reference(f"docker://{host}/lazy/app:v1"), tls_verify=False,
                        login=login)  # fmt: skip
    registry.conn.scheme = "http"  # as after the manifest's fetch (and the server's ping)
    return registry


def redirecting(seen: Seen, where: list[str]) -> Callable[[Any], None]:
    """A registry that wants Basic auth, and redirects its blob to where[0] once given it."""

    def handle(request: Any) -> None:
        seen.add(request)
        if request.headers.get("Authorization") != BASIC:
            reply(request, 401, b"", {"WWW-Authenticate": 'Basic realm="r"'})
        elif request.path == BLOB_PATH:
            reply(request, 307, b"", {"Location": where[0]})
        else:
            send_range(request)

    return handle


def storage(seen: Seen, then: str | None = None) -> Callable[[Any], None]:
    """Object storage: the range, or (with `then`) a redirect onwards."""

    def handle(request: Any) -> None:
        seen.add(request)
        if then is not None and request.path.startswith("/bucket/"):
            reply(request, 302, b"", {"Location": then})
        else:
            send_range(request)

    return handle


@pytest.mark.parametrize("form", ["chain", "userinfo", "other name"])
def test_the_registry_s_credentials_reach_no_other_origin(form: str) -> None:
    """Held: a redirect chain registry -> storage -> a third origin, a Location carrying a user
    name and password of its own, and the registry's own port under another host name (the
    same socket, but another origin): no Authorization anywhere but the registry's origin."""
    seen, cdn_seen, third_seen, where = Seen(), Seen(), Seen(), [""]
    with (
        hostile(redirecting(seen, where)) as server,
        hostile(storage(third_seen)) as third,
        hostile(storage(cdn_seen, f"http://{third.host}/final/blob")) as cdn,
    ):
        port = server.host.rsplit(":", 1)[1]
        where[0] = {
            "chain": f"http://{cdn.host}/bucket/blob?X-Amz-Signature=s3cr3t",
            "userinfo": f"http://eve:pw@{third.host}/final/blob",
            "other name": f"http://localhost:{port}/v2/lazy/app/elsewhere",
        }[form]
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA))
        if form == "other name":  # the registry's socket, reached as another origin: it asks
            with pytest.raises(RegistryError, match="credentials are sent only to"):
                ranges.read(100, 5000)
        else:
            assert ranges.read(100, 5000) == DATA[100:5100]
            assert ranges.read(1 << 20, 4321) == DATA[1 << 20 :]
    assert all(auth is None for _, auth in cdn_seen.entries + third_seen.entries)
    if form == "other name":
        assert [auth for path, auth in seen.entries if "elsewhere" in path] == [None, None]
    assert any(auth == BASIC for _, auth in seen.entries)


def test_a_downgrade_or_another_port_is_another_origin() -> None:
    """Held: https -> http on the registry's own host and port, and its host on another port,
    are not the registry's origin (blobrange sends Authorization to own() origins only)."""
    registry = Registry(parse_reference("docker://reg.example:5000/lazy/app:v1"))
    conn = registry.conn
    assert conn.own("https://reg.example:5000/v2/x")
    assert conn.own("https://junk@REG.example:5000/v2/x")  # userinfo: the same place
    for url in ("http://reg.example:5000/v2/x", "https://reg.example:5001/v2/x",
                "https://reg.example/v2/x", "https://reg.example.evil:5000/v2/x",
                "https://reg.example:5000\\@evil/v2/x"):  # fmt: skip
        assert not conn.own(url), url


class Stuck:
    """An export whose reads wait until `release` is set (a registry that is down), counted."""

    size = 1 << 30

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.reads = 0
        self.lock = threading.Lock()

    def pread(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.reads += 1
        self.started.release()
        self.release.wait(60)
        return bytes(length)


def test_reads_queued_when_the_kernel_lets_go_are_dropped_not_fetched() -> None:
    """Fixed: the kernel queues up to 128 reads per device; when it lets go of the socket
    (detach, or its timeout) while the registry is down, the server used to work through every
    read still queued (each up to ATTEMPTS x ATTEMPT_DEADLINE against the registry) before its
    thread ended: a quarter of an hour of a detached device's fetches. Now only the reads
    already running finish."""
    export, gone = Stuck(), threading.Event()

    def log(text: str) -> None:
        if "closed the connection" in text:
            gone.set()

    ours, theirs = socket.socketpair()
    server = threading.Thread(target=nbdserver.serve, args=(theirs, export, "", log),
                              kwargs={"handshake": False}, daemon=True)  # fmt: skip
    server.start()
    for cookie in range(100):
        ours.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, cookie * 4096, 4096))
    for _ in range(nbdserver.WORKERS):  # every worker busy: the rest are queued
        assert export.started.acquire(timeout=30)
    ours.close()  # the kernel let go
    gone.wait(30)  # the server saw it (the old server never said so)
    export.release.set()
    server.join(timeout=60)
    assert not server.is_alive()
    assert gone.is_set()
    assert export.reads <= nbdserver.WORKERS + 1, export.reads


def test_reads_find_a_plain_http_registry_the_server_could_not_ping_at_its_start() -> None:
    """Fixed: under --tls-verify=false the server's first request (its ping) finds whether the
    registry speaks https or plain HTTP. When the registry was not reached then (restarting, a
    network blip), every later read went to https:// for the server's whole life: a plain-HTTP
    registry, back a second later, was 'speaks plain HTTP' (EIO) on every read. Now a read
    finds the scheme itself while it is not known."""
    seen = Seen()

    def handle(request: Any) -> None:
        seen.add(request)
        if request.path == BLOB_PATH:
            send_range(request)
        else:
            reply(request, 200, b"{}")

    with hostile(handle) as server:
        registry = Registry(parse_reference(f"docker://{server.host}/lazy/app:v1"),
                            tls_verify=False)  # fmt: skip
        assert registry.conn.scheme is None  # its ping failed: nothing known
        ranges = BlobRanges(registry, DIGEST, len(DATA), attempts=1)
        assert ranges.read(7, 100) == DATA[7:107]
        assert registry.conn.scheme == "http"
        assert ranges.read(1 << 20, 10) == DATA[1 << 20 : (1 << 20) + 10]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("storage_says", ["nothing", "418"])
def test_a_password_in_the_storage_url_stays_out_of_error_lines_and_the_log(
    storage_says: str,
) -> None:
    """Fixed: errors named the host they were about by the URL's netloc, which holds a user name
    and password given in a redirect's Location (object storage's credentials, as secret as a
    presigned URL's signature): they went to the error line and to the server's log."""
    where = [""]
    with (
        hostile(redirecting(Seen(), where)) as server,
        hostile(lambda r: reply(r, 418, b"teapot")) as cdn,
    ):
        port = _closed_port() if storage_says == "nothing" else int(cdn.host.split(":")[1])
        where[0] = f"http://eve:s3cr3t@127.0.0.1:{port}/bucket/blob"
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA), attempts=1)
        with pytest.raises(RegistryError) as caught:
            ranges.read(0, 10)
    text = f"{caught.value} {caught.value.hint or ''}"
    assert f"127.0.0.1:{port}" in text
    assert "s3cr3t" not in text and "eve" not in text


def test_a_huge_header_size_from_an_unsigned_statement_is_fetched_a_chunk_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Fixed: fetch reads each layer's header (the statement's `offset`, up to 1 GiB) before
    the trust check can have said anything about an unsigned image's numbers: it asked the
    cache for all of it in one read, held in memory whole (and copied), in the CLI running as
    root. Now a chunk at a time, written as it comes."""
    from cryptlayer.distribution import blockcache
    from cryptlayer.distribution import lazy as lazy_mod

    asked: list[int] = []

    class Recording(blockcache.CachedBlob):
        def pread(self, offset: int, length: int) -> bytes:
            asked.append(length)
            return super().pread(offset, length)

    monkeypatch.setattr(lazy_mod, "CachedBlob", Recording)
    with hostile(send_range) as server:
        store = lazy_mod._HeadersOnly(registry_for(server.host, None))
        store.layers[DIGEST] = len(DATA) - 1  # a header as large as the statement says
        out_path = tmp_path / "layer"
        with open(out_path, "w+b") as out:
            store.pull_blob(DIGEST, len(DATA), out, lambda _: None)
    assert out_path.read_bytes()[: len(DATA) - 1] == DATA[:-1]
    assert out_path.stat().st_size == len(DATA)
    assert asked and max(asked) <= blockcache.CHUNK, asked


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_chunk_that_is_not_a_file_is_fetched_again_never_waited_on(
    kind: str, tmp_path: Path
) -> None:
    """Fixed: a chunk's name in the cache holding a FIFO made the reader's open() wait for a
    writer forever (a read the kernel waits on, then its timeout, on every start); a symbolic
    link or a directory failed every read of that chunk (ELOOP, EISDIR) until someone removed
    it by hand. The cache is not trusted: now each is dropped and the chunk fetched again."""
    from cryptlayer.distribution.blockcache import BlockCache

    cache = BlockCache(tmp_path / "cache", 64 << 20)
    path = cache.path(DIGEST, 0)
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(bytes(100))
        path.symlink_to(tmp_path / "elsewhere")
    else:
        (path / "inside").mkdir(parents=True)
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(cache.get(DIGEST, 0, 100)), daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # the old open() of the FIFO: unblock it for the test to end
        with open(path, "wb"):
            pass
        reader.join(30)
        pytest.fail("the reader waited on a FIFO in the cache")
    assert got == [None]
    assert not os.path.lexists(path)
    cache.put(DIGEST, 0, DATA[:100])
    assert cache.get(DIGEST, 0, 100) == DATA[:100]
    assert (tmp_path / "elsewhere").read_bytes() == bytes(100) if kind == "symlink" else True


def test_a_neighbour_s_blockcache_is_refused(tmp_path: Path) -> None:
    """Held: in a $CRYPTLAYER_ROOT others may write (sticky, as /tmp), a neighbour (uid 65534)
    who made `blockcache` first (a directory of theirs, or a symbolic link to one) is refused,
    never written through."""
    from cryptlayer.distribution.blockcache import BlockCache

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = shared / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    cache = shared / "blockcache"
    for planted in ("dir", "link"):
        if planted == "dir":
            cache.mkdir(mode=0o700)
        else:
            cache.symlink_to(theirs)
        os.chown(cache, 65534, 65534, follow_symlinks=False)
        with pytest.raises(UsageError, match="not a private directory of ours"):
            BlockCache(cache, 64 << 20)
        cache.rmdir() if planted == "dir" else cache.unlink()
    assert os.listdir(theirs) == []


@pytest.mark.parametrize("parent", ["theirs", "writable"])
def test_a_blockcache_in_a_directory_a_neighbour_may_change_is_refused(
    parent: str, tmp_path: Path
) -> None:
    """Fixed: only `blockcache` itself was checked. In a $CRYPTLAYER_ROOT a neighbour owns, or
    may write without the sticky bit, they can rename our `blockcache` away after the check
    and put theirs (or a symlink) in its place: chunks written where they choose, and the
    eviction scan (root) removing the 'least recently used' files of `blockcache/sha256/*/`,
    which could then be any directory's. Now that parent must be ours or root's and not
    writable by others (or sticky)."""
    from cryptlayer.distribution.blockcache import BlockCache

    root = tmp_path / "state"
    root.mkdir()
    if parent == "theirs":
        os.chown(root, 65534, 65534)
    else:
        root.chmod(0o777)
    with pytest.raises(UsageError, match="others may change"):
        BlockCache(root / "blockcache", 64 << 20)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    BlockCache(sticky / "blockcache", 64 << 20)  # as /tmp: others cannot rename ours


def test_a_token_server_that_redirects_is_not_followed_and_401_forever_ends() -> None:
    """Held: the token request follows no redirect (the registry's credentials, sent to the
    token server, would go along), and a registry that answers 401 to every token is one
    renewal per read, then the access error."""
    third_seen, token_seen, reg_seen = Seen(), Seen(), Seen()
    with hostile(lambda r: (third_seen.add(r), reply(r, 200, b'{"token": "t"}'))) as third:

        def token(request: Any) -> None:
            token_seen.add(request)
            reply(request, 302, b"", {"Location": f"http://{third.host}/token"})

        with hostile(token) as tokens:

            def registry(request: Any) -> None:
                reg_seen.add(request)
                realm = f'Bearer realm="http://{tokens.host}/token",service="r"'
                reply(request, 401, b"", {"WWW-Authenticate": realm})

            with hostile(registry) as server:
                ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA), attempts=1)
                with pytest.raises(CryptlayerError, match=r"refused access") as caught:
                    ranges.read(0, 10)
    assert third_seen.entries == []
    assert len(token_seen.entries) == 1 and token_seen.entries[0][1] == BASIC
    assert "Traceback" not in str(caught.value)

    always = Seen()

    def refusing(request: Any) -> None:
        always.add(request)
        reply(request, 401, b"", {"WWW-Authenticate": 'Basic realm="r"'})

    with hostile(refusing) as server:
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA), attempts=3)
        with pytest.raises(UsageError, match="refused access"):
            ranges.read(0, 10)
    assert len(always.entries) == 2  # the first 401, then once with the credentials


LONG_LABEL = "http://" + "a" * 300 + ".example/x"  # parses, but no host name has a 300-byte label


@pytest.mark.parametrize("where", ["blob range", "manifest", "token realm"])
def test_an_address_that_cannot_be_connected_to_is_a_registry_error(where: str) -> None:
    """Fixed: a redirect (or a token realm) to a host name with a label over 63 bytes passed the
    URL checks and made urllib3 raise LocationParseError when connecting: 'error: unexpected
    LocationParseError ... report it' from pull and run, a bug report a hostile registry could
    cause at will. Now the registry's error, naming what it sent."""

    def handle(request: Any) -> None:
        if where == "token realm":
            realm = f'Bearer realm="{LONG_LABEL}",service="r"'
            reply(request, 401, b"", {"WWW-Authenticate": realm})
        else:
            reply(request, 307, b"", {"Location": LONG_LABEL})

    with hostile(handle) as server:
        registry = registry_for(server.host, None)
        with pytest.raises(RegistryError, match="not an address"):
            if where == "manifest":
                registry.get_manifest()
            else:
                BlobRanges(registry, DIGEST, len(DATA), attempts=1).read(0, 10)


def test_a_registry_host_that_cannot_be_connected_to_is_bad_input(tmp_path: Path) -> None:
    """Fixed with the above: the user's own HOST:PORT with such a label, under
    --tls-verify=false, was the same 'unexpected LocationParseError'; now exit 2."""
    from clirunner import invoke

    code, _, err = invoke("pull", "--tls-verify=false", f"docker://{'a' * 300}.example:5000/a:v1",
                          str(tmp_path / "copy"))  # fmt: skip
    assert code == 2, err
    assert err.startswith("error: ") and "is not a host one can connect to" in err
    assert len(err.strip().splitlines()) == 1


SECRETS = ("hunter2", base64.b64encode(b"bob:hunter2").decode(), "tok-s3cret", "sig-s3cret",
           "cred-s3cret")  # fmt: skip


@pytest.mark.parametrize("storage_fails", ["500", "400 twice", "refused", "stalls"])
def test_the_server_s_log_holds_no_password_token_or_presigned_query(
    storage_fails: str, tmp_path: Path
) -> None:
    """What the lazy server logs (its reads that failed, as nbdserver's log hears them) against
    a registry with a password and a bearer token that redirects to presigned URLs, when the
    storage fails each way: no password, Basic header, token or query string. Fixed for
    storage that answers an error whose body repeats the URL (S3's and GCS's XML errors name
    the resource, S3's the signature given): that body's excerpt went into the log, signature
    and all. Held for the others."""
    from cryptlayer.distribution.blockcache import BlockCache, CachedBlob

    port = [0]

    def tokens(request: Any) -> None:
        ok = request.headers.get("Authorization") == BASIC
        reply(request, 200 if ok else 401, b'{"token": "tok-s3cret"}' if ok else b"")

    def storage(request: Any) -> None:
        if storage_fails == "stalls":
            threading.Event().wait(3)
        code = 500 if storage_fails == "500" else 400
        reply(request, code, b"<Error>" + request.path.encode() + b"</Error>")

    with hostile(tokens) as token_server, hostile(storage) as cdn:

        def handle(request: Any) -> None:
            if request.headers.get("Authorization") != "Bearer tok-s3cret":
                realm = f'Bearer realm="http://{token_server.host}/token",service="r"'
                reply(request, 401, b"", {"WWW-Authenticate": realm})
            else:
                host = cdn.host if storage_fails != "refused" else f"127.0.0.1:{port[0]}"
                query = "X-Amz-Signature=sig-s3cret&X-Amz-Credential=cred-s3cret"
                reply(request, 307, b"", {"Location": f"http://{host}/bucket/blob?{query}"})

        port[0] = _closed_port()
        with hostile(handle) as server:
            said: list[str] = []
            ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA),
                                attempt_deadline=1.0, attempts=2)  # fmt: skip
            blob = CachedBlob(BlockCache(tmp_path / "cache", 64 << 20), ranges)
            ours, theirs = socket.socketpair()
            thread = threading.Thread(target=nbdserver.serve, args=(theirs, blob, "", said.append),
                                      kwargs={"handshake": False})  # fmt: skip
            thread.start()
            ours.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 4096))
            magic, error, cookie = struct.unpack(">IIQ", ours.recv(16))
            ours.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 8, 0, 0))  # NBD_CMD_DISC
            thread.join(30)
            ours.close()
            blob.close()
    assert (magic, error, cookie) == (0x67446698, 5, 7)  # EIO
    assert said, "the failed read was not logged"
    for line in said:
        for secret in SECRETS:
            assert secret not in line, line


def test_a_manifest_that_makes_a_layer_larger_than_its_statement_is_refused(
    plain: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: the NBD device's size is the statement's layer size, which dm-verity covers whole;
    a registry that lists the layer blob larger in its (unsigned) manifest, so that the device
    would hold bytes past what verity checks, is refused before any of the layer is fetched."""
    import json

    import requests
    from clirunner import invoke
    from luksfixtures import fake_image

    from cryptlayer.distribution import lazy
    from cryptlayer.errors import TamperedImageError

    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    image = fake_image(tmp_path / "img", size=6 << 20)
    ref = f"docker://{plain.host}/lazy/big:v1"
    code, _, err = invoke("push", "--no-tls-verify", str(image), ref)
    assert code == 0, err
    grow = [1 << 30]

    def proxy(request: Any) -> None:
        upstream = requests.get(f"http://{plain.host}{request.path}", stream=True,
                                headers={k: v for k, v in request.headers.items()
                                         if k.lower() in ("accept", "range")})  # fmt: skip
        body = upstream.raw.read()
        if "/manifests/" in request.path:
            doc = json.loads(body)
            for item in doc["layers"]:
                if item["mediaType"].endswith(".luks2"):  # the layer blob, not its tree
                    item["size"] += grow[0]
            body = json.dumps(doc).encode()
        keep = ("Content-Type", "Content-Range", "Docker-Content-Digest")
        reply(request, upstream.status_code, body,
              {k: upstream.headers[k] for k in keep if k in upstream.headers})  # fmt: skip

    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    with hostile(proxy) as server:
        with pytest.raises(TamperedImageError, match=r"bytes; image .* says"):
            lazy.fetch(lazy.Remote(f"docker://{server.host}/lazy/big:v1", tls_verify=False),
                       work / "image")  # fmt: skip
        assert not (tmp_path / "state/blockcache/sha256").exists()  # no byte of the layer
        grow[0] = 0  # the same proxy, the manifest as pushed: fetched
        again = tmp_path / "again"  # (the CLI removes a failed fetch's directory whole)
        again.mkdir(mode=0o700)
        fetched = lazy.fetch(lazy.Remote(f"docker://{server.host}/lazy/big:v1",
                                         tls_verify=False), again / "image")  # fmt: skip
    assert fetched.blobs[0][1] == 6 << 20


def _storage_answer(how: str) -> Callable[[Any], None]:
    def handle(request: Any) -> None:
        m = CLOSED.fullmatch(request.headers.get("Range", ""))
        assert m
        a, b = int(m[1]), int(m[2])
        body, said = DATA[a : b + 1], f"bytes {a}-{b}/{len(DATA)}"
        if how == "another range":
            said = f"bytes {a + 1}-{b + 1}/{len(DATA)}"
        elif how == "overlong":
            body += b"x" * 100
        elif how == "never ends":
            request.send_response(206)
            request.send_header("Content-Range", said)
            request.end_headers()
            request.wfile.write(body[:10])
            request.wfile.flush()
            threading.Event().wait(5)
            return
        request.send_response(206)
        request.send_header("Content-Range", said)
        request.end_headers()  # no Content-Length: the body ends when the connection does
        request.wfile.write(body)

    return handle


@pytest.mark.parametrize("how", ["another range", "overlong", "never ends"])
def test_a_presigned_location_that_answers_wrongly_is_refused_and_never_cached(
    how: str, tmp_path: Path
) -> None:
    """Held: object storage (the host the registry redirected to) answering a range with another
    Content-Range, a longer body, or a body that never ends: an error within the deadline, and
    nothing of it in the cache."""
    from cryptlayer.distribution.blockcache import BlockCache, CachedBlob

    where = [""]
    with hostile(redirecting(Seen(), where)) as server, hostile(_storage_answer(how)) as cdn:
        where[0] = f"http://{cdn.host}/bucket/blob?X-Amz-Signature=x"
        ranges = BlobRanges(registry_for(server.host), DIGEST, len(DATA), attempt_deadline=2.0,
                            attempts=1)  # fmt: skip
        cache = BlockCache(tmp_path / "cache", 64 << 20)
        blob = CachedBlob(cache, ranges)
        with pytest.raises(RegistryError):
            blob.pread(0, 4096)
        blob.close()
    assert cache.get(DIGEST, 0, 1 << 20) is None
    assert not [p for p in (tmp_path / "cache").rglob("0*") if p.is_file()]


def test_a_registry_on_the_default_port_down_at_the_first_request_is_not_taken_for_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fixed: under --tls-verify=false, a registry named without a port (443, else 80) that
    answered neither at the first request was recorded as plain HTTP all the same: the lazy
    server, whose ping at its start met a registry restarting, sent every read to port 80 of
    an https registry for its whole life. Now nothing is recorded until one of them answers.
    (A port is given here, and taken for none: tests bind no port 443.)"""
    from cryptlayer.distribution import wire

    monkeypatch.setattr(wire, "_has_port", lambda host: False)
    registry = Registry(parse_reference(f"docker://127.0.0.1:{_closed_port()}/lazy/app:v1"),
                        tls_verify=False)  # fmt: skip
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.ping()
    assert registry.conn.scheme is None
