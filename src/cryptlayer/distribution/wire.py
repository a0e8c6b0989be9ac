"""HTTP with a server that may be hostile (a registry, its token server, the CDN it redirects
to): a session that follows no redirect by itself and never reads ~/.netrc, plain HTTP only
where --tls-verify=false finds no TLS, a deadline per request, and every body read unencoded
with a cap before it is parsed."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from cryptlayer.errors import CryptlayerError, UsageError, printable

CHUNK = 1 << 20
ERROR_CAP = 64 << 10  # an error body: read at most this, print an excerpt of it
EXCERPT = 200
READ_TIMEOUT = 60  # seconds without a byte
DEADLINE = 300.0  # seconds for one request's answer, and again for a small body
MIN_RATE = 64 << 10  # bytes/s a blob must average past DEADLINE (an interrupted pull resumes)
MAX_REDIRECTS = 10


class RegistryError(CryptlayerError):
    """The registry or the network failed, or answered what no registry should (exit 1)."""


class _Expired(BaseException):
    """Raised by SIGALRM in a request past its deadline; a BaseException, so that no `except
    Exception` on the way (requests', urllib3's) takes it for a network error to retry."""


_armed = False


MAX_CA_FILE = 1 << 20


def ca_bundle(cert_dir: Path) -> str:
    """Every *.crt in `cert_dir` as one CA bundle file (skopeo's --cert-dir trusts each of them;
    requests takes one file), removed when this process ends. The directory is the user's own
    configuration, so its links are followed (/etc/docker/certs.d/HOST/ca.crt often is one)."""
    import atexit
    import tempfile

    names = sorted(cert_dir.glob("*.crt"))
    if not names:
        raise UsageError(f"--cert-dir {cert_dir} holds no *.crt", "put the CA there")
    bundle = bytearray()
    for name in names:
        try:
            with open(name, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise UsageError(f"--cert-dir: {name} is not a regular file")
                data = f.read(MAX_CA_FILE + 1)
        except OSError as err:
            raise UsageError(f"--cert-dir: cannot read {name} ({err.strerror})") from None
        if len(data) > MAX_CA_FILE or b"-----BEGIN CERTIFICATE-----" not in data:
            raise UsageError(f"--cert-dir: {name} is not a PEM certificate",
                             "put the registry's CA there as PEM (*.crt)")  # fmt: skip
        bundle += data.rstrip(b"\n") + b"\n"
    fd, path = tempfile.mkstemp(prefix="cryptlayer-ca.", suffix=".pem")
    atexit.register(os.unlink, path)
    with os.fdopen(fd, "wb") as out:
        out.write(bundle)
    return path


@contextmanager
def deadline(seconds: float, host: str) -> Iterator[None]:
    """Abort what runs inside after `seconds` (connecting, TLS, sending, the status and headers,
    urllib3's retries): the per-read timeout alone lets a registry drip a byte a minute forever.
    Only the main thread can take signals; elsewhere the per-read timeout is all there is."""
    global _armed
    if _armed or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    _armed = True
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        raise RegistryError(f"registry {host} gave no complete answer within {seconds:.0f} s",
                            "it may be overloaded; try again later") from None  # fmt: skip
    finally:
        _armed = False
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of `url`, as urllib.parse and urllib3 (which connects) both read
    them; ("", "", 0) where they disagree (`http://B\\@A/`: urllib.parse reads a user name
    before A, urllib3 connects to B) or cannot read it."""
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    try:
        parts, connect = urlsplit(url), parse_url(url)
        default = 443 if parts.scheme == "https" else 80
        split = (parts.scheme, (parts.hostname or "").lower(), parts.port or default)
    except (ValueError, LocationParseError):
        return ("", "", 0)
    host = (connect.host or "").lower().removeprefix("[").removesuffix("]")
    if ((connect.scheme or "").lower(), host, connect.port or default) != split:
        return ("", "", 0)
    return split


def place(url: str) -> str:
    """`url`'s host and port as written, for an error line or a log: without the user name and
    password a Location may carry (object storage's credentials, secret as a signature is)."""
    return urlsplit(url).netloc.rpartition("@")[2]


def _has_port(host: str) -> bool:
    return urlsplit(f"//{host}").port is not None


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def _reason(err: BaseException) -> str:
    """What went wrong with a connection, in a few words (requests' own text is a repr chain)."""
    import requests

    text = str(err)
    if isinstance(err, requests.exceptions.Timeout):
        return f"no answer within {READ_TIMEOUT} s"
    for said, reason in (("Connection refused", "connection refused"),
                         ("Name or service not known", "no such host"),
                         ("Temporary failure in name resolution", "its name does not resolve"),
                         ("NameResolutionError", "its name does not resolve"),
                         ("No route to host", "no route to host"),
                         ("Network is unreachable", "network unreachable")):  # fmt: skip
        if said in text:
            return reason
    return "the connection failed"


def _session() -> Any:
    """A requests session that never looks at a redirect itself, nor at ~/.netrc: even with
    allow_redirects=False, requests' Session.send prepares the next request of a 3xx, reading its
    body whole (and inflated) first and parsing its Location (a non-UTF-8 or malformed one raised
    from there). Redirects are followed in Connection.send, their bodies drained with a cap."""
    import requests

    class Session(requests.Session):
        def resolve_redirects(self, *_: Any, **__: Any) -> Any:
            return iter(())

    session = Session()
    # An auth of the session's own (adding nothing) keeps requests from adding ~/.netrc's
    # password to every request without one: to any port of a host, over plain HTTP, wherever
    # the registry redirects. Credentials come from the auth files only.
    session.auth = _no_auth
    return session


def _no_auth(request: Any) -> Any:
    return request


class Connection:
    """HTTP with one registry host: its TLS trust, its scheme (found by the first request under
    --tls-verify=false, as skopeo's ping does), redirects followed here."""

    def __init__(self, host: str, *, tls_verify: bool = True, cert_dir: Path | None = None):
        import urllib3
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.host = host
        self.tls_verify = tls_verify
        # Verified: https only. Not (skopeo's --tls-verify=false): https without checking the
        # certificate, or plain HTTP where the registry speaks only that (the first request
        # decides, as skopeo's ping does).
        self.scheme: str | None = "https" if tls_verify else None
        self.session = _session()
        # Replies unencoded: a cap must count what is parsed (0.5 MB of gzip can be 1 GB).
        self.session.headers["Accept-Encoding"] = "identity"
        retry = Retry(total=3, connect=3, read=2, other=0, redirect=0, backoff_factor=0.5,
                      status_forcelist=(502, 503, 504), allowed_methods=("GET", "HEAD", "PUT"),
                      respect_retry_after_header=False, raise_on_status=False)  # fmt: skip
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        # Passed with every request: a session's own setting would lose to $REQUESTS_CA_BUNDLE.
        self.verify: bool | str = tls_verify
        if not tls_verify:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif cert_dir is not None:
            self.verify = ca_bundle(cert_dir)

    @property
    def root(self) -> str:
        """The registry's own origin, as far as it is known yet."""
        return f"{self.scheme or 'https'}://{self.host}/"

    def own(self, url: str) -> bool:
        """Whether `url` is the registry's own scheme, host and port: the only place its
        credentials and tokens are sent."""
        return origin(url) == origin(self.root)

    def send(
        self, method: str, url: str, headers: dict[str, str], authorization: str | None, **kw: Any
    ) -> Any:
        """One request, its reply's body not yet read (stream). Redirects are followed here, not
        in requests (which reads a redirect's body whole): GET and HEAD only, `authorization`
        only to the registry's own origin."""
        for _ in range(MAX_REDIRECTS + 1):
            url = self.scheme_of(url)
            sent = dict(headers)
            if authorization and self.own(url):
                sent["Authorization"] = authorization
            response = self.exchange(method, url, sent, **kw)
            if not (response.is_redirect and method in ("GET", "HEAD")):
                return response
            drain(response)
            location = response.headers["Location"]
            try:
                target = urljoin(response.url, location)
                scheme = urlsplit(target).scheme
            except ValueError:  # e.g. "http://[::1/": an IPv6 address never closed
                scheme = ""
                target = location
            if scheme not in ("http", "https"):
                raise RegistryError(f"registry {self.host} redirected to {target[:EXCERPT]!r}",
                                    "only http and https are followed")  # fmt: skip
            url = target
            kw.pop("params", None)  # they are in the target already
        raise RegistryError(f"registry {self.host} redirected more than {MAX_REDIRECTS} times")

    def scheme_of(self, url: str) -> str:
        """`url`, made before the registry was found to speak plain HTTP, as it is now."""
        if self.scheme == "http" and url.startswith(f"https://{self.host}/"):
            return "http://" + url.removeprefix("https://")
        return url

    def exchange(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> Any:
        import requests

        plain = False  # port 443 was not reached: plain HTTP (port 80) if that answers
        if self.scheme is None and url.startswith(f"https://{self.host}/"):
            try:
                response = self.raw(method, url, headers, **kw)
            except requests.exceptions.SSLError:
                self.scheme = "http"  # e.g. a plain-HTTP registry answering the TLS hello
            except requests.exceptions.RequestException as err:
                if _has_port(self.host):  # the same port either way: it is not there
                    raise self.unreachable(url, err) from None
                plain = True  # not "http" yet: if port 80 fails too, nothing is known
            except ValueError:  # urllib3's LocationParseError: e.g. a label over 63 bytes
                raise self.no_address(url) from None
            else:
                self.scheme = "https"
                return response
            url = "http://" + url.removeprefix("https://")
        try:
            response = self.raw(method, url, headers, **kw)
            if plain:
                self.scheme = "http"
            return response
        except requests.exceptions.SSLError as err:
            raise self.tls_failed(url, err) from None
        except requests.exceptions.RequestException as err:
            raise self.unreachable(url, err) from None
        except ValueError:  # urllib3's LocationParseError: e.g. a label over 63 bytes
            raise self.no_address(url) from None

    def raw(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> Any:
        return self.session.request(method, url, headers=headers, timeout=READ_TIMEOUT,
                                    verify=self.verify, allow_redirects=False, stream=True,
                                    **kw)  # fmt: skip

    def unreachable(self, url: str, err: BaseException) -> RegistryError:
        where = place(url)
        for said, what in (("got more than 100 headers", "more than 100 header lines"),
                           ("LineTooLong", "a line longer than 64 KiB"),
                           ("BadStatusLine", "no HTTP status line")):  # fmt: skip
            if said in str(err):
                return RegistryError(f"{where} answered what is not HTTP ({what})",
                                     f"is {where} a registry's host:port?")  # fmt: skip
        if where == self.host:
            return RegistryError(f"cannot reach registry {where} ({_reason(err)})",
                                 f"is it running, and is {where} its host:port?")  # fmt: skip
        return RegistryError(f"cannot reach {where}, where registry {self.host} sent us"
                             f" ({_reason(err)})")  # fmt: skip

    def no_address(self, url: str) -> CryptlayerError:
        """The error for a URL that parses but names no host one can connect to: the user's
        (bad input), or one a registry sent (a redirect's, a token realm's), never a bug of
        ours to report."""
        if place(url) == self.host:
            return UsageError(f"{self.host[:EXCERPT]!r} is not a host one can connect to",
                              "check the reference's HOST[:PORT]")  # fmt: skip
        return RegistryError(f"registry {self.host} sent us to {place(url)[:EXCERPT]!r}, which is"
                             " not an address one can connect to",
                             "the registry is misconfigured or hostile")  # fmt: skip

    def tls_failed(self, url: str, err: BaseException) -> CryptlayerError:
        import requests

        where = place(url)
        text = str(err)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return UsageError(
                f"TLS with registry {where} failed (its certificate is not trusted)",
                "give --cert-dir with its CA, or --tls-verify=false for a local registry",
            )
        try:  # a registry that answers plain HTTP answers the TLS hello with garbage
            self.session.get(f"http://{where}/v2/", timeout=10, allow_redirects=False,
                             stream=True).close()  # fmt: skip
        except requests.exceptions.RequestException:
            return RegistryError(f"TLS with registry {where} failed (no TLS handshake)",
                                 f"is {where} a registry's host:port?")  # fmt: skip
        return UsageError(f"registry {where} speaks plain HTTP, not HTTPS",
                          "use --tls-verify=false (on a network you trust)")  # fmt: skip


def require_identity(response: Any, what: str, host: str) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        response.close()
        raise RegistryError(f"registry {host} sent {what} encoded ({encoding[:40]!r}) though"
                            " asked for it unencoded: refused unread")  # fmt: skip


def read_body(response: Any, cap: int) -> tuple[bytes, bool]:
    """At most `cap` + 1 bytes of the body, unencoded, within DEADLINE (each read within
    READ_TIMEOUT); and whether that was all of it. The connection is released or closed."""
    import http.client

    import urllib3

    body = bytearray()
    end = time.monotonic() + DEADLINE
    complete = broken = False
    try:
        while len(body) <= cap and time.monotonic() < end:
            chunk = response.raw.read1(min(CHUNK, cap + 1 - len(body)), decode_content=False)
            if not chunk:
                complete = True
                break
            body += chunk
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
        broken = True
    if complete:
        response.raw.release_conn()
    else:
        response.close()
    if broken:
        raise Broken
    return bytes(body), complete


class Broken(Exception):
    """The connection broke while a body was read."""


def read_capped(response: Any, cap: int, what: str, host: str) -> bytes:
    """The whole body of `response` (a manifest, a token reply), refused past `cap` bytes."""
    require_identity(response, what, host)
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > cap:
        response.close()
        raise RegistryError(f"registry {host} sent a {what} larger than {_size(cap)}",
                            "refused unread: no registry sends one that large")  # fmt: skip
    try:
        body, complete = read_body(response, cap)
    except Broken:
        raise RegistryError(f"the connection to {host} broke while reading its {what}",
                            "try again") from None  # fmt: skip
    if len(body) > cap:
        raise RegistryError(f"registry {host} sent a {what} larger than {_size(cap)}",
                            "refused: no registry sends one that large")  # fmt: skip
    if not complete:
        raise RegistryError(f"registry {host} did not send its {what} within {DEADLINE:.0f} s",
                            "try again later")  # fmt: skip
    return body


def drain(response: Any) -> None:
    """Done with `response`: read what little is left (so that the connection is reused), or
    drop the connection; never more than ERROR_CAP."""
    try:
        if response.headers.get("Content-Encoding", "identity").lower() in ("", "identity"):
            read_body(response, ERROR_CAP)
        else:
            response.close()
    except Broken:
        pass


def excerpt(response: Any, host: str) -> str:
    """The start of an error body, printable, for an error line (ERROR_CAP read at most)."""
    try:
        if response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
            response.close()
            return ""
        body, _ = read_body(response, ERROR_CAP)
    except Broken:
        return ""
    text = printable(" ".join(body[:ERROR_CAP].decode("utf-8", "replace").split()))
    return text[:EXCERPT] + ("..." if len(text) > EXCERPT else "")


def stream(response: Any, expected: int, what: str, host: str) -> Iterator[bytes]:
    """A blob's body as it arrives, within DEADLINE plus MIN_RATE for its size;
    a broken connection is a RegistryError (the partial file stays: pull resumes)."""
    import http.client

    import urllib3

    # The bytes as sent, never inflated: an encoded blob fails its digest check (exit 8).
    end = time.monotonic() + DEADLINE + expected / MIN_RATE
    complete = False
    try:
        while chunk := response.raw.read1(CHUNK, decode_content=False):
            yield chunk
            if time.monotonic() > end:
                raise RegistryError(f"registry {host} sent {what} too slowly",
                                    "pull again: it resumes")  # fmt: skip
        complete = True
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
        raise RegistryError(f"the connection to {host} broke during {what}",
                            "pull again: it resumes") from None  # fmt: skip
    finally:
        if complete:
            response.raw.release_conn()  # read to its end: the connection is reused
        else:
            response.close()


class Counted:
    """A file to upload that reports how much was read (requests streams it, Content-Length
    from len())."""

    def __init__(self, f: Any, size: int, progress: Callable[[int], None]) -> None:
        self.f, self.size, self.progress, self.done = f, size, progress, 0
        self.start = f.tell()

    def __len__(self) -> int:
        return self.size

    # urllib3 rewinds a body it retries (a 502 on the PUT) through these; without them the
    # retry sent no bytes under the same Content-Length, and the registry waited for them.
    def tell(self) -> int:
        return int(self.f.tell())

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        at = int(self.f.seek(pos, whence))
        self.done = at - self.start
        return at

    def read(self, n: int = -1) -> bytes:
        chunk: bytes = self.f.read(n if n and n > 0 else CHUNK)
        self.done += len(chunk)
        self.progress(self.done)
        return chunk
