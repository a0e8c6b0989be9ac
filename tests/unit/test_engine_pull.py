"""cryptlayer-runtime pulls a registry image at `create` where the node says `[pull] lazy =
false` (engine/store.py, docs/engines.md, "Registry images"; lazily otherwise:
test_engine_lazy.py): into the node's store (root's, 0700), one copy per container, under the
node's trust, TLS and credentials (never the spec's), the digest pinned; removed at delete
unless kept; nothing left by a create that fails. A real registry (Debian's docker-registry)
and fake images (luksfixtures); the assembly is stood in, as in test_engine_images.py: what
container.start is given, and what is left in the store, is what these tests look at."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from enginefixtures import push_signed
from registryfixtures import PASSWORD, USER, RunningRegistry

from cryptlayer import config
from cryptlayer.distribution.registry import Registry
from cryptlayer.engine import encrypted, store
from cryptlayer.errors import CryptlayerError, TamperedImageError, UsageError
from cryptlayer.runtime import container, state
from cryptlayer.runtime.state import Mode, Record

KEY = b"k" * 32  # fake_image's


@dataclass
class Node:
    """The node's config, store and state, the image pushed (signed), and what the stood-in
    assembly was given."""

    base: Path
    conf: Path
    store: Path
    trust: Path
    ref: str  # docker://HOST/team/app:v1, signed
    unsigned: str  # docker://HOST/team/unsigned:v1
    digest: str  # the image digest of both
    host: str
    started: list[dict[str, Any]] = field(default_factory=list)

    def write_conf(self, extra: str = "", registry: str | None = None,
                   match: str | None = None) -> None:  # fmt: skip
        host = self.host if registry is None else registry
        match = f'image = "{self.store}/*"' if match is None else match
        self.conf.write_text(f"""trust = "{self.trust}"
[[keys]]
{match}
key-file = "{self.base}/app.key"
[pull]
store = "{self.store}"
lazy = false
{extra}
[registries."{host}"]
tls-verify = false
""")

    def left(self) -> list[str]:
        return sorted(os.listdir(self.store)) if self.store.exists() else []


@pytest.fixture(scope="module")
def pushed(plain: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return push_signed(plain.host, tmp_path_factory.mktemp("pushed"))


@pytest.fixture
def node(plain: RunningRegistry, pushed: dict[str, str], tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Node:  # fmt: skip
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "app.key").write_bytes(KEY)
    (tmp_path / "app.key").chmod(0o600)
    found = Node(tmp_path, tmp_path / "config.toml", tmp_path / "node/store", Path(pushed["trust"]),
                 f"docker://{plain.host}/team/app:v1", f"docker://{plain.host}/team/unsigned:v1",
                 pushed["digest"], plain.host)  # fmt: skip
    found.write_conf()

    def start(image: Path, credential: Any, options: container.StartOptions) -> Record:
        # the node's key, chosen as container.start chooses it once the image is open and checked
        credential = credential.choose(Path(image), signers=(),
                                       digest=options.digest or "sha256:" + "0" * 64)  # fmt: skip
        with credential.key.view() as data:
            key = bytes(data)
        assert (Path(image) / "manifest.json").is_file()  # the whole copy, before assembly
        found.started.append({"image": Path(image), "key": key, "shred": options.shred,
                              "digest": options.digest, "trust": options.trust})  # fmt: skip
        if key != KEY:
            raise UsageError("the key does not open this image")
        rootfs = tmp_path / "rootfs" / options.name
        rootfs.mkdir(parents=True, exist_ok=True)
        with state.locked():
            return state.create(Record(options.name, str(image), options.shred, Mode.START, 0,
                                       rootfs=str(rootfs)))  # fmt: skip

    def stop(name: str, force: bool = False) -> Record:
        with state.locked():
            record = state.load(name)
            state.remove(record)
        record.shredded = record.shred  # (erased at start, as a shredding container is)
        return record

    monkeypatch.setattr(container, "start", start)
    monkeypatch.setattr(container, "stop", stop)
    return found


def bundle(tmp_path: Path, annotations: dict[str, str], name: str = "bundle") -> str:
    path = tmp_path / name
    path.mkdir()
    spec = {"process": {"args": ["/app"], "env": ["PATH=/bin"]}, "root": {"path": "rootfs"},
            "annotations": annotations}  # fmt: skip
    (path / "config.json").write_text(json.dumps(spec))
    return str(path / "config.json")


def create(node: Node, cid: str, image: str, **annotations: str) -> str:
    notes = {"org.cryptlayer.image": image} | {f"org.cryptlayer.{k}": v
                                                for k, v in annotations.items()}  # fmt: skip
    config_path = bundle(node.base, notes, f"bundle-{len(list(node.base.glob('bundle-*')))}")
    spec = json.loads(Path(config_path).read_text())
    return encrypted.assemble(spec, image, cid, config_path)


def fails(node: Node, cid: str, image: str, **annotations: str) -> CryptlayerError:
    with pytest.raises(CryptlayerError) as err:
        create(node, cid, image, **annotations)
    assert not state.records_dir().exists() or not list(state.records_dir().iterdir())
    assert node.left() == []  # no copy, no work directory
    return err.value


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The digests of the blobs fetched from the registry."""
    got: list[str] = []
    original = Registry.pull_blob

    def counting(self: Registry, digest: str, *args: Any) -> None:
        got.append(digest)
        original(self, digest, *args)

    monkeypatch.setattr(Registry, "pull_blob", counting)
    return got


