"""Ranged reads of one blob, by digest, from a registry: what a lazily started layer's block
device reads through (docs/lazy.md). The registry, the object storage it redirects to and the
network are all untrusted; nothing read here is checked here (a chunk's hash is not known in
advance): dm-verity above the block device checks every block against the signed root hash.

Registries as they are: a closed range `bytes=A-B` only (they answer 206 without advertising
Accept-Ranges, and some refuse `bytes=A-`); a blob GET that redirects (307) to object storage
with a presigned URL that expires: the URL is kept and used directly, resolved again when it is
older than LOCATION_TTL or refused (400, 401, 403, 404, 410); the registry's Authorization only
ever to the registry's own scheme, host and port; its bearer token renewed on a 401; and a
deadline per attempt, enforced from another thread (SIGALRM, as wire.deadline uses, reaches only
the main thread, and the NBD server reads from several): a registry that stops answering is an
error after seconds, never a hang."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urljoin, urlsplit

from cryptlayer.distribution import wire
from cryptlayer.distribution.registry import Registry
from cryptlayer.distribution.wire import RegistryError

ATTEMPT_DEADLINE = 10.0  # seconds for one request: connect, TLS, headers and the body
ATTEMPTS = 3  # a read fails after this many attempts that failed for the network's reasons
CONNECT_TIMEOUT = 5.0
LOCATION_TTL = 300.0  # a redirect target older than this is resolved again (Quay's last 600 s)
MAX_RANGE = 32 << 20  # the NBD server's largest read (its maximum payload)
REDIRECTS = (301, 302, 303, 307, 308)
EXPIRED = (400, 401, 403, 404, 410)  # what object storage answers to an expired presigned URL
TRANSIENT = (408, 429, 500, 502, 503, 504)


class _Retry(Exception):
    """An attempt failed for a reason another attempt may not meet (network, 5xx, deadline)."""


class _Watch:
    """The sockets one attempt uses, shut down from a timer thread when its deadline passes:
    shutdown(2) on a duplicate of the descriptor ends a blocked connect, TLS handshake or read in
    the thread that waits on it (the duplicate shares the socket, not the Python object)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.expired = False

    def attach(self, sock: socket.socket) -> None:
        try:  # not sock.dup(): an SSLSocket refuses to be duplicated, its descriptor does not
            dup = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with self.lock:
            self.socks.append(dup)
            if self.expired:
                with suppress(OSError):
                    dup.shutdown(socket.SHUT_RDWR)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.socks:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self.lock:
            for sock in self.socks:
                sock.close()
            self.socks.clear()


class _Watchdog:
    """One thread for the whole process that expires each attempt's _Watch at its deadline (a
    threading.Timer per attempt started a thread per request: ~0.5 ms of the host's CPU each,
    a tenth of a 1 MiB read's whole cost, and ~50x that emulated)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.due: list[tuple[float, int, _Watch]] = []
        self.count = 0
        self.thread: threading.Thread | None = None

    def add(self, seconds: float, watch: _Watch) -> tuple[float, int, _Watch]:
        import heapq

        with self.cond:
            self.count += 1
            entry = (time.monotonic() + seconds, self.count, watch)
            heapq.heappush(self.due, entry)
            if self.thread is None or not self.thread.is_alive():  # (none after a fork)
                self.thread = threading.Thread(target=self._run, name="blobrange-deadline",
                                               daemon=True)  # fmt: skip
                self.thread.start()
            self.cond.notify()
        return entry

    def remove(self, entry: tuple[float, int, _Watch]) -> None:
        import heapq

        with self.cond:
            try:
                self.due.remove(entry)
            except ValueError:  # expired already
                return
            heapq.heapify(self.due)

    def _run(self) -> None:
        import heapq

        with self.cond:
            while True:
                now = time.monotonic()
                while self.due and self.due[0][0] <= now:
                    heapq.heappop(self.due)[2].expire()
                self.cond.wait(self.due[0][0] - now if self.due else None)


_watchdog = _Watchdog()
_current = threading.local()


def _attach(sock: Any) -> None:
    watch = getattr(_current, "watch", None)
    if watch is not None and isinstance(sock, socket.socket):
        watch.attach(sock)


@contextmanager
def _watched(seconds: float) -> Iterator[_Watch]:
    """Run what is inside with every socket it connects or reuses shut down after `seconds`."""
    watch = _Watch()
    _current.watch = watch
    entry = _watchdog.add(seconds, watch)
    try:
        yield watch
    finally:
        _watchdog.remove(entry)
        _current.watch = None
        watch.close()


def _watched_adapter(retries: Any) -> Any:
    """A requests adapter whose connections report their sockets to the thread's _Watch (when it
    has one): when a fresh one is made (before TLS) and when a kept-alive one is reused."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Plain(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _attach(sock)
            return sock

        def request(self, *args: Any, **kw: Any) -> None:
            _attach(self.sock)
            super().request(*args, **kw)

    class Secure(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _attach(sock)
            return sock

        def request(self, *args: Any, **kw: Any) -> None:
            _attach(self.sock)
            super().request(*args, **kw)

    class PlainPool(HTTPConnectionPool):
        ConnectionCls = Plain

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = Secure

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kw: Any) -> None:
            super().init_poolmanager(*args, **kw)
            self.poolmanager.pool_classes_by_scheme = {"http": PlainPool, "https": SecurePool}

    return Adapter(max_retries=retries)


