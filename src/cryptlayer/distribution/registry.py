"""A thin client of the OCI distribution spec (v1.1) over `requests`: blobs by digest (HEAD
first, cross-repository mount, monolithic upload), manifests by digest and then by tag, streamed
and verified pulls that resume. Auth as skopeo and podman do it: credentials from --authfile,
$REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json or ~/.docker/config.json; Basic, or
a Bearer token from the registry's realm.

The registry is untrusted input, as an image is: credentials go only to the registry's own host
(and a token server it names over https), every body is read with a cap before it is parsed,
replies are asked for and taken unencoded, and every request has a deadline."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shlex
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

from cryptlayer import oci
from cryptlayer.distribution.artifact import require_blob, write_checked
from cryptlayer.errors import CryptlayerError, TamperedImageError, UsageError, printable
from cryptlayer.fsutil import MAX_IMAGE_JSON

ACCEPT = "application/vnd.oci.image.manifest.v1+json"
CHUNK = 1 << 20
DEFAULT_REGISTRY = "docker.io"
TOKEN_CAP = 1 << 20  # a token reply (JWTs run to a few KiB)
ERROR_CAP = 64 << 10  # an error body: read at most this, print an excerpt of it
EXCERPT = 200
AUTH_FILE_CAP = 1 << 20
READ_TIMEOUT = 60  # seconds without a byte
DEADLINE = 300.0  # seconds for one request's answer, and again for a small body
MIN_RATE = 64 << 10  # bytes/s a blob must average past DEADLINE (an interrupted pull resumes)
MAX_REDIRECTS = 10
# Transports of containers/image that cryptlayer does not speak.
_TRANSPORTS = ("oci-archive", "docker-archive", "docker-daemon", "dir", "containers-storage",
               "ostree", "sif", "tarball")  # fmt: skip


class RegistryError(CryptlayerError):
    """The registry or the network failed, or answered what no registry should (exit 1)."""


@dataclass(frozen=True)
class Reference:
    """docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST], as skopeo writes it."""

    host: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else f":{self.tag}" if self.tag else ""
        return f"docker://{self.host}/{self.repository}{at}"


_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


def no_userinfo() -> UsageError:
    """For a reference written USER[:PASS]@HOST/...: what is refused, without the password."""
    return UsageError(
        "a reference carries no credentials (it has USER[:PASSWORD]@ before the registry)",
        "log in with cryptlayer login --username USER HOST, or pass --creds USER",
    )


def parse_reference(text: str) -> Reference:
    """UsageError unless `text` names a repository as skopeo would take it."""
    transport = re.match(r"([a-z][a-z0-9-]*):(//)?", text)
    if transport and (transport[1] in _TRANSPORTS or (transport[2] and transport[1] != "docker")):
        raise UsageError(f"unsupported transport {transport[1]}",
                         "use docker://HOST/REPO[:TAG] or oci:PATH[:TAG]")  # fmt: skip
    rest = text.removeprefix("docker://")
    digest = ""
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not digest.startswith("sha256:") or "/" in digest:
            raise no_userinfo()  # USER[:PASS]@HOST/...: the text is never echoed
        if not oci.is_digest(digest):
            raise UsageError(f"{printable(digest)!r} is not a sha256 digest",
                             "pin a manifest digest as REF@sha256:HEX (64 hex digits)")  # fmt: skip
    host, sep, path = rest.partition("/")
    if not sep or not ("." in host or ":" in host or host == "localhost"):
        host, path = DEFAULT_REGISTRY, rest
        if "/" not in path:
            path = f"library/{path}"
    tag = ""
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
            raise UsageError(f"{text}: {tag!r} is not a tag")
    if not path or not all(_COMPONENT.match(c) for c in path.split("/")):
        raise UsageError(
            f"{text}: {path!r} is not a repository name", "e.g. docker://HOST/REPO:TAG"
        )
    return Reference(host, path, tag, digest)


def auth_file(override: Path | None = None) -> Path:
    """Where `login` writes, as podman: --authfile, else $REGISTRY_AUTH_FILE, else
    ${XDG_RUNTIME_DIR}/containers/auth.json, else /run/containers/UID/auth.json."""
    if override is not None:
        return override
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return Path(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "containers/auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


def auth_files(override: Path | None = None) -> list[Path]:
    """Where credentials are looked for, in podman's order (then docker's file); with --authfile
    only that file, as podman."""
    if override is not None:
        return [override]
    return [auth_file(), Path.home() / ".docker/config.json"]


def registry_host(text: str) -> str:
    """HOST[:PORT] of `login`/`logout`, given as podman takes it (docker:// and a trailing /
    allowed); UsageError for a repository or another transport."""
    if not text.startswith("docker://") and re.match(r"[a-z][a-z0-9-]*:(?!\d)", text):
        parse_reference(text)  # refuses oci-archive: and the like by name
    host = text.removeprefix("docker://").rstrip("/")
    if "@" in host:
        raise no_userinfo()
    if not re.fullmatch(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(:[0-9]+)?", host):
        raise UsageError(f"{text!r} is not a registry's HOST[:PORT]",
                         "e.g. cryptlayer login --username USER registry.example.com")  # fmt: skip
    return host


def _read_auth_file(path: Path) -> dict[str, Any] | None:
    """Auth file `path` (None if there is none); UsageError naming the file if it is anything
    but a JSON object whose "auths", if there, is an object."""
    fix = f"fix or remove {path}, then log in again"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UsageError(f"cannot read auth file {path} ({err.strerror})", fix) from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"auth file {path} is not a regular file", fix)
        data = f.read(AUTH_FILE_CAP + 1)
    if len(data) > AUTH_FILE_CAP:
        raise UsageError(f"auth file {path} is larger than {AUTH_FILE_CAP >> 20} MiB", fix)
    try:
        doc = json.loads(data.decode())
    except ValueError:  # UnicodeDecodeError included
        raise UsageError(f"auth file {path} is not JSON (in UTF-8)", fix) from None
    if not isinstance(doc, dict):
        raise UsageError(f"auth file {path} is not a JSON object", fix)
    if not isinstance(doc.get("auths", {}), dict):
        raise UsageError(f'auth file {path}: "auths" is not an object', fix)
    return doc


def _key_host(key: str) -> str:
    """An auth file key as docker matches it: "https://HOST/v1/", "http://HOST/v2/" mean HOST."""
    if "://" in key:
        return key.split("://", 1)[1].split("/", 1)[0]
    return key


_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")


def _keys_for(host: str, repository: str) -> list[str]:
    """The keys that may hold HOST's credentials, most specific first: podman's HOST/NAMESPACE
    keys for the repository, then the host (Docker Hub under any of its names)."""
    parts = repository.split("/") if repository else []
    scoped = [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    return scoped + ([*_DOCKER_HUB] if host in _DOCKER_HUB else [host])


def save_credentials(host: str, user: str, password: bytes | None,
                     authfile: Path | None = None) -> Path:  # fmt: skip
    """Add (or with None remove) HOST's credentials in auth_file(), mode 0600, atomically."""
    from cryptlayer.fsutil import write_atomic

    path = auth_file(authfile)
    # A malformed file is refused, not replaced: it may hold other registries' credentials.
    doc = _read_auth_file(path) or {}
    auths = doc.setdefault("auths", {})
    if password is None:
        if host not in auths:
            raise UsageError(f"not logged in to {host}", f"{path} holds no credentials for it")
        del auths[host]
    else:
        token = base64.b64encode(user.encode() + b":" + password).decode()
        auths[host] = {"auth": token}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, json.dumps(doc, indent=2).encode() + b"\n", 0o600)
    return path