# -- the whole way


def test_the_key_of_a_pulled_image_is_chosen_by_its_repository(node: Node) -> None:
    """`[[keys]] repository = "HOST/team/app"` gives the key of an image this create pulled from
    there; no entry matches another repository's."""
    node.write_conf(match=f'repository = "{node.host}/team/app"')
    name = create(node, "c1", node.ref, digest=node.digest)
    assert node.started[0]["key"] == KEY
    encrypted.stop(name)
    node.write_conf(match=f'repository = "{node.host}/team/other"')
    err = fails(node, "c2", node.ref, digest=node.digest)
    assert "no key for the image" in str(err)


def test_a_registry_image_is_pulled_assembled_and_removed(node: Node, fetched: list[str]) -> None:
    name = create(node, "c1", node.ref, digest=node.digest)
    copy = node.store / name
    assert node.started == [{"image": copy, "key": KEY, "shred": True, "digest": node.digest,
                             "trust": node.trust}]  # fmt: skip
    assert sorted(os.listdir(copy)) == ["keys.json", "layer0.luks", "layer0.verity",
                                        "manifest.json", "signatures"]  # fmt: skip
    st = node.store.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    assert node.left() == [name]
    rewritten = json.loads((node.base / "bundle-0/config.json").read_text())
    assert rewritten["root"]["path"] == f"{node.base}/rootfs/{name}"
    encrypted.stop(name)
    assert node.left() == []
    # a restart (delete, then create under the same id) pulls again
    fetched.clear()
    assert create(node, "c1", node.ref) == name
    assert len(fetched) == 5 and node.left() == [name]  # with keys.json and a signature
    encrypted.stop(name)
    assert node.left() == []


def test_keep_keeps_the_copy_and_a_restart_reuses_it(node: Node, fetched: list[str]) -> None:
    name = create(node, "c1", node.ref, keep="true")
    assert node.started[-1]["shred"] is False
    encrypted.stop(name)
    assert node.left() == [name]
    fetched.clear()
    create(node, "c1", node.ref)  # checked file by file, nothing fetched; shredded this time
    assert fetched == [] and node.started[-1]["shred"] is True
    encrypted.stop(name)
    assert node.left() == []
    # or the node's config says keep
    node.write_conf("keep = true")
    encrypted.stop(create(node, "c2", node.ref))
    assert node.started[-1]["shred"] is False and node.left() == ["engine-c2"]


