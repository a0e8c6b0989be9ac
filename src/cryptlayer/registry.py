"""A thin client of the OCI distribution spec (v1.1) over `requests`: blobs by digest (HEAD
first, cross-repository mount, monolithic upload), manifests by digest and then by tag, streamed
and verified pulls that resume. Auth as skopeo and podman do it: credentials from
$REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json or ~/.docker/config.json; Basic, or
a Bearer token from the registry's realm. (WIP, part 8.)"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .artifact import require_blob, write_checked
from .errors import TamperedImageError, UsageError

ACCEPT = "application/vnd.oci.image.manifest.v1+json"
CHUNK = 1 << 20
DEFAULT_REGISTRY = "docker.io"


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


def parse_reference(text: str) -> Reference:
    """UsageError unless `text` names a repository as skopeo would take it."""
    rest = text.removeprefix("docker://")
    digest = ""
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise UsageError(f"{text}: {digest!r} is not a sha256 digest")
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


def auth_file() -> Path:
    """Where `login` writes, as podman: $REGISTRY_AUTH_FILE, else
    ${XDG_RUNTIME_DIR}/containers/auth.json, else /run/containers/UID/auth.json."""
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return Path(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "containers/auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


def auth_files() -> list[Path]:
    """Where credentials are looked for, in podman's order (then docker's file)."""
    return [auth_file(), Path.home() / ".docker/config.json"]


def save_credentials(host: str, user: str, password: bytes | None) -> Path:
    """Add (or with None remove) HOST's credentials in auth_file(), mode 0600, atomically."""
    from .fsutil import write_atomic

    path = auth_file()
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            doc = {}
    except (OSError, ValueError):
        doc = {}
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


def credentials(host: str) -> tuple[str, str] | None:
    for path in auth_files():
        try:
            auths = json.loads(path.read_text()).get("auths", {})
        except (OSError, ValueError, AttributeError):
            continue
        entry = auths.get(host) or auths.get(f"https://{host}")
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
    return None