def credentials(host: str, repository: str = "",
                authfile: Path | None = None) -> tuple[str, str] | None:  # fmt: skip
    """HOST's stored credentials as podman finds them; UsageError naming the file if an auth file
    (or the entry found in it) is malformed."""
    wanted = _keys_for(host, repository)
    for path in auth_files(authfile):
        auths = (_read_auth_file(path) or {}).get("auths")
        if not auths:
            continue
        by_host = {_key_host(k): k for k in auths if "://" in k}
        for want in wanted:
            key = want if want in auths else by_host.get(want)
            if key is None:
                continue
            found = _decode_entry(path, key, auths[key], host)
            if found is not None:
                return found
    return None


def _decode_entry(path: Path, key: str, entry: Any, host: str) -> tuple[str, str] | None:
    fix = f"log in again (cryptlayer login --username USER {host}) or fix {path}"
    if not isinstance(entry, dict):
        raise UsageError(f"auth file {path}: the entry for {key!r} is not an object", fix)
    token = entry.get("auth")
    if token is None or token == "":
        return None  # e.g. docker's with a credsStore: nothing here
    try:
        if not isinstance(token, str):
            raise ValueError
        user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
        if not sep or not user:
            raise ValueError
    except (ValueError, binascii.Error):  # UnicodeDecodeError is a ValueError
        raise UsageError(f'auth file {path}: the "auth" of {key!r} is not base64 of'
                         " USER:PASSWORD in UTF-8", fix) from None  # fmt: skip
    return user, password


