"""The host's settings: /etc/cryptlayer/config.toml ($CRYPTLAYER_CONFIG), all optional.

trust = "/etc/cryptlayer/allowed_signers"   # run/start/verify --trust when not given
allow-unsigned = false                       # cryptlayer-runtime: run images no one signed
quiet-warnings = ["core-pattern"]            # warnings this host's operator has accepted
block-cache-size = "4G"                      # lazy start's ciphertext cache: bytes, or K/M/G/T
[runtime]                                    # cryptlayer-runtime's (docs/engines.md):
runtime = "crun"                             # the OCI runtime it hands over to (runc, a path)
[[keys]]                                     # the node's keys, first match wins (run/start
signer = "publisher@example"                 # without a key option, cryptlayer-runtime); one of
                                             # image = "/srv/images/app*" (a path or a glob),
                                             # digest = "sha256:...", repository = "reg/team/app"
key-file = "/etc/cryptlayer/keys/app.key"    # or identity = "/etc/cryptlayer/keys/id.pem"
                                             # (or "provider:NAME", "tpm2:/FILE", "pkcs11:URI"),
                                             # key-command = "...", keyring = "NAME"
[pull]                                       # cryptlayer-runtime's registry images:
lazy = true                                  # started lazily (false: pulled whole at create)
store = "/var/lib/cryptlayer/engine/images"  # where the whole copies go (root's, 0700)
keep = false                                 # keep the node's copy after delete (no erase)
auth-file = "/etc/cryptlayer/auth.json"      # credentials (default: where `pull` looks)
[registries."registry.example:5000"]         # one registry's TLS, the node's word only:
tls-verify = false                           # plain HTTP or unverified TLS
cert-dir = "/etc/cryptlayer/certs.d/registry.example"  # or: its CA (*.crt)
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlayer.errors import UsageError, printable

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT = Path("/etc/cryptlayer/config.toml")
KNOWN = (
    "allow-unsigned",
    "block-cache-size",
    "keys",
    "pull",
    "quiet-warnings",
    "registries",
    "runtime",
    "trust",
)
RUNTIME_KNOWN = ("runtime",)  # the [runtime] table's
# What a [[keys]] entry matches, and where its key is: exactly one of each.
KEY_MATCH = ("digest", "image", "repository", "signer")
KEY_SOURCES = ("identity", "key-command", "key-file", "keyring")
KEYS_EXAMPLE = '[[keys]] image = "/srv/images/app" key-file = "/etc/cryptlayer/keys/app.key"'
IDENTITY_KINDS = ("provider:", "pkcs11:", "tpm2:")  # identities that are not a plain path

# Every warning cryptlayer prints, by the name it carries (`warning: ... [NAME]`) and that
# quiet-warnings takes. --strict still refuses on the host's, silenced or not.
WARNINGS = {
    "swap": "swap that is not on dm-crypt (run, start)",
    "zram-writeback": "zram swap that writes idle pages to a disk (run, start)",
    "core-pattern": "a core_pattern that writes core dumps to files (run, start)",
    "hibernation": "hibernation to a device that is not on dm-crypt (run, start)",
    "erase-storage": "an image on copy-on-write or flash storage, where old copies of erased"
    " keyslots may survive (run, start, shred)",
    "signature": "a signature that does not verify, beside a trusted one (verify)",
}


def _path() -> Path:
    return Path(os.environ.get("CRYPTLAYER_CONFIG", DEFAULT))


def _settings() -> tuple[Path, dict[str, Any]]:
    """The config file's path and its settings (none when it does not exist)."""
    path = _path()
    try:
        settings = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return path, {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}", "fix or remove the file") from None
    unknown = sorted(set(settings) - set(KNOWN))
    if unknown:
        which = "setting" if len(unknown) == 1 else "settings"
        raise UsageError(
            f"{path}: unknown {which} {printable(', '.join(unknown))}"
            f" (known: {', '.join(sorted(KNOWN))})",
            "fix or remove it" if len(unknown) == 1 else "fix or remove them",
        )
    _runtime(path, settings)  # every command holds the whole file to its rules
    _keys(path, settings)
    _allow_unsigned(path, settings)
    _pull(path, settings)
    _registries(path, settings)
    _block_cache_size(path, settings)
    return path, settings