class Registry:
    """One repository of one registry."""

    def __init__(
        self,
        ref: Reference,
        *,
        tls_verify: bool = True,
        cert_dir: Path | None = None,
        login: tuple[str, str] | None = None,
    ):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.ref = ref
        self.scheme = "https" if tls_verify else "http"
        self.base = f"{self.scheme}://{ref.host}/v2/{ref.repository}"
        self.session = requests.Session()
        retry = Retry(total=3, connect=3, read=2, other=0, backoff_factor=0.5,
                      status_forcelist=(502, 503, 504),
                      allowed_methods=("GET", "HEAD", "PUT"))  # fmt: skip
        self.session.mount(f"{self.scheme}://", HTTPAdapter(max_retries=retry))
        # Passed with every request: a session's own setting would lose to $REQUESTS_CA_BUNDLE.
        self.verify: bool | str = True
        if cert_dir is not None:
            ca = sorted(cert_dir.glob("*.crt"))
            if not ca:
                raise UsageError(f"--cert-dir {cert_dir} holds no *.crt", "put the CA there")
            self.verify = str(ca[0])
        self._auth: str | None = None
        self._login = login  # credentials given now (login), else those of the auth files

    # -- requests with auth
    def _request(self, method: str, url: str, **kw: Any) -> Any:
        import requests

        headers = dict(kw.pop("headers", {}))
        for attempt in (0, 1):
            if self._auth:
                headers["Authorization"] = self._auth
            try:
                response = self.session.request(
                    method, url, headers=headers, timeout=60, verify=self.verify, **kw
                )
            except requests.exceptions.SSLError:
                raise UsageError(
                    f"TLS with registry {self.ref.host} failed (its certificate is not trusted)",
                    "give --cert-dir with its CA, or --tls-verify=false for a local registry",
                ) from None
            except requests.exceptions.ConnectionError:
                raise UsageError(
                    f"cannot reach registry {self.ref.host}",
                    "is it running? a plain-HTTP registry needs --tls-verify=false",
                ) from None
            if response.status_code != 401 or attempt:
                return response
            self._authenticate(response.headers.get("WWW-Authenticate", ""), url)
        return response

    def _authenticate(self, challenge: str, url: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        creds = self._login or credentials(self.ref.host)
        if scheme.lower() == "basic":
            if creds is None:
                raise _denied(self.ref.host, 401)
            self._auth = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return
        if scheme.lower() == "bearer" and "realm" in fields:
            query = {k: v for k, v in fields.items() if k in ("service", "scope")}
            if url.startswith(self.base):  # the repository's own: ask for its scope
                query.setdefault("scope", f"repository:{self.ref.repository}:pull,push")
            response = self.session.get(
                fields["realm"], params=query, auth=creds, timeout=60, verify=self.verify
            )
            if response.status_code != 200:
                raise _denied(self.ref.host, response.status_code)
            body = response.json()
            self._auth = f"Bearer {body.get('token') or body.get('access_token')}"
            return
        raise UsageError(f"registry {self.ref.host} asks for unknown auth {scheme!r}")

    def _check(self, response: Any, what: str) -> Any:
        if response.status_code in (401, 403):
            raise _denied(self.ref.host, response.status_code)
        if response.status_code == 404:
            raise UsageError(f"{self.ref} has no {what}", "check the repository and tag")
        if response.status_code >= 400:
            raise UsageError(
                f"{self.ref}: {what}: HTTP {response.status_code} {response.text[:200]}"
            )
        return response

    def ping(self) -> None:
        """GET /v2/ (authenticating as the registry asks); UsageError if refused."""
        url = f"{self.scheme}://{self.ref.host}/v2/"
        self._check(self._request("GET", url), "API (/v2/)")

    # -- blobs
    def has_blob(self, digest: str) -> bool:
        response = self._request("HEAD", f"{self.base}/blobs/{digest}")
        if response.status_code == 404:
            return False
        return bool(self._check(response, f"blob {digest}").status_code == 200)

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
        if response.status_code == 201:  # mounted: nothing to send
            self.seen(digest)
            return False
        location = response.headers["Location"]
        if location.startswith("/"):
            location = f"{self.scheme}://{self.ref.host}{location}"
        response = self._request(
            "PUT", location, params={"digest": digest}, data=_Counted(blob, size, progress),
            headers={"Content-Type": "application/octet-stream"},
        )  # fmt: skip
        self._check(response, f"upload of {digest}")
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
            response = self._request("GET", f"{self.base}/blobs/{digest}", headers=headers,
                                     stream=True)  # fmt: skip
            self._check(response, f"blob {digest}")
            if have and response.status_code != 206:  # no range support: start over
                h, have = hashlib.sha256(), 0
                out.seek(0)
                out.truncate()
            have = write_checked(response.iter_content(CHUNK), out, h, have, size, progress)
        require_blob(h, have, digest, size, f"from {self.ref.host}",
                     "the registry or the network changed it; pull again")  # fmt: skip
        self.seen(digest)

    # -- manifests
    def put_manifest(self, data: bytes, digest: str) -> None:
        """By digest, then under the tag: a half-finished push is never visible under it."""
        refs = [digest] + ([] if self.ref.digest else [self.ref.tag or "latest"])
        for ref in refs:
            response = self._request("PUT", f"{self.base}/manifests/{ref}", data=data,
                                     headers={"Content-Type": ACCEPT})  # fmt: skip
            self._check(response, f"manifest {ref}")

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
        data = response.content[: 4 << 20]
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if ref.startswith("sha256:") and digest != ref:
            raise TamperedImageError(f"manifest {ref} from {self.ref.host} has digest {digest}")
        return data, digest

    def read_small_blob(self, digest: str, size: int, limit: int) -> bytes:
        """Blob `digest` of `size` bytes into memory, its sha256 checked; refused unasked when
        `size` is over `limit`, and never more than `size` bytes read (for `inspect`)."""
        if size > limit:
            raise UsageError(
                f"{self.ref}: blob {digest} is {size} bytes, more than {limit}",
                "this is not a cryptlayer image as this version knows one",
            )
        response = self._check(
            self._request("GET", f"{self.base}/blobs/{digest}", stream=True,
                          headers={"Accept-Encoding": "identity"}),
            f"blob {digest}",
        )  # fmt: skip
        data = bytearray()
        with response:
            # The bytes as sent, never decompressed: a small gzip body must not become gigabytes.
            for chunk in response.raw.stream(CHUNK, decode_content=False):
                data += chunk
                if len(data) > size:
                    break
        if len(data) != size or f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise TamperedImageError(
                f"blob {digest} from {self.ref.host} does not match its digest",
                "the registry or the network changed it",
            )
        return bytes(data)


def _denied(host: str, status: int) -> UsageError:
    return UsageError(f"registry {host} refused access (HTTP {status})",
                      f"log in first: cryptlayer login {host}")  # fmt: skip


MAX_LOCATIONS = 4096


def _locations_file() -> Path:
    from .paths import state_root

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
    from .fsutil import write_atomic

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

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        chunk: bytes = self.f.read(n if n and n > 0 else CHUNK)
        self.done += len(chunk)
        self.progress(self.done)
        return chunk