class _Expired(BaseException):
    """Raised by SIGALRM in a request past its deadline; a BaseException, so that no `except
    Exception` on the way (requests', urllib3's) takes it for a network error to retry."""


_armed = False


MAX_CA_FILE = 1 << 20


def _ca_bundle(cert_dir: Path) -> str:
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
def _deadline(seconds: float, host: str) -> Iterator[None]:
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


def _origin(url: str) -> tuple[str, str, int]:
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
    from there). Redirects are followed in Registry._send, their bodies drained with a cap."""
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


class Registry:
    """One repository of one registry."""

    def __init__(
        self,
        ref: Reference,
        *,
        tls_verify: bool = True,
        cert_dir: Path | None = None,
        login: tuple[str, str] | None = None,
        authfile: Path | None = None,
    ):
        import urllib3
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.ref = ref
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
            self.verify = _ca_bundle(cert_dir)
        self._auth: str | None = None
        self._login = login  # credentials given now (login, --creds), else the auth files'
        self._stored = False  # whether the credentials in use came from an auth file
        self.authfile = authfile

    @property
    def base(self) -> str:
        return f"{self.scheme or 'https'}://{self.ref.host}/v2/{self.ref.repository}"

    def _own(self, url: str) -> bool:
        """Whether `url` is the registry's own scheme, host and port: the only place its
        credentials and tokens are sent."""
        return _origin(url) == _origin(f"{self.scheme or 'https'}://{self.ref.host}/")

    # -- requests with auth
    def _request(self, method: str, url: str, *, budget: float | None = None, **kw: Any) -> Any:
        """One request, authenticated as the registry asks, its reply's body not yet read
        (stream): read it with _read, _drain or _stream."""
        headers = dict(kw.pop("headers", {}))
        with _deadline(DEADLINE if budget is None else budget, self.ref.host):
            for attempt in (0, 1):
                url = self._scheme_of(url)
                response = self._send(method, url, headers, **kw)
                # Only the registry's own 401 counts: a host it redirected to (a CDN) does not
                # get to name where the registry's credentials go.
                if response.status_code != 401 or attempt or not self._own(response.url):
                    return response
                challenge = response.headers.get("WWW-Authenticate", "")
                _drain(response)
                self._authenticate(challenge, url)
        return response

    def _send(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> Any:
        """Follow redirects here, not in requests (which reads a redirect's body whole):
        GET and HEAD only, Authorization only to the registry's own origin."""
        for _ in range(MAX_REDIRECTS + 1):
            url = self._scheme_of(url)
            sent = dict(headers)
            if self._auth and self._own(url):
                sent["Authorization"] = self._auth
            response = self._exchange(method, url, sent, **kw)
            if not (response.is_redirect and method in ("GET", "HEAD")):
                return response
            _drain(response)
            location = response.headers["Location"]
            try:
                target = urljoin(response.url, location)
                scheme = urlsplit(target).scheme
            except ValueError:  # e.g. "http://[::1/": an IPv6 address never closed
                scheme = ""
                target = location
            if scheme not in ("http", "https"):
                raise RegistryError(f"registry {self.ref.host} redirected to {target[:EXCERPT]!r}",
                                    "only http and https are followed")  # fmt: skip
            url = target
            kw.pop("params", None)  # they are in the target already
        raise RegistryError(f"registry {self.ref.host} redirected more than {MAX_REDIRECTS} times")

    def _scheme_of(self, url: str) -> str:
        """`url`, made before the registry was found to speak plain HTTP, as it is now."""
        if self.scheme == "http" and url.startswith(f"https://{self.ref.host}/"):
            return "http://" + url.removeprefix("https://")
        return url

    def _exchange(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> Any:
        import requests

        if self.scheme is None and url.startswith(f"https://{self.ref.host}/"):
            try:
                response = self._raw(method, url, headers, **kw)
            except requests.exceptions.SSLError:
                pass  # e.g. a plain-HTTP registry answering the TLS hello with a 400
            except requests.exceptions.RequestException as err:
                if _has_port(self.ref.host):  # the same port either way: it is not there
                    raise self._unreachable(url, err) from None
            else:
                self.scheme = "https"
                return response
            self.scheme = "http"
            url = "http://" + url.removeprefix("https://")
        try:
            return self._raw(method, url, headers, **kw)
        except requests.exceptions.SSLError as err:
            raise self._tls_failed(url, err) from None
        except requests.exceptions.RequestException as err:
            raise self._unreachable(url, err) from None

    def _raw(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> Any:
        return self.session.request(method, url, headers=headers, timeout=READ_TIMEOUT,
                                    verify=self.verify, allow_redirects=False, stream=True,
                                    **kw)  # fmt: skip

    def _unreachable(self, url: str, err: BaseException) -> RegistryError:
        where = urlsplit(url).netloc
        for said, what in (("got more than 100 headers", "more than 100 header lines"),
                           ("LineTooLong", "a line longer than 64 KiB"),
                           ("BadStatusLine", "no HTTP status line")):  # fmt: skip
            if said in str(err):
                return RegistryError(f"{where} answered what is not HTTP ({what})",
                                     f"is {where} a registry's host:port?")  # fmt: skip
        if where == self.ref.host:
            return RegistryError(f"cannot reach registry {where} ({_reason(err)})",
                                 f"is it running, and is {where} its host:port?")  # fmt: skip
        return RegistryError(f"cannot reach {where}, where registry {self.ref.host} sent us"
                             f" ({_reason(err)})")  # fmt: skip

    def _tls_failed(self, url: str, err: BaseException) -> CryptlayerError:
        import requests

        where = urlsplit(url).netloc
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

    def _authenticate(self, challenge: str, url: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        creds = self._login
        if creds is None:
            creds = credentials(self.ref.host, self.ref.repository, self.authfile)
            self._stored = creds is not None
        if scheme.lower() == "basic":
            if creds is None:
                raise self._denied(url, 401)
            self._auth = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return
        if scheme.lower() == "bearer" and "realm" in fields:
            realm = fields["realm"]
            creds = self._realm_may_have(realm, creds)
            query = {k: v for k, v in fields.items() if k in ("service", "scope")}
            if url.startswith(self.base):  # the repository's own: ask for its scope
                query.setdefault("scope", f"repository:{self.ref.repository}:pull,push")
            self._auth = f"Bearer {self._token(realm, query, creds)}"
            return
        raise RegistryError(f"registry {self.ref.host} asks for unknown auth {scheme[:40]!r}")

    def _realm_may_have(self, realm: str, creds: tuple[str, str] | None) -> Any:
        """The credentials the token server `realm` may receive: with TLS verified, an https
        realm (any host: the registry proved who it is, and Docker Hub's is auth.docker.io);
        without, only a realm on the registry's own host name (nothing proves who named it)."""
        scheme, host, _ = _origin(realm)  # "" if urllib3 would connect elsewhere
        if scheme not in ("http", "https") or not host:
            raise RegistryError(f"registry {self.ref.host} names a token server that is not a URL"
                                f" ({realm[:EXCERPT]!r})")  # fmt: skip
        if self.tls_verify and scheme != "https":
            raise RegistryError(
                f"registry {self.ref.host} names a token server over plain HTTP"
                f" ({realm[:EXCERPT]}): refused, it would receive credentials in clear",
                "its realm must be https while TLS is verified",
            )
        if creds is not None and not self.tls_verify and host != _origin(self.base)[1]:
            raise RegistryError(
                f"registry {self.ref.host} names a token server on another host ({host}):"
                " with --tls-verify=false credentials go only to the registry's own host",
                "verify TLS (--cert-dir DIR) to use that token server",
            )
        return creds

    def _token(self, realm: str, query: dict[str, str], creds: Any) -> str:
        import requests

        try:
            response = self.session.get(realm, params=query, auth=creds, timeout=READ_TIMEOUT,
                                        verify=self.verify, allow_redirects=False,
                                        stream=True)  # fmt: skip
        except requests.exceptions.SSLError as err:
            raise self._tls_failed(realm, err) from None
        except requests.exceptions.RequestException as err:
            raise self._unreachable(realm, err) from None
        if response.status_code != 200:
            _drain(response)
            raise self._denied(self.base, response.status_code)
        body = _read(response, TOKEN_CAP, "token reply", _origin(realm)[1])
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not re.fullmatch(r"[!-~]+", token):
            raise RegistryError(f"the token server of registry {self.ref.host} sent no token"
                                ' (its reply is not a JSON object with a "token")')  # fmt: skip
        return token

    def _denied(self, url: str, status: int) -> CryptlayerError:
        if not self._own(url):
            return RegistryError(
                f"{urlsplit(url).netloc}, where registry {self.ref.host} sent us, refused access"
                f" (HTTP {status})", f"credentials are sent only to {self.ref.host} itself"
            )  # fmt: skip
        if self._login is not None:
            hint = "check the user name and password"
        else:
            again = "again" if self._stored else "first"
            # where this command looks: a login that wrote elsewhere would not be found
            where = f"--authfile {shlex.quote(str(self.authfile))} " if self.authfile else ""
            hint = f"log in {again}: cryptlayer login {where}--username USER {self.ref.host}"
        return UsageError(f"registry {self.ref.host} refused access (HTTP {status})", hint)

    def _check(self, response: Any, what: str) -> Any:
        status = response.status_code
        if 200 <= status < 300:
            return response
        excerpt = _excerpt(response, self.ref.host)
        if status in (401, 403):
            raise self._denied(response.url, status)
        if status == 404:
            raise UsageError(f"{self.ref} has no {what}", "check the repository and tag")
        raise RegistryError(f"{self.ref}: {what}: HTTP {status} {excerpt}".rstrip())

    def ping(self) -> None:
        """GET /v2/ (authenticating as the registry asks); UsageError if refused."""
        url = f"{self.scheme or 'https'}://{self.ref.host}/v2/"
        _drain(self._check(self._request("GET", url), "API (/v2/)"))

    # -- blobs
    def has_blob(self, digest: str) -> bool:
        response = self._request("HEAD", f"{self.base}/blobs/{digest}")
        if response.status_code == 404:
            _drain(response)
            return False
        found = bool(self._check(response, f"blob {digest}").status_code == 200)
        _drain(response)
        return found

    def push_blob(
        self, blob: BinaryIO, digest: str, size: int, progress: Callable[[int], None]
    ) -> bool:
        """Upload `blob` (an open file, read from where it stands) as `digest` unless the
        registry has it, or can mount it from another repository where this host saw it
        (blob_locations); True if bytes were sent."""
        if self.has_blob(digest):
            self.seen(digest)
            return False
        params = {}
        source = blob_locations().get(f"{self.ref.host} {digest}")
        if source and source != self.ref.repository:
            params = {"mount": digest, "from": source}  # the spec's cross-repository mount
        response = self._check(
            self._request("POST", f"{self.base}/blobs/uploads/", params=params), "upload"
        )
        _drain(response)
        if response.status_code == 201:  # mounted: nothing to send
            self.seen(digest)
            return False
        if not response.headers.get("Location"):
            raise RegistryError(f"registry {self.ref.host} started an upload but did not say"
                                " where to send it (no Location header)")  # fmt: skip
        said = response.headers["Location"]
        try:
            location = urljoin(response.url, said)
        except ValueError:  # e.g. "http://[::1/": an IPv6 address never closed
            location = said
        if not _origin(location)[0].startswith("http"):  # "" where it is no URL
            raise RegistryError(f"registry {self.ref.host} started an upload at {said[:EXCERPT]!r},"
                                " which is not an http or https URL")  # fmt: skip
        response = self._request(
            "PUT", location, params={"digest": digest}, data=_Counted(blob, size, progress),
            headers={"Content-Type": "application/octet-stream"},
            budget=DEADLINE + size / MIN_RATE,
        )  # fmt: skip
        _drain(self._check(response, f"upload of {digest}"))
        self.seen(digest)
        return True

    def seen(self, digest: str) -> None:
        """Remember that this repository holds `digest` (for later mounts)."""
        remember_blob(f"{self.ref.host} {digest}", self.ref.repository)

    def pull_blob(
        self, digest: str, size: int, out: BinaryIO, progress: Callable[[int], None]
    ) -> None:
        """Stream blob `digest` into `out` (an open file, readable and writable), resuming what
        it holds; its sha256 checked (TamperedImageError: the caller removes the file)."""
        h = hashlib.sha256()
        out.seek(0)
        have = 0
        while chunk := out.read(CHUNK):
            h.update(chunk)
            have += len(chunk)
        if have > size:
            out.seek(0)
            out.truncate()
            h, have = hashlib.sha256(), 0
        if have < size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            response = self._request("GET", f"{self.base}/blobs/{digest}", headers=headers)
            self._check(response, f"blob {digest}")
            if have and response.status_code != 206:  # no range support: start over
                h, have = hashlib.sha256(), 0
                out.seek(0)
                out.truncate()
            have = write_checked(self._stream(response, size - have, f"blob {digest}"), out, h,
                                 have, size, progress)  # fmt: skip
        require_blob(h, have, digest, size, f"from {self.ref.host}",
                     "the registry or the network changed it; pull again")  # fmt: skip
        self.seen(digest)

    def _stream(self, response: Any, expected: int, what: str) -> Iterator[bytes]:
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
                    raise RegistryError(f"registry {self.ref.host} sent {what} too slowly",
                                        "pull again: it resumes")  # fmt: skip
            complete = True
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
            raise RegistryError(f"the connection to {self.ref.host} broke during {what}",
                                "pull again: it resumes") from None  # fmt: skip
        finally:
            if complete:
                response.raw.release_conn()  # read to its end: the connection is reused
            else:
                response.close()

    # -- manifests
    def put_manifest(self, data: bytes, digest: str) -> None:
        """By digest, then under the tag: a half-finished push is never visible under it."""
        refs = [digest] + ([] if self.ref.digest else [self.ref.tag or "latest"])
        for ref in refs:
            response = self._request("PUT", f"{self.base}/manifests/{ref}", data=data,
                                     headers={"Content-Type": ACCEPT})  # fmt: skip
            _drain(self._check(response, f"manifest {ref}"))

    def prepare(self) -> None:
        pass

    def __str__(self) -> str:
        return str(self.ref)

    def get_manifest(self) -> tuple[bytes, str]:
        ref = self.ref.ref
        response = self._check(
            self._request("GET", f"{self.base}/manifests/{ref}", headers={"Accept": ACCEPT}),
            f"manifest {ref}",
        )
        data = _read(response, MAX_IMAGE_JSON, f"manifest {ref}", self.ref.host)
        digest = oci.digest_of(data)
        if ref.startswith("sha256:") and digest != ref:
            raise TamperedImageError(f"manifest {ref} from {self.ref.host} has digest {digest}")
        return data, digest

    def read_small_blob(self, digest: str, size: int, limit: int) -> bytes:
        """Blob `digest` of `size` bytes into memory, its sha256 checked; refused unasked when
        `size` is over `limit`, and never more than `size` bytes read (for `inspect`)."""
        if size > limit:
            raise TamperedImageError(  # as pull refuses the same manifest
                f"{self.ref} lists blob {digest} with {size} bytes, more than {limit}",
                "the manifest was changed; pull from the publisher",
            )
        response = self._check(
            self._request("GET", f"{self.base}/blobs/{digest}"), f"blob {digest}"
        )
        # The bytes as sent, never decompressed (a small gzip body must not become gigabytes),
        # and never more than `size` + 1.
        try:
            data, complete = _body(response, size)
        except _Broken:
            raise RegistryError(f"the connection to {self.ref.host} broke while reading blob"
                                f" {digest}", "try again") from None  # fmt: skip
        if not complete and len(data) <= size:
            raise RegistryError(f"registry {self.ref.host} did not send blob {digest} within"
                                f" {DEADLINE:.0f} s", "try again later")  # fmt: skip
        if len(data) != size or oci.digest_of(data) != digest:
            raise TamperedImageError(
                f"blob {digest} from {self.ref.host} does not match its digest",
                "the registry or the network changed it",
            )
        return bytes(data)


def _require_identity(response: Any, what: str, host: str) -> None:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        response.close()
        raise RegistryError(f"registry {host} sent {what} encoded ({encoding[:40]!r}) though"
                            " asked for it unencoded: refused unread")  # fmt: skip


def _body(response: Any, cap: int) -> tuple[bytes, bool]:
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
        raise _Broken
    return bytes(body), complete


class _Broken(Exception):
    """The connection broke while a body was read."""


def _read(response: Any, cap: int, what: str, host: str) -> bytes:
    """The whole body of `response` (a manifest, a token reply), refused past `cap` bytes."""
    _require_identity(response, what, host)
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > cap:
        response.close()
        raise RegistryError(f"registry {host} sent a {what} larger than {_size(cap)}",
                            "refused unread: no registry sends one that large")  # fmt: skip
    try:
        body, complete = _body(response, cap)
    except _Broken:
        raise RegistryError(f"the connection to {host} broke while reading its {what}",
                            "try again") from None  # fmt: skip
    if len(body) > cap:
        raise RegistryError(f"registry {host} sent a {what} larger than {_size(cap)}",
                            "refused: no registry sends one that large")  # fmt: skip
    if not complete:
        raise RegistryError(f"registry {host} did not send its {what} within {DEADLINE:.0f} s",
                            "try again later")  # fmt: skip
    return body


def _drain(response: Any) -> None:
    """Done with `response`: read what little is left (so that the connection is reused), or
    drop the connection; never more than ERROR_CAP."""
    try:
        if response.headers.get("Content-Encoding", "identity").lower() in ("", "identity"):
            _body(response, ERROR_CAP)
        else:
            response.close()
    except _Broken:
        pass


def _excerpt(response: Any, host: str) -> str:
    """The start of an error body, printable, for an error line (ERROR_CAP read at most)."""
    try:
        if response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
            response.close()
            return ""
        body, _ = _body(response, ERROR_CAP)
    except _Broken:
        return ""
    text = printable(" ".join(body[:ERROR_CAP].decode("utf-8", "replace").split()))
    return text[:EXCERPT] + ("..." if len(text) > EXCERPT else "")


MAX_LOCATIONS = 4096


def _locations_file() -> Path:
    from cryptlayer.paths import state_root

    return state_root() / "blob-locations.json"


def blob_locations() -> dict[str, str]:
    """Where blobs were last pushed or pulled: "HOST DIGEST" -> repository. A cache, as skopeo's
    blob-info cache: anything wrong with it means only that nothing is mounted."""
    try:
        data = json.loads(_locations_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def remember_blob(key: str, repository: str) -> None:
    from cryptlayer.fsutil import write_atomic

    known = blob_locations()
    if known.get(key) == repository:
        return
    known.pop(key, None)
    known[key] = repository
    kept = dict(list(known.items())[-MAX_LOCATIONS:])
    try:
        _locations_file().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_locations_file(), json.dumps(kept).encode(), 0o600, durable=False)
    except OSError:
        pass  # a cache that cannot be written costs a later upload, nothing else


class _Counted:
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