def trust(given: Path | None) -> Path | None:
    """The allowed_signers file to hold images to: `given`, else the config's, else none."""
    if given is not None:
        return given
    path, settings = _settings()
    value = settings.get("trust")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"{path}: trust is not a path", 'e.g. trust = "/etc/cryptlayer/signers"')
    return Path(value)


def quiet_warnings() -> frozenset[str]:
    """The warnings (names of WARNINGS) this host's operator silenced."""
    path, settings = _settings()
    value = settings.get("quiet-warnings", [])
    example = 'e.g. quiet-warnings = ["core-pattern"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{path}: quiet-warnings is not a list of names", example)
    unknown = [v for v in value if v not in WARNINGS]
    if unknown:
        raise UsageError(
            f"{path}: quiet-warnings names no warning {printable(unknown[0])}",
            f"the warnings are {', '.join(WARNINGS)}",
        )
    return frozenset(value)


def oci_runtime() -> str:
    """The OCI runtime cryptlayer-runtime hands over to: "crun" (the default), "runc", or an
    absolute path (`[runtime] runtime`)."""
    return _runtime(*_settings())


def _runtime(path: Path, settings: dict[str, Any]) -> str:
    table = settings.get("runtime", {})
    example = '[runtime] runtime = "runc" (or "crun", or the runtime\'s absolute path)'
    if not isinstance(table, dict):
        raise UsageError(f"{path}: runtime is not a table", f"write it as {example}")
    unknown = sorted(set(table) - set(RUNTIME_KNOWN))
    if unknown:
        raise UsageError(
            f"{path}: unknown setting {printable(unknown[0])} in [runtime]"
            f" (known: {', '.join(RUNTIME_KNOWN)})",
            "fix or remove it",
        )
    value = table.get("runtime", "crun")
    if not isinstance(value, str) or not (value in ("crun", "runc") or value.startswith("/")):
        shown = printable(value) if isinstance(value, str) else type(value).__name__
        raise UsageError(f"{path}: [runtime] runtime {shown} is not crun, runc or an absolute path",
                         f"e.g. {example}")  # fmt: skip
    if "\0" in value:
        raise UsageError(f"{path}: [runtime] runtime holds a NUL byte", f"e.g. {example}")
    return value


def allow_unsigned() -> bool:
    """Whether cryptlayer-runtime may run an image no one signed (`allow-unsigned = true`) when
    no `trust` is configured: a node runs signed images only, by default."""
    return _allow_unsigned(*_settings())


def _allow_unsigned(path: Path, settings: dict[str, Any]) -> bool:
    value = settings.get("allow-unsigned", False)
    if not isinstance(value, bool):
        raise UsageError(
            f"{path}: allow-unsigned is not true or false", "e.g. allow-unsigned = true"
        )
    return value


BLOCK_CACHE_SIZE = 4 << 30  # the default: a few images' worth of what their jobs read
MIN_BLOCK_CACHE_SIZE = 64 << 20  # a few read-ahead windows of 1 MiB chunks, for each blob


def block_cache_size() -> int:
    """The bound of lazy start's block cache in bytes (`block-cache-size`: bytes, or a number
    with K, M, G or T, powers of 1024; docs/lazy.md)."""
    return _block_cache_size(*_settings())


def _block_cache_size(path: Path, settings: dict[str, Any]) -> int:
    import re

    value = settings.get("block-cache-size", BLOCK_CACHE_SIZE)
    example = 'e.g. block-cache-size = "8G"'
    if isinstance(value, str) and (m := re.fullmatch(r"([0-9]{1,15})(?:([KMGT])i?B?)?", value)):
        value = int(m[1]) << (10 * " KMGT".index(m[2] or " "))
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{path}: block-cache-size is not a size", example)
    if value < MIN_BLOCK_CACHE_SIZE:
        raise UsageError(f"{path}: block-cache-size is below"
                         f" {MIN_BLOCK_CACHE_SIZE >> 20} MiB", example)  # fmt: skip
    return value


