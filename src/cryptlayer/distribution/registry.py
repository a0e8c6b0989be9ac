"""A thin client of the OCI distribution spec (v1.1) over `requests`: blobs by digest (HEAD
first, cross-repository mount, monolithic upload), manifests by digest and then by tag, streamed
and verified pulls that resume. Auth as skopeo and podman do it: credentials from --authfile,
$REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json or ~/.docker/config.json; Basic, or
a Bearer token from the registry's realm.

The registry is untrusted input, as an image is: credentials go only to the registry's own host
(and a token server it names over https), every body is read with a cap before it is parsed,
replies are asked for and taken unencoded, and every request has a deadline.

Here: references and the spec's requests. HTTP with an untrusted server (deadlines, capped
bodies, redirects, TLS) is wire.py; credentials and the challenges they answer are auth.py."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin

from cryptlayer import oci
from cryptlayer.distribution import wire
from cryptlayer.distribution.auth import Auth
from cryptlayer.distribution.wire import RegistryError
from cryptlayer.errors import TamperedImageError, UsageError, printable
from cryptlayer.fsutil import MAX_IMAGE_JSON

ACCEPT = "application/vnd.oci.image.manifest.v1+json"
DEFAULT_REGISTRY = "docker.io"
# Transports of containers/image that cryptlayer does not speak.
_TRANSPORTS = ("oci-archive", "docker-archive", "docker-daemon", "dir", "containers-storage",
               "ostree", "sif", "tarball")  # fmt: skip


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
        self.ref = ref
        self.conn = wire.Connection(ref.host, tls_verify=tls_verify, cert_dir=cert_dir)
        self.auth = Auth(self.conn, ref.repository, login, authfile)

    @property
    def base(self) -> str:
        return f"{self.conn.root}v2/{self.ref.repository}"

    def _request(self, method: str, url: str, *, budget: float | None = None, **kw: Any) -> Any:
        """One request, authenticated as the registry asks, its reply's body not yet read
        (stream): read it with wire.read_capped, wire.drain or wire.stream."""
        headers = dict(kw.pop("headers", {}))
        with wire.deadline(wire.DEADLINE if budget is None else budget, self.ref.host):
            for attempt in (0, 1):
                url = self.conn.scheme_of(url)
                response = self.conn.send(method, url, headers, self.auth.header, **kw)
                # Only the registry's own 401 counts: a host it redirected to (a CDN) does not
                # get to name where the registry's credentials go.
                if response.status_code != 401 or attempt or not self.conn.own(response.url):
                    return response
                challenge = response.headers.get("WWW-Authenticate", "")
                wire.drain(response)
                self.auth.authenticate(challenge, url)
        return response

    def _check(self, response: Any, what: str) -> Any:
        status = response.status_code
        if 200 <= status < 300:
            return response
        excerpt = wire.excerpt(response, self.ref.host)
        if status in (401, 403):
            raise self.auth.denied(response.url, status)
        if status == 404:
            raise UsageError(f"{self.ref} has no {what}", "check the repository and tag")
        raise RegistryError(f"{self.ref}: {what}: HTTP {status} {excerpt}".rstrip())

    def ping(self) -> None:
        """GET /v2/ (authenticating as the registry asks); UsageError if refused."""
        url = f"{self.conn.root}v2/"
        wire.drain(self._check(self._request("GET", url), "API (/v2/)"))

    # -- blobs
    def has_blob(self, digest: str) -> bool:
        response = self._request("HEAD", f"{self.base}/blobs/{digest}")
        if response.status_code == 404:
            wire.drain(response)
            return False
        found = bool(self._check(response, f"blob {digest}").status_code == 200)
        wire.drain(response)
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
        wire.drain(response)
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
        if not wire.origin(location)[0].startswith("http"):  # "" where it is no URL
            raise RegistryError(f"registry {self.ref.host} started an upload at"
                                f" {said[:wire.EXCERPT]!r},"
                                " which is not an http or https URL")  # fmt: skip
        response = self._request(
            "PUT", location, params={"digest": digest}, data=wire.Counted(blob, size, progress),
            headers={"Content-Type": "application/octet-stream"},
            budget=wire.DEADLINE + size / wire.MIN_RATE,
        )  # fmt: skip
        wire.drain(self._check(response, f"upload of {digest}"))
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
        # (here, not at the top: the lazy server imports this module, and artifact brings the
        # image's manifest, envelope, signatures and keys, which it does not need)
        from cryptlayer.distribution.artifact import require_blob, write_checked

        h = hashlib.sha256()
        out.seek(0)
        have = 0
        while chunk := out.read(wire.CHUNK):
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
            body = wire.stream(response, size - have, f"blob {digest}", self.ref.host)
            have = write_checked(body, out, h, have, size, progress)
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
            wire.drain(self._check(response, f"manifest {ref}"))

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
        data = wire.read_capped(response, MAX_IMAGE_JSON, f"manifest {ref}", self.ref.host)
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
            data, complete = wire.read_body(response, size)
        except wire.Broken:
            raise RegistryError(f"the connection to {self.ref.host} broke while reading blob"
                                f" {digest}", "try again") from None  # fmt: skip
        if not complete and len(data) <= size:
            raise RegistryError(f"registry {self.ref.host} did not send blob {digest} within"
                                f" {wire.DEADLINE:.0f} s", "try again later")  # fmt: skip
        if len(data) != size or oci.digest_of(data) != digest:
            raise TamperedImageError(
                f"blob {digest} from {self.ref.host} does not match its digest",
                "the registry or the network changed it",
            )
        return bytes(data)


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
