"""Identities in a PKCS#11 token (an HSM, a smart card, SoftHSM): an RSA key that never leaves it.

`--identity 'pkcs11:token=LABEL;object=LABEL'` (an RFC 7512 URI; `id=`, `serial=`,
`manufacturer=`, `model=` narrow it, `type=private` is implied) names an RSA private key in a
token. `build --recipient` takes the token's public key as an ordinary RSA recipient (PEM); the
token does the raw RSA (CKM_RSA_X_509), keys/heldkey.py the OAEP. The module is the URI's
`module-path=` query attribute (absolute; root's or the user's own, writable by no one else:
it runs as root with the PIN and the key), else p11-kit's proxy (every module p11-kit knows).
The PIN comes from `pin-source=file:PATH` (or a path), else the terminal (echo off), else the
first line of standard input; `pin-value=` is refused (it would put the PIN on a command line).
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from cryptlayer.errors import CryptlayerError, UsageError, WrongKeyError, printable
from cryptlayer.keys.heldkey import HeldKey
from cryptlayer.secret import Secret

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

PREFIX = "pkcs11:"
TOKEN_ATTRIBUTES = ("token", "serial", "manufacturer", "model")
PATH_ATTRIBUTES = (*TOKEN_ATTRIBUTES, "object", "id", "type")
QUERY_ATTRIBUTES = ("module-path", "pin-source")
# where Debian (and most distributions) put p11-kit's proxy module
P11_KIT_PROXY = (
    "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib64/p11-kit-proxy.so",
    "/usr/lib/p11-kit-proxy.so",
)
MAX_PIN = 256
EXAMPLE = "pkcs11:token=my-token;object=my-key?module-path=/usr/lib/softhsm/libsofthsm2.so"


class TokenError(CryptlayerError):
    """The token or its module failed."""


def parse_uri(uri: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """(path attributes, query attributes) of an RFC 7512 URI, percent-decoded; UsageError for
    what cryptlayer does not take (pin-value, module-name, an unknown attribute, one twice)."""
    body = uri.removeprefix(PREFIX)
    path_part, _, query_part = body.partition("?")
    path: dict[str, bytes] = {}
    query: dict[str, str] = {}
    for part, known, into in (
        (path_part, PATH_ATTRIBUTES, path),
        (query_part, QUERY_ATTRIBUTES, query),
    ):
        for item in filter(None, part.split(";" if into is path else "&")):
            name, eq, value = item.partition("=")
            if name == "pin-value":
                raise UsageError(
                    "the PKCS#11 URI holds pin-value: a PIN on a command line is visible to every"
                    " user of the machine",
                    "give pin-source=file:PATH (a file only you can read), or type it when asked",
                )
            if not eq or name not in known:
                raise UsageError(
                    f"the PKCS#11 URI's attribute {printable(item)} is not one cryptlayer takes",
                    f"use {', '.join(PATH_ATTRIBUTES)} and ?{'&'.join(QUERY_ATTRIBUTES)};"
                    f" e.g. {EXAMPLE}",
                )
            if name in path or name in query:
                raise UsageError(f"the PKCS#11 URI gives {name} twice")
            raw = unquote_to_bytes(value)
            if into is path:
                path[name] = raw
            else:
                query[name] = raw.decode(errors="replace")
    if "object" not in path and "id" not in path:
        raise UsageError(f"the PKCS#11 URI {printable(uri)} names no key", f"e.g. {EXAMPLE}")
    if path.get("type", b"private") != b"private":
        raise UsageError("the PKCS#11 URI's type must be private (the key that unwraps)")
    return path, query


def _module(query: dict[str, str]) -> str:
    if "module-path" in query:
        return _checked_module(query["module-path"])
    found = next((p for p in P11_KIT_PROXY if os.path.exists(p)), None)
    if found is None:
        raise UsageError(
            "no PKCS#11 module to load: the URI has no module-path and p11-kit's proxy is not"
            " installed",
            f"add ?module-path=/path/to/module.so (e.g. {EXAMPLE}), or install p11-kit-modules",
        )
    return _checked_module(found)


def _checked_module(path: str) -> str:
    """`path`, if it may be loaded: the module runs in this process (as root) with the PIN and
    the image key, so it is held as a key provider's program is: an absolute path (dlopen would
    search the library path), a regular file of root's or of the user running cryptlayer,
    writable by no one else."""
    shown = printable(path)
    if not path.startswith("/"):
        raise UsageError(
            f"the PKCS#11 module {shown} is not an absolute path",
            f"give module-path=/path/to/module.so (e.g. {EXAMPLE})",
        )
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot load the PKCS#11 module {shown}: {err.strerror}") from None
    try:
        _check_module(path, os.fstat(fd))
    finally:
        os.close(fd)
    return path


def _check_module(path: str, st: os.stat_result) -> None:
    shown = printable(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        who = "root's" if os.geteuid() == 0 else f"root's or uid {os.geteuid()}'s"
        raise UsageError(
            f"the PKCS#11 module {shown} is not {who} own regular file, writable by no one else"
            f" (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
            f"it runs with the PIN and the image key: chown root {shown}; chmod go-w {shown}",
        )


def _pin_from_file(source: str) -> Secret:
    path = source.removeprefix("file://") if source.startswith("file://") else source
    path = path.removeprefix("file:")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise UsageError(f"cannot read the PIN file {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"the PIN file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(
                f"the PIN file {path} is accessible by others"
                f" (mode {stat.S_IMODE(st.st_mode):04o})",
                f"chmod 600 {path}",
            )
        data = bytearray(os.read(fd, MAX_PIN + 1))
    finally:
        os.close(fd)
    end = data.find(b"\n")
    if end >= 0:
        del data[end:]
    if not data or len(data) > MAX_PIN:
        data[:] = bytes(len(data))
        raise UsageError(f"the PIN file {path} holds no PIN of at most {MAX_PIN} bytes")
    return Secret(data)


def _pin(query: dict[str, str], token: str) -> Secret:
    if "pin-source" in query:
        return _pin_from_file(query["pin-source"])
    from cryptlayer.keys.sources import NoPassphraseError, read_passphrase

    try:
        return read_passphrase(f"PIN for token {token}: ", confirm=False)
    except NoPassphraseError:
        raise UsageError(
            f"no PIN for token {token}",
            "type it when asked, give it on standard input, or add pin-source=file:PATH",
        ) from None


def _matches(token: Any, path: dict[str, bytes]) -> bool:
    wanted = {
        "token": token.label,
        "serial": token.serial.decode(errors="replace").strip(),
        "manufacturer": token.manufacturer_id,
        "model": token.model,
    }
    return all(
        path[name].decode(errors="replace") == value
        for name, value in wanted.items()
        if name in path
    )


# A module is initialized once per process (PKCS#11 allows one C_Initialize).
_LIBS: dict[str, Any] = {}


def _lib(module: str) -> Any:
    import pkcs11

    if module not in _LIBS:
        try:  # the file checked is the file loaded: through this descriptor, not the path
            fd = os.open(module, os.O_PATH | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"cannot load the PKCS#11 module {module}: {err.strerror}") from None
        try:
            _check_module(module, os.fstat(fd))
            _LIBS[module] = pkcs11.lib(f"/proc/self/fd/{fd}")
        except (pkcs11.exceptions.PKCS11Error, RuntimeError, OSError) as err:
            raise UsageError(
                f"cannot load the PKCS#11 module {module}: {err}",
                "give the path of the token's PKCS#11 module as module-path=",
            ) from None
        finally:
            os.close(fd)
    return _LIBS[module]


def _find_token(path: dict[str, bytes], module: str) -> Any:
    import pkcs11

    try:
        tokens = [t for t in _lib(module).get_tokens() if _matches(t, path)]
    except pkcs11.exceptions.PKCS11Error as err:
        raise TokenError(f"the PKCS#11 module {module} failed: {type(err).__name__}") from None
    named = ", ".join(f"{n}={printable(path[n].decode(errors='replace'))}"
                      for n in TOKEN_ATTRIBUTES if n in path)  # fmt: skip
    if not tokens:
        raise UsageError(
            f"no PKCS#11 token matches {named or 'the URI'} in {module}",
            "is it plugged in? `p11tool --list-tokens` (or the module's own tool) lists them",
        )
    if len(tokens) > 1:
        raise UsageError(
            f"{len(tokens)} PKCS#11 tokens match {named or 'the URI'} in {module}",
            "add token=LABEL or serial=SERIAL to the URI",
        )
    return tokens[0]


class TokenKey(HeldKey):
    """An RSA private key in a token. Each use is one session, logged in and closed again (the
    token logs out with its last session); the PIN is kept, wipeable, until the process ends."""

    def __init__(self, uri: str, path: dict[str, bytes], token: Any, pin: Secret) -> None:
        self.path = printable(uri)
        self._attrs = path
        self._token = token
        self._pin = pin
        self._public: RSAPublicKey | None = None

    def _session(self) -> Any:
        import pkcs11

        label = self._token.label
        with self._pin.view() as data:
            try:
                # python-pkcs11 takes the PIN as str (and makes bytes of it): not wipeable there
                return self._token.open(user_pin=bytes(data).decode(errors="strict"))
            except UnicodeDecodeError:
                raise UsageError("the PIN is not UTF-8 text") from None
            except (pkcs11.exceptions.PinIncorrect, pkcs11.exceptions.PinInvalid,
                    pkcs11.exceptions.PinLenRange):  # fmt: skip
                raise WrongKeyError(
                    f"the PIN for token {label} is wrong",
                    "try again (a token locks itself after a few wrong PINs)",
                ) from None
            except pkcs11.exceptions.PinLocked:
                raise WrongKeyError(
                    f"token {label} is locked (too many wrong PINs)",
                    "unlock it with its SO PIN (the token's own tool)",
                ) from None
            except pkcs11.exceptions.PKCS11Error as err:
                raise TokenError(f"cannot log in to token {label}: {type(err).__name__}") from None

    def _key(self, session: Any) -> Any:
        from pkcs11 import Attribute, KeyType, ObjectClass

        attrs: dict[Any, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if "object" in self._attrs:
            attrs[Attribute.LABEL] = self._attrs["object"].decode(errors="replace")
        if "id" in self._attrs:
            attrs[Attribute.ID] = self._attrs["id"]
        keys = list(session.get_objects(attrs))
        what = ", ".join(
            f"{n}={printable(self._attrs[n].decode(errors='replace'))}"
            for n in ("object", "id")
            if n in self._attrs
        )
        label = self._token.label
        if len(keys) != 1:
            raise UsageError(
                f"token {label} has {len(keys) or 'no'} private keys with {what}",
                "add id= to the URI to name one"
                if keys
                else "`p11tool --list-privkeys --login URL` lists them",
            )
        if keys[0][Attribute.KEY_TYPE] != KeyType.RSA:
            raise UsageError(f"the key {what} in token {label} is not an RSA key")
        return keys[0]

    def load(self) -> None:
        """Log in and find the key: its public half (a wrong PIN, no such key: errors here)."""
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
        from pkcs11 import Attribute

        with self._session() as session:
            key = self._key(session)
            n = int.from_bytes(key[Attribute.MODULUS], "big")
            e = int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big")
        self._public = RSAPublicNumbers(e, n).public_key()

    def public_key(self) -> RSAPublicKey:
        assert self._public is not None
        return self._public

    def raw_decrypt(self, ciphertext: bytes) -> bytearray:
        import pkcs11

        with self._session() as session:
            key = self._key(session)
            try:
                # python-pkcs11 returns bytes: copied at once, as the cryptography path does
                return bytearray(key.decrypt(ciphertext, mechanism=pkcs11.Mechanism.RSA_X_509))
            except (pkcs11.exceptions.MechanismInvalid, pkcs11.exceptions.FunctionNotSupported):
                raise TokenError(
                    f"the key {self.path} does not do raw RSA (CKM_RSA_X_509) for decryption",
                    "cryptlayer needs it for RSA-OAEP with SHA-256; use a key that allows it",
                ) from None
            except pkcs11.exceptions.PKCS11Error as err:
                raise TokenError(
                    f"the token failed to decrypt with {self.path}: {type(err).__name__}"
                ) from None


def load_key(uri: str) -> TokenKey:
    """The key `uri` names: token found, PIN asked for (or read), logged in, key found."""
    path, query = parse_uri(uri)
    token = _find_token(path, _module(query))
    pin = _pin(query, token.label)
    held = TokenKey(uri, path, token, pin)
    try:
        held.load()
    except BaseException:
        pin.wipe()
        raise
    return held