@dataclass(frozen=True)
class ImageKey:
    """A `[[keys]]` entry: the images it is for (one matcher) and where their key is (one
    source; the others None)."""

    image: str | None = None  # an image directory, or a glob of them
    key_file: str | None = None
    identity: str | None = None  # a private key's path, or provider:NAME, tpm2:FILE, pkcs11:URI
    signer: str | None = None  # a principal of the trust file whose key signed the image
    digest: str | None = None  # the image digest (sha256 of its statement, as --digest)
    repository: str | None = None  # the repository it was pulled from at create (the pull
    # names it, never the container spec alone: an image on the node has none)
    key_command: str | None = None
    keyring: str | None = None

    def matches(
        self,
        image: Path,
        *,
        signers: Sequence[str] = (),
        digest: str | None = None,
        repository: str | None = None,
    ) -> bool:
        """Whether this entry is for `image` (an absolute, resolved path; the path itself, or
        the glob's: fnmatch, `*` also matches `/`), whose trusted signers (OpenedImage.signers:
        each the principals of a trust file line, comma-separated) and digest were checked, and
        which was pulled from `repository` (None: not pulled). A signer is matched as the trust
        file writes it, exactly: its patterns (`*@example`) choose no key."""
        import fnmatch

        if self.image is not None:
            return fnmatch.fnmatchcase(str(image), self.image)
        if self.signer is not None:
            return any(_names(line.split(","), self.signer) for line in signers)
        if self.digest is not None:
            return digest == self.digest
        return repository is not None and repository == self.repository

    @property
    def paths(self) -> tuple[str, ...]:
        """The files its key is read from, which must be root's and writable by no one else."""
        plain = self.identity is not None and self.identity.startswith("/")
        return tuple(p for p in (self.key_file, self.identity if plain else None) if p)


def _names(patterns: Sequence[str], principal: str) -> bool:
    """Whether a trust file line's `patterns` name `principal` itself (a pattern of them does
    not: `*@example` chooses no key) and `ssh-keygen -Y verify -I PRINCIPAL` would accept it:
    OpenSSH's match_pattern_list refuses a principal any negated pattern (`!*@example`,
    `!pub?isher@example`) matches, whatever else the line lists."""
    import re

    def matches(pattern: str) -> bool:  # OpenSSH's match_pattern: `*` and `?` only
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return re.fullmatch(regex, principal, re.DOTALL) is not None

    return principal in patterns and not any(p.startswith("!") and matches(p[1:]) for p in patterns)


def image_keys() -> list[ImageKey]:
    """The `[[keys]]` entries, in order. The file that names them must be root's (its owner's)
    and writable by no one else: whoever can write it chooses the key an image is opened with."""
    path, settings = _settings()
    entries = _keys(path, settings)
    if entries:
        st = path.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UsageError(
                f"{path} names keys, but it is not {_who()}'s own file, writable by no one else"
                f" (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
                f"chown root {path}; chmod go-w {path}",
            )
    return entries


def key_for(
    image: Path,
    *,
    signers: Sequence[str] = (),
    digest: str | None = None,
    repository: str | None = None,
    otherwise: str = "",
) -> ImageKey:
    """The first `[[keys]]` entry for `image` (resolved; see ImageKey.matches); UsageError when
    none is, whose hint ends with `otherwise` (what else the user could do)."""
    resolved = image.resolve()
    for entry in image_keys():
        if entry.matches(resolved, signers=signers, digest=digest, repository=repository):
            return entry
    raise UsageError(
        f"no key for the image {printable(str(resolved))} in {_path()}",
        f"add an entry for it, e.g. {KEYS_EXAMPLE}{otherwise}",
    )


def _who() -> str:
    return "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"


