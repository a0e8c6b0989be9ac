"""Registry credentials: where podman and docker keep them (auth files), and how they answer
a registry's challenge (Basic, or a Bearer token from the token server it names)."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Any

from cryptlayer.distribution import wire
from cryptlayer.distribution.wire import RegistryError
from cryptlayer.errors import CryptlayerError, UsageError

AUTH_FILE_CAP = 1 << 20
TOKEN_CAP = 1 << 20  # a token reply (JWTs run to a few KiB)


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


class Auth:
    """The Authorization header one repository's requests carry: none until the registry
    challenges, then Basic, or a Bearer token from the token server it names."""

    def __init__(
        self,
        conn: wire.Connection,
        repository: str,
        login: tuple[str, str] | None = None,
        authfile: Path | None = None,
    ):
        self.conn = conn
        self.host = conn.host
        self.repository = repository
        self.header: str | None = None
        self._login = login  # credentials given now (login, --creds), else the auth files'
        self._stored = False  # whether the credentials in use came from an auth file
        self.authfile = authfile

    @property
    def base(self) -> str:
        return f"{self.conn.root}v2/{self.repository}"

    def authenticate(self, challenge: str, url: str) -> None:
        """Answer the registry's 401 `challenge` to `url`: the header set for what follows."""
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        creds = self._login
        if creds is None:
            creds = credentials(self.host, self.repository, self.authfile)
            self._stored = creds is not None
        if scheme.lower() == "basic":
            if creds is None:
                raise self.denied(url, 401)
            self.header = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return
        if scheme.lower() == "bearer" and "realm" in fields:
            realm = fields["realm"]
            creds = self._realm_may_have(realm, creds)
            query = {k: v for k, v in fields.items() if k in ("service", "scope")}
            if url.startswith(self.base):  # the repository's own: ask for its scope
                query.setdefault("scope", f"repository:{self.repository}:pull,push")
            self.header = f"Bearer {self._token(realm, query, creds)}"
            return
        raise RegistryError(f"registry {self.host} asks for unknown auth {scheme[:40]!r}")

    def _realm_may_have(self, realm: str, creds: tuple[str, str] | None) -> Any:
        """The credentials the token server `realm` may receive: with TLS verified, an https
        realm (any host: the registry proved who it is, and Docker Hub's is auth.docker.io);
        without, only a realm on the registry's own host name (nothing proves who named it)."""
        scheme, host, _ = wire.origin(realm)  # "" if urllib3 would connect elsewhere
        if scheme not in ("http", "https") or not host:
            raise RegistryError(f"registry {self.host} names a token server that is not a URL"
                                f" ({realm[:wire.EXCERPT]!r})")  # fmt: skip
        if self.conn.tls_verify and scheme != "https":
            raise RegistryError(
                f"registry {self.host} names a token server over plain HTTP"
                f" ({realm[: wire.EXCERPT]}): refused, it would receive credentials in clear",
                "its realm must be https while TLS is verified",
            )
        if creds is not None and not self.conn.tls_verify and host != wire.origin(self.base)[1]:
            raise RegistryError(
                f"registry {self.host} names a token server on another host ({host}):"
                " with --tls-verify=false credentials go only to the registry's own host",
                "verify TLS (--cert-dir DIR) to use that token server",
            )
        return creds

    def _token(self, realm: str, query: dict[str, str], creds: Any) -> str:
        """A token from the token server `realm` (its reply capped at TOKEN_CAP)."""
        import requests

        try:
            response = self.conn.session.get(realm, params=query, auth=creds,
                                             timeout=wire.READ_TIMEOUT, verify=self.conn.verify,
                                             allow_redirects=False, stream=True)  # fmt: skip
        except requests.exceptions.SSLError as err:
            raise self.conn.tls_failed(realm, err) from None
        except requests.exceptions.RequestException as err:
            raise self.conn.unreachable(realm, err) from None
        except ValueError:  # urllib3's LocationParseError
            raise self.conn.no_address(realm) from None
        if response.status_code != 200:
            wire.drain(response)
            raise self.denied(self.base, response.status_code)
        body = wire.read_capped(response, TOKEN_CAP, "token reply", wire.origin(realm)[1])
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not re.fullmatch(r"[!-~]+", token):
            raise RegistryError(f"the token server of registry {self.host} sent no token"
                                ' (its reply is not a JSON object with a "token")')  # fmt: skip
        return token

    def denied(self, url: str, status: int) -> CryptlayerError:
        """The error for a 401 or 403 from `url`, with what to do about it."""
        if not self.conn.own(url):
            return RegistryError(
                f"{wire.place(url)}, where registry {self.host} sent us, refused access"
                f" (HTTP {status})", f"credentials are sent only to {self.host} itself"
            )  # fmt: skip
        if self._login is not None:
            hint = "check the user name and password"
        else:
            again = "again" if self._stored else "first"
            # where this command looks: a login that wrote elsewhere would not be found
            where = f"--authfile {shlex.quote(str(self.authfile))} " if self.authfile else ""
            hint = f"log in {again}: cryptlayer login {where}--username USER {self.host}"
        return UsageError(f"registry {self.host} refused access (HTTP {status})", hint)