def test_a_kept_copy_of_another_image_is_replaced(node: Node, pushed: dict[str, str]) -> None:
    """The tag moved (or the kept copy was shredded since): pulled anew, not refused."""
    name = create(node, "c1", node.ref, keep="true")
    encrypted.stop(name)
    with open(node.store / name / "layer0.luks", "r+b") as f:
        f.write(b"\0" * 4096)  # as an erase of its keyslots would leave it
    create(node, "c1", node.ref)
    layer = (node.store / name / "layer0.luks").read_bytes()
    assert layer == Path(pushed["image"], "layer0.luks").read_bytes()


def test_two_containers_of_one_image_at_once(node: Node) -> None:
    first = create(node, "c1", node.ref)
    second = create(node, "c2", node.ref)
    assert node.left() == sorted([first, second])
    encrypted.stop(first)
    assert node.left() == [second]  # one's delete leaves the other's copy
    assert (node.store / second / "layer0.luks").stat().st_size > 0
    encrypted.stop(second)
    assert node.left() == []


def test_a_spec_naming_a_copy_in_the_store_by_path_is_refused(node: Node, tmp_path: Path) -> None:
    """Another container's copy (running, or kept) is that container's: a spec naming it by
    its path (as is, through `..`, or through a symbolic link) would open it with the node's key
    and, at its own delete, shred it under the other container (found by review)."""
    victim = create(node, "c1", node.ref, keep="true")
    copy = node.store / victim
    link = tmp_path / "link"
    link.symlink_to(copy)
    for path in (str(copy), f"{node.store}/../store/{victim}", str(link), str(node.store),
                 f"{copy}/."):  # fmt: skip
        with pytest.raises(UsageError, match="in the node's pull store"):
            create(node, "c2", path)
    assert len(node.started) == 1 and node.left() == [victim]
    encrypted.stop(victim)


def test_a_delete_removes_its_own_pull_work_only(node: Node) -> None:
    """The container `a` removes `.engine-a.pull-DIGEST12`, never the work directory of the
    container `a.pull-x`, whose name begins as its own's does (found by review)."""
    os.close(store.open_store())
    theirs = [".engine-a.pull-x.pull-0123456789ab", "engine-a.pull-x", ".engine-a.pull-xyz"]
    for entry in ["engine-a", ".engine-a.pull-0123456789ab", *theirs]:
        (node.store / entry).mkdir()
        (node.store / entry / "layer0.luks").write_bytes(b"L" * 10)
    store.discard("engine-a")
    assert node.left() == sorted(theirs)
    assert (node.store / theirs[0] / "layer0.luks").read_bytes() == b"L" * 10


# -- what fails leaves nothing


def test_a_wrong_digest_fails_and_leaves_nothing(node: Node) -> None:
    err = fails(node, "c1", node.ref, digest="sha256:" + "0" * 64)
    assert isinstance(err, TamperedImageError) and "not the pinned sha256:000" in str(err)
    assert node.started == []


def test_an_unsigned_image_is_refused_by_default(node: Node) -> None:
    err = fails(node, "c1", node.unsigned)
    assert isinstance(err, TamperedImageError) and "signatures" in str(err)
    node.conf.write_text(node.conf.read_text().replace(f'trust = "{node.trust}"',
                                                       "allow-unsigned = true"))  # fmt: skip
    encrypted.stop(create(node, "c1", node.unsigned))
    assert node.started[-1]["trust"] is None and node.left() == []


@pytest.mark.parametrize("how", ["file", "directory"])
def test_a_trust_file_others_could_change_is_refused(node: Node, tmp_path: Path, how: str) -> None:
    """cryptlayer-runtime runs as root; whoever can change its trust file (or replace it through
    a directory above) chooses which images run and which `signer` entry's key they get: refused,
    as a config file or runtime others could change is (found by review)."""
    folder = tmp_path / "trust.d"
    folder.mkdir()
    trust = folder / "allowed_signers"
    trust.write_bytes(node.trust.read_bytes())
    (trust if how == "file" else folder).chmod(0o666 if how == "file" else 0o777)
    node.conf.write_text(node.conf.read_text().replace(str(node.trust), str(trust)))
    err = fails(node, "c1", node.ref)
    assert isinstance(err, UsageError) and "writable by group or others" in str(err)
    assert str(err).startswith(f"{trust if how == 'file' else folder} is writable")
    (trust if how == "file" else folder).chmod(0o644 if how == "file" else 0o755)
    encrypted.stop(create(node, "c1", node.ref))