def _keys(path: Path, settings: dict[str, Any]) -> list[ImageKey]:
    value = settings.get("keys", [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{path}: keys is not a list of tables", f"write each as {KEYS_EXAMPLE}")
    entries = []
    for number, table in enumerate(value, 1):
        where = f"{path}: [[keys]] entry {number}"
        unknown = sorted(set(table) - set(KEY_MATCH) - set(KEY_SOURCES))
        if unknown:
            raise UsageError(
                f"{where}: unknown setting {printable(unknown[0])}"
                f" (known: {', '.join(KEY_MATCH + KEY_SOURCES)})",
                "fix or remove it",
            )
        for kinds, what in ((KEY_MATCH, "the images it is for"), (KEY_SOURCES, "its key")):
            named = [name for name in kinds if name in table]
            if len(named) != 1:
                raise UsageError(
                    f"{where} must name exactly one of {', '.join(kinds[:-1])} and {kinds[-1]}"
                    f" ({what}){f'; it names {len(named)}' if named else ''}",
                    f"e.g. {KEYS_EXAMPLE}",
                )
        for name, text in table.items():
            _key_setting(where, name, text)
        fields = {name.replace("-", "_"): text for name, text in table.items()}
        if fields.get("image", "").endswith("/") and len(fields["image"]) > 1:
            fields["image"] = fields["image"].rstrip("/")
        entries.append(ImageKey(**fields))
    return entries


# A principal as a trust file names one (no pattern: `*@example` chooses no key), and a
# repository as host[:port]/path, without a scheme, tag or digest.
SIGNER = r"[^\s,*?!\"'\\]+"
REPOSITORY = r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+"
DIGEST = r"sha256:[0-9a-f]{64}"  # as oci.is_digest (whose module a pass-through does not load)


def _key_setting(where: str, name: str, text: object) -> None:
    """UsageError unless `text` is what the [[keys]] setting `name` takes."""
    import re

    paths = ("image", "key-file")
    if not isinstance(text, str) or not text or "\0" in text:
        what = "an absolute path" if name in paths else "a non-empty string"
        raise UsageError(f"{where}: {name} is not {what}", f"e.g. {KEYS_EXAMPLE}")
    shown = printable(text)
    if name in paths or (name == "identity" and not text.startswith(IDENTITY_KINDS)):
        if not text.startswith("/"):
            kinds = " (or provider:NAME, tpm2:/FILE, pkcs11:URI)" if name == "identity" else ""
            raise UsageError(f"{where}: {name} is not an absolute path{kinds}",
                             f"e.g. {KEYS_EXAMPLE}")  # fmt: skip
    elif name == "identity" and text.startswith("tpm2:") and not text[5:].startswith("/"):
        raise UsageError(f"{where}: identity {shown} names no absolute path",
                         'e.g. identity = "tpm2:/etc/cryptlayer/keys/node.tpm2"')  # fmt: skip
    elif name == "digest" and not re.fullmatch(DIGEST, text):
        raise UsageError(f"{where}: digest {shown} is not sha256:<64 lowercase hex digits>",
                         "copy it from `cryptlayer inspect`")  # fmt: skip
    elif name == "signer" and not re.fullmatch(SIGNER, text):
        raise UsageError(
            f"{where}: signer {shown} is not one principal",
            'name it as the trust file does, e.g. signer = "publisher@example"',
        )
    elif name == "repository" and not re.fullmatch(REPOSITORY, text):
        raise UsageError(f"{where}: repository {shown} is not a repository",
                         'name it without a scheme, tag or digest, e.g. repository ='
                         ' "registry.example/team/app"')  # fmt: skip
    elif name == "key-command":
        import shlex

        try:
            argv = shlex.split(text)
        except ValueError as err:
            raise UsageError(f"{where}: key-command {shown} does not parse: {err}",
                             "quote it as a shell would") from None  # fmt: skip
        if not argv:
            raise UsageError(f"{where}: key-command is empty", "give a program that prints the key")


# -- cryptlayer-runtime's pulls at create (docs/engines.md, "Registry images")

PULL_KNOWN = ("auth-file", "keep", "lazy", "store")  # the [pull] table's
REGISTRY_KNOWN = ("cert-dir", "tls-verify")  # a [registries."HOST[:PORT]"] table's
PULL_EXAMPLE = '[pull] store = "/var/lib/cryptlayer/engine/images"'
REGISTRY_EXAMPLE = '[registries."registry.example:5000"] tls-verify = false'


@dataclass(frozen=True)
class PullSettings:
    """The [pull] table: the store (None: the default under the state root), whether pulled
    copies are kept after delete, and the auth file (None: where `pull` looks); `lazy` (the
    default): a registry image is started lazily (docs/lazy.md), not pulled whole into the
    store."""

    store: Path | None = None
    keep: bool = False
    auth_file: Path | None = None
    lazy: bool = True


@dataclass(frozen=True)
class RegistrySettings:
    """How the node speaks to one registry: TLS verified (the default), or not (plain HTTP or
    unverified TLS), or verified with its own CA (`cert-dir`)."""

    tls_verify: bool = True
    cert_dir: Path | None = None


def pull_settings() -> PullSettings:
    return _pull(*_settings())


def registry_settings(host: str) -> RegistrySettings:
    """The node's settings for registry `host` (HOST[:PORT] as the reference has it)."""
    return _registries(*_settings()).get(host, RegistrySettings())


def _table(path: Path, settings: dict[str, Any], name: str, known: tuple[str, ...],
           example: str) -> dict[str, Any]:  # fmt: skip
    table = settings.get(name, {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: {name} is not a table", f"write it as {example}")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UsageError(f"{path}: unknown setting {printable(unknown[0])} in [{name}]"
                         f" (known: {', '.join(known)})", "fix or remove it")  # fmt: skip
    return table


def _absolute(path: Path, where: str, value: Any, example: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise UsageError(f"{path}: {where} is not an absolute path", f"e.g. {example}")
    return Path(value)


def _pull(path: Path, settings: dict[str, Any]) -> PullSettings:
    table = _table(path, settings, "pull", PULL_KNOWN, PULL_EXAMPLE)
    keep = table.get("keep", False)
    if not isinstance(keep, bool):
        raise UsageError(f"{path}: [pull] keep is not true or false", "e.g. keep = true")
    lazy = table.get("lazy", True)
    if not isinstance(lazy, bool):
        raise UsageError(f"{path}: [pull] lazy is not true or false", "e.g. lazy = false")
    store, auth = table.get("store"), table.get("auth-file")
    return PullSettings(
        None if store is None else _absolute(path, "[pull] store", store, PULL_EXAMPLE),
        keep,
        None if auth is None else _absolute(path, "[pull] auth-file", auth, PULL_EXAMPLE),
        lazy,
    )


def _registries(path: Path, settings: dict[str, Any]) -> dict[str, RegistrySettings]:
    tables = settings.get("registries", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise UsageError(f"{path}: registries is not a table of tables",
                         f"write each as {REGISTRY_EXAMPLE}")  # fmt: skip
    found = {}
    for host, table in tables.items():
        where = f'[registries."{printable(host)}"]'
        unknown = sorted(set(table) - set(REGISTRY_KNOWN))
        if unknown:
            raise UsageError(
                f"{path}: unknown setting {printable(unknown[0])} in {where}"
                f" (known: {', '.join(REGISTRY_KNOWN)})",
                "fix or remove it",
            )
        verify = table.get("tls-verify", True)
        if not isinstance(verify, bool):
            raise UsageError(f"{path}: {where} tls-verify is not true or false",
                             f"e.g. {REGISTRY_EXAMPLE}")  # fmt: skip
        cert_dir = table.get("cert-dir")
        if cert_dir is not None:
            cert_dir = _absolute(path, f"{where} cert-dir", cert_dir, REGISTRY_EXAMPLE)
        found[host] = RegistrySettings(verify, cert_dir)
    return found