class BlobRanges:
    """Blob `digest` of `size` bytes in `registry`'s repository, read by closed byte ranges."""

    def __init__(
        self,
        registry: Registry,
        digest: str,
        size: int,
        *,
        attempt_deadline: float = ATTEMPT_DEADLINE,
        attempts: int = ATTEMPTS,
    ) -> None:
        self.registry = registry
        self.conn = registry.conn
        self.auth = registry.auth
        self.host = registry.ref.host
        self.digest = digest
        self.size = size
        self.attempt_deadline = attempt_deadline
        self.attempts = attempts
        self.requests = 0  # sent, for the counters a benchmark reports
        self.lock = threading.Lock()
        self._location: tuple[str, float] | None = None  # where the blob was found, and when
        self._settings: dict[str, dict[str, Any]] = {}  # requests' environment's, per origin
        # Every request of this registry's session (token requests too) through connections the
        # deadline can cut; wire's retries (502/503/504) kept, inside that deadline.
        session = self.conn.session
        if not getattr(session, "watched", False):  # once per session: one pool per host
            for prefix in ("https://", "http://"):
                session.mount(prefix, _watched_adapter(session.get_adapter(prefix).max_retries))
            session.watched = True

    @property
    def url(self) -> str:
        return self.conn.scheme_of(f"{self.registry.base}/blobs/{self.digest}")

    def read(self, offset: int, length: int) -> bytes:
        """Exactly bytes [offset, offset + length) of the blob; RegistryError when the registry
        refuses, answers what no honest server sends, or gives no answer within the deadline of
        each of `attempts` attempts."""
        if offset < 0 or length <= 0 or offset + length > self.size or length > MAX_RANGE:
            raise ValueError(f"range {offset}+{length} of a blob of {self.size} bytes")
        what = f"bytes {offset}-{offset + length - 1} of blob {self.digest}"
        reason = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 2.0))
            with _watched(self.attempt_deadline) as watch:
                try:
                    return self._attempt(offset, length, what)
                except _Retry as err:
                    reason = str(err)
                    if watch.expired:
                        reason = f"no complete answer within {self.attempt_deadline:.0f} s"
                except RegistryError:
                    if watch.expired:  # a connection cut by the deadline reads as broken
                        reason = f"no complete answer within {self.attempt_deadline:.0f} s"
                        continue
                    raise
        raise RegistryError(f"registry {self.host} did not send {what}"
                            f" ({reason}, {self.attempts} attempts)",
                            "is the registry up? reads fail until it is")  # fmt: skip

    def _where(self) -> str:
        with self.lock:
            if self._location and time.monotonic() - self._location[1] < LOCATION_TTL:
                return self._location[0]
            self._location = None
        return self.url

    def _attempt(self, offset: int, length: int, what: str) -> bytes:
        import requests

        if self.conn.scheme is None:  # --tls-verify=false, and the server's ping found nothing:
            try:  # find https or plain HTTP now, as pull's first request does (a blip at the
                self.registry.ping()  # server's start must not send every read to https)
            except RegistryError as err:
                raise _Retry(str(err)) from None
        url = self._where()
        renewed = resolved = False
        for _ in range(wire.MAX_REDIRECTS + 3):
            own = self.conn.own(url)
            headers = {"Range": f"bytes={offset}-{offset + length - 1}",
                       "Accept-Encoding": "identity"}  # fmt: skip
            if own and self.auth.header:  # never to a host the registry redirected to
                headers["Authorization"] = self.auth.header
            with self.lock:
                self.requests += 1
            try:
                response = self._get(url, headers)
            except requests.exceptions.SSLError as err:
                raise self.conn.tls_failed(url, err) from None
            except requests.exceptions.RequestException as err:
                raise _Retry(str(self.conn.unreachable(url, err))) from None
            except ValueError:  # urllib3's LocationParseError: e.g. a label over 63 bytes
                raise self.conn.no_address(url) from None
            status = response.status_code
            if status in REDIRECTS:
                url = self._follow(response)
                continue
            if status == 401 and own and not renewed:  # the token expired: ask for another
                challenge = response.headers.get("WWW-Authenticate", "")
                wire.drain(response)
                self.auth.authenticate(challenge, url)
                renewed = True
                continue
            if status in EXPIRED and not own and not resolved:  # a presigned URL expired
                wire.drain(response)
                with self.lock:
                    self._location = None
                url, resolved = self.url, True
                continue
            if status in TRANSIENT:
                wire.drain(response)
                raise _Retry(f"HTTP {status}")
            if status in (200, 206):
                if url != self.url:
                    with self.lock:
                        self._location = (url, time.monotonic())
                return self._body(response, offset, length, what)
            if status in (401, 403):
                wire.drain(response)
                raise self.auth.denied(url, status)
            if own or not urlsplit(url).query:
                excerpt = wire.excerpt(response, self.host)
            else:  # object storage's errors repeat the URL: its signature is a credential
                wire.drain(response)
                excerpt = "(its reply is not shown: it may repeat the presigned URL)"
            where = wire.place(url)
            raise RegistryError(f"{where} answered HTTP {status} to a read of {what}"
                                f" {excerpt}".rstrip())  # fmt: skip
        raise RegistryError(f"registry {self.host} redirected more than {wire.MAX_REDIRECTS}"
                            f" times for {what}")  # fmt: skip

    def _get(self, url: str, headers: dict[str, str]) -> Any:
        """session.request("GET", url, ...), with the settings requests takes from the
        environment (proxies, REQUESTS_CA_BUNDLE, .netrc's absence) looked up once per origin,
        not per request: ~150 lookups in os.environ each time, a third of a small read's CPU."""
        import requests

        session = self.conn.session
        prepared = session.prepare_request(requests.Request("GET", url, headers=headers))
        scheme, host, port = wire.origin(url)
        origin = f"{scheme}://{host}:{port}" if scheme else ""
        settings = self._settings.get(origin) if origin else None
        if settings is None:
            settings = session.merge_environment_settings(prepared.url, {}, True,
                                                          self.conn.verify, None)  # fmt: skip
            if origin:
                with self.lock:
                    self._settings[origin] = settings
        return session.send(prepared, allow_redirects=False,
                            timeout=(CONNECT_TIMEOUT, self.attempt_deadline),
                            **settings)  # fmt: skip

    def _follow(self, response: Any) -> str:
        location = response.headers.get("Location", "")
        wire.drain(response)
        try:
            target = str(urljoin(response.url, location))
        except ValueError:
            target = ""
        if wire.origin(target)[0] not in ("http", "https"):
            raise RegistryError(f"registry {self.host} redirected to {location[:wire.EXCERPT]!r}",
                                "only http and https are followed")  # fmt: skip
        return target

    def _body(self, response: Any, offset: int, length: int, what: str) -> bytes:
        """The reply's body, if it is exactly the range asked for; else RegistryError."""
        where = wire.place(response.url)
        wire.require_identity(response, what, where)
        if response.status_code == 200 and not (offset == 0 and length == self.size):
            response.close()
            raise RegistryError(f"{where} answered a read of {what} with the whole blob"
                                " (HTTP 200, not 206): refused unread",
                                "it serves no byte ranges; pull the image")  # fmt: skip
        if response.status_code == 206:
            said = response.headers.get("Content-Range", "")
            expect = f"bytes {offset}-{offset + length - 1}/"
            total = said.removeprefix(expect)
            if not said.startswith(expect) or total not in ("*", str(self.size)):
                response.close()
                raise RegistryError(f"{where} answered a read of {what} with another range"
                                    f" ({said[:wire.EXCERPT]!r}): refused")  # fmt: skip
        declared = response.headers.get("Content-Length")
        if declared is not None and declared != str(length):
            response.close()
            raise RegistryError(f"{where} answered a read of {what} with {declared[:40]!r}"
                                f" bytes, not {length}: refused unread")  # fmt: skip
        body, extra = self._read_exactly(response, length)
        if extra:
            raise RegistryError(f"{where} sent more than the {length} bytes of {what}: refused")
        if len(body) < length:
            raise _Retry(f"{where} sent {len(body)} of the {length} bytes")
        return body

    @staticmethod
    def _read_exactly(response: Any, length: int) -> tuple[bytes, bool]:
        """Up to `length` bytes of the body read in one call (http.client reads them into one
        buffer: wire.read_body's loop of read1 and appends cost 5x the CPU per byte), and
        whether more followed. The attempt's deadline (_watched) ends a body that stalls; the
        connection is kept for the next request only if the body ended where it should."""
        import http.client

        import urllib3

        try:
            body = response.raw.read(length, decode_content=False)
            extra = len(body) == length and bool(response.raw.read(1, decode_content=False))
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
            response.close()
            raise _Retry("the connection broke") from None
        if len(body) == length and not extra:
            response.raw.release_conn()
        else:
            response.close()
        return body, extra