def test_a_wrong_key_fails_and_the_copy_is_removed(node: Node) -> None:
    (node.base / "app.key").write_bytes(b"w" * 32)
    err = fails(node, "c1", node.ref)
    assert str(err) == "the key does not open this image"
    assert len(node.started) == 1  # it was pulled, then removed


def test_a_registry_that_is_down(node: Node) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"  # nobody listens there
    node.write_conf(registry=host)
    err = fails(node, "c1", f"docker://{host}/team/app:v1")
    assert str(err).startswith(f"cannot reach registry {host}")


def test_a_pull_cut_short_leaves_no_partial_directory(node: Node,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The network goes in the middle of the layer: the part fetched (its LUKS header, whose
    keyslot the node's key opens) is overwritten and removed, not left to resume."""
    from cryptlayer.distribution.wire import RegistryError

    original = Registry.pull_blob
    seen: list[Path] = []

    def cut(self: Registry, digest: str, size: int, out: Any, progress: Any) -> None:
        if size < 100_000:
            return original(self, digest, size, out, progress)
        out.write(b"LUKS\xba\xbe" + b"x" * 8192)
        out.flush()
        work = [p for p in node.store.iterdir() if p.name.startswith(".engine-c1.pull-")]
        seen.extend(work)
        raise RegistryError("the network went away")

    monkeypatch.setattr(Registry, "pull_blob", cut)
    zeroed: list[bytes] = []
    wipe = store._zero_head

    def watching(dir_fd: int, entry: str) -> None:
        wipe(dir_fd, entry)
        with open(os.open(entry, os.O_RDONLY, dir_fd=dir_fd), "rb") as f:
            zeroed.append(f.read(6))

    monkeypatch.setattr(store, "_zero_head", watching)
    err = fails(node, "c1", node.ref)
    assert str(err) == "the network went away"
    assert seen and not any(p.exists() for p in seen)
    assert zeroed and all(z in (b"", b"\0" * len(z)) for z in zeroed)


# -- the node's word only: TLS, credentials, the store


def test_tls_is_verified_unless_the_node_says_otherwise(node: Node) -> None:
    """A plain-HTTP registry: refused until the node's config names it; nothing in the spec
    (annotations, environment) can say so."""
    node.write_conf(registry="elsewhere.example")
    err = fails(node, "c1", node.ref, **{"tls-verify": "false", "insecure": "true"})
    assert str(err).startswith(f"registry {node.host} speaks plain HTTP, not HTTPS")
    node.write_conf()
    encrypted.stop(create(node, "c1", node.ref))


def test_a_registry_with_its_own_ca_and_credentials(
    node: Node, secure: RunningRegistry, pushed: dict[str, str], tmp_path: Path
) -> None:
    assert secure.cert_dir is not None
    auth = tmp_path / "auth.json"
    code, _, err = invoke("login", "--cert-dir", str(secure.cert_dir), "--authfile", str(auth),
                          "-u", USER, "--password-stdin", secure.host, input=f"{PASSWORD}\n")  # fmt: skip
    assert code == 0, err
    code, _, err = invoke("push", "--cert-dir", str(secure.cert_dir), "--authfile", str(auth),
                          pushed["image"], f"{secure.host}/team/app:v1")  # fmt: skip
    assert code == 0, err
    ref = f"docker://{secure.host}/team/app:v1"
    node.write_conf()  # the node trusts only the plain registry
    assert str(fails(node, "c1", ref)).startswith(f"TLS with registry {secure.host} failed")
    node.conf.write_text(
        node.conf.read_text()
        + f"""[registries."{secure.host}"]
cert-dir = "{secure.cert_dir}"
"""
    )
    assert "refused access (HTTP 401)" in str(fails(node, "c1", ref))
    node.conf.write_text(node.conf.read_text().replace("[pull]\n",
                                                       f'[pull]\nauth-file = "{auth}"\n'))  # fmt: skip
    encrypted.stop(create(node, "c1", ref))
    assert node.left() == []


@pytest.mark.parametrize("how", ["mode", "owner", "symlink"])
def test_a_store_others_could_use_is_refused(node: Node, how: str, tmp_path: Path) -> None:
    node.store.parent.mkdir(parents=True)
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        node.store.symlink_to(tmp_path / "elsewhere")
    else:
        node.store.mkdir(mode=0o700)
        if how == "mode":
            node.store.chmod(0o755)
        else:
            os.chown(node.store, 65534, 65534)
    with pytest.raises(UsageError) as err:
        create(node, "c1", node.ref)
    assert str(err.value).startswith(f"the pull store {node.store} is not")
    assert node.started == []
    assert not list((tmp_path / "elsewhere").glob("*")) if how == "symlink" else True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[pull]\nstore = "rel"', "[pull] store is not an absolute path"),
        ("[pull]\nkeep = 1", "[pull] keep is not true or false"),
        ('[pull]\nlazy = "no"', "[pull] lazy is not true or false"),
        ('[pull]\ncache = "/x"',
         "unknown setting cache in [pull] (known: auth-file, keep, lazy, store)"),
        ('[registries."r.example"]\ntls-verify = "no"',
         '[registries."r.example"] tls-verify is not true or false'),
        ('[registries."r.example"]\ncredentials = "/x"',
         'unknown setting credentials in [registries."r.example"] (known: cert-dir, tls-verify)'),
        ("registries = 1", "registries is not a table of tables"),
    ],
)  # fmt: skip
def test_bad_pull_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                           message: str) -> None:  # fmt: skip
    conf = tmp_path / "config.toml"
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(conf))
    conf.write_text(text)
    with pytest.raises(UsageError) as err:
        config.oci_runtime()  # every command holds the whole file to its rules
    assert str(err.value).startswith(f"{conf}: {message}")


# -- through the runtime's command line


def test_the_engine_sees_one_line_and_nothing_is_left(node: Node, tmp_path: Path) -> None:
    """cryptlayer-runtime create, the registry down: one error line in the runtime's JSON log,
    exit 125, the real runtime never run, the store empty."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{s.getsockname()[1]}"
    node.write_conf(registry=host)
    node.conf.write_text(node.conf.read_text() + '[runtime]\nruntime = "runc"\n')
    config_path = bundle(tmp_path, {"org.cryptlayer.image": f"docker://{host}/team/app:v1"})
    log = tmp_path / "log.json"
    argv = ["--log", str(log), "--log-format", "json", "create", "--bundle",
            str(Path(config_path).parent), "c1"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from cryptlayer.engine.cli import main;"
         " sys.argv[0] = 'cryptlayer-runtime'; main()", *argv],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 125, result.stderr
    assert result.stderr.startswith(f"error: cryptlayer-runtime: cannot reach registry {host}")
    assert len(result.stderr.splitlines()) == 1
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["msg"] == result.stderr.removeprefix("error: ").rstrip("\n")
    assert node.left() == []


def test_an_engine_giving_up_mid_pull_leaves_nothing(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while pulling (an engine's create timing out): the error, the part fetched gone,
    and SIGTERM's own handling back as it was."""
    import signal

    original = Registry.pull_blob

    def term(self: Registry, digest: str, size: int, out: Any, progress: Any) -> None:
        original(self, digest, size, out, progress)
        if size > 100_000:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Registry, "pull_blob", term)
    before = signal.getsignal(signal.SIGTERM)
    assert str(fails(node, "c1", node.ref)) == "interrupted by SIGTERM while pulling"
    assert signal.getsignal(signal.SIGTERM) == before
