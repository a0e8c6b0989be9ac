"""cryptlayer-runtime starts a registry image lazily at `create` (engine/encrypted.py,
docs/engines.md "Registry images", docs/lazy.md): the small files fetched and checked under the
node's trust, TLS, CA and credentials and the spec's digest pin, into a private directory in
/run, and the assembly given the LazyLayers that start the server and attach the devices; the
node's store is not used; nothing fetched is left by a create that fails. `[pull] lazy = false`
keeps the whole pull (test_engine_pull.py). A real registry (Debian's docker-registry) and fake
images (luksfixtures); the assembly is stood in (the devices are the VM tier's:
tests/vm/test_engines_lazy.py)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from enginefixtures import push_signed
from registryfixtures import RunningRegistry

from cryptlayer.engine import encrypted
from cryptlayer.errors import CryptlayerError, TamperedImageError, UsageError
from cryptlayer.image.manifest import load
from cryptlayer.runtime import container, state
from cryptlayer.runtime.lazy import LazyLayers
from cryptlayer.runtime.state import Mode, Record

KEY = b"k" * 32  # fake_image's
SIZE = 6 << 20


@dataclass
class Node:
    base: Path
    conf: Path
    store: Path
    trust: Path
    ref: str  # signed
    unsigned: str
    digest: str
    host: str
    started: list[dict[str, Any]] = field(default_factory=list)

    def write_conf(self, extra: str = "", tls: str = "tls-verify = false") -> None:
        self.conf.write_text(f"""trust = "{self.trust}"
[[keys]]
repository = "{self.host}/team/app"
key-file = "{self.base}/app.key"
[pull]
store = "{self.store}"
{extra}
[registries."{self.host}"]
{tls}
""")

    def fetched_dirs(self) -> list[str]:
        lazy = self.base / "run" / ".lazy"
        return sorted(os.listdir(lazy)) if lazy.exists() else []


@pytest.fixture(scope="module")
def pushed(plain: RunningRegistry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return push_signed(plain.host, tmp_path_factory.mktemp("pushed"), size=SIZE)


@pytest.fixture
def node(plain: RunningRegistry, pushed: dict[str, str], tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Node:  # fmt: skip
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("CRYPTLAYER_RUNDIR", str(tmp_path / "run"))
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
        credential = credential.choose(Path(image), signers=(),
                                       digest=options.digest or "sha256:" + "0" * 64)  # fmt: skip
        with credential.key.view() as data:
            key = bytes(data)
        found.started.append({"image": Path(image), "key": key, "shred": options.shred,
                              "digest": options.digest, "trust": options.trust,
                              "lazy": options.lazy,
                              "files": sorted(os.listdir(image))})  # fmt: skip
        if key != KEY:
            raise UsageError("the key does not open this image")
        rootfs = tmp_path / "rootfs" / options.name
        rootfs.mkdir(parents=True, exist_ok=True)
        with state.locked():
            return state.create(Record(options.name, str(image), options.shred, Mode.START, 0,
                                       rootfs=str(rootfs)))  # fmt: skip

    monkeypatch.setattr(container, "start", start)
    return found


def create(node: Node, cid: str, image: str, **annotations: str) -> str:
    notes = {"org.cryptlayer.image": image} | {f"org.cryptlayer.{k}": v
                                                for k, v in annotations.items()}  # fmt: skip
    path = node.base / f"bundle-{cid}"
    path.mkdir()
    spec = {"process": {"args": ["/app"], "env": ["PATH=/bin"]}, "root": {"path": "rootfs"},
            "annotations": notes}  # fmt: skip
    (path / "config.json").write_text(json.dumps(spec))
    return encrypted.assemble(spec, image, cid, str(path / "config.json"))


def fails(node: Node, cid: str, image: str, **annotations: str) -> CryptlayerError:
    with pytest.raises(CryptlayerError) as err:
        create(node, cid, image, **annotations)
    assert not state.records_dir().exists() or not list(state.records_dir().iterdir())
    assert node.fetched_dirs() == []  # nothing fetched is left
    assert not node.store.exists()
    return err.value


def test_a_registry_image_is_started_lazily_by_default(node: Node, pushed: dict[str, str]) -> None:
    """The assembly gets the fetched directory (small files whole, the layer its header and a
    hole) and LazyLayers naming the server and its configuration: the node's TLS setting, no
    credentials from the spec; the store is not made; the key is the repository's."""
    name = create(node, "c1", node.ref, digest=node.digest)
    [started] = node.started
    lazy = started["lazy"]
    assert isinstance(lazy, LazyLayers)
    [work] = node.fetched_dirs()
    assert lazy.work == (node.base / "run" / ".lazy" / work).resolve()
    assert started["image"] == lazy.work / "image"
    assert (started["key"], started["shred"], started["digest"], started["trust"]) == (
        KEY, True, node.digest, node.trust)  # fmt: skip
    assert started["files"] == ["keys.json", "layer0.luks", "layer0.verity", "manifest.json",
                                "signatures"]  # fmt: skip
    layer = load(Path(pushed["image"])).layers[0]
    copy = (lazy.work / "image" / layer.file).read_bytes()
    assert len(copy) == SIZE and copy[layer.offset :] == bytes(SIZE - layer.offset)
    assert lazy.blobs[0][1] == SIZE
    assert lazy.command == [sys.executable, "-m", "cryptlayer.distribution.lazy"]
    config = json.loads(lazy.config([5]))
    assert (config["ref"], config["tls_verify"], config["login"], config["authfile"]) == (
        node.ref, False, None, None)  # fmt: skip
    # erasing (no keep): the header's chunks are the server's own, never the block cache's
    assert config["blobs"] == [{"digest": lazy.blobs[0][0], "size": SIZE, "fd": 5,
                                "private": layer.offset}]  # fmt: skip
    assert not node.store.exists()
    rewritten = json.loads((node.base / "bundle-c1/config.json").read_text())
    assert rewritten["root"]["path"] == f"{node.base}/rootfs/{name}"


def test_keep_decides_the_erase_of_the_node_copy(node: Node) -> None:
    """org.cryptlayer.keep=true, or [pull] keep = true: StartOptions.shred off, as `cryptlayer
    run --keep` passes it; otherwise on (the node's copy of a lazy image: its header chunks)."""
    create(node, "c1", node.ref, keep="true")
    node.write_conf("keep = true")
    create(node, "c2", node.ref)
    node.write_conf()
    create(node, "c3", node.ref)
    assert [s["shred"] for s in node.started] == [False, False, True]


def test_the_node_auth_file_and_ca_reach_the_server(node: Node, tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    auth.write_text("{}")
    certs = tmp_path / "certs"
    certs.mkdir()
    node.write_conf(f'auth-file = "{auth}"', f'tls-verify = false\ncert-dir = "{certs}"')
    create(node, "c1", node.ref)
    config = json.loads(node.started[0]["lazy"].config([3]))
    assert (config["authfile"], config["cert_dir"]) == (str(auth), str(certs))


def test_lazy_false_pulls_the_whole_image_into_the_store(node: Node) -> None:
    node.write_conf("lazy = false")
    name = create(node, "c1", node.ref)
    [started] = node.started
    assert started["lazy"] is None and started["image"] == node.store / name
    assert (node.store / name / "layer0.luks").stat().st_blocks * 512 >= SIZE - (1 << 20)
    assert node.fetched_dirs() == []


def test_a_wrong_digest_fails_and_leaves_nothing(node: Node) -> None:
    err = fails(node, "c1", node.ref, digest="sha256:" + "1" * 64)
    assert isinstance(err, TamperedImageError | UsageError)
    assert node.started == []


def test_an_unsigned_image_is_refused_by_default(node: Node) -> None:
    err = fails(node, "c1", node.unsigned)
    assert "sign" in str(err)
    assert node.started == []


def test_tls_is_verified_unless_the_node_says_otherwise(node: Node) -> None:
    """The plain-HTTP registry, with no [registries] entry for it: refused (HTTPS required)."""
    node.write_conf(tls="")
    fails(node, "c1", node.ref)
    assert node.started == []


def test_a_failed_assembly_removes_the_fetched_directory(
    node: Node, warm_servers: list[Any]
) -> None:
    """The key does not open the image (the stood-in assembly fails): nothing fetched is left,
    and the server started warm before the fetch is stopped, not left until this process ends
    (before, it lived on until its socket was collected)."""
    (node.base / "app.key").write_bytes(b"x" * 32)
    err = fails(node, "c1", node.ref)
    assert "does not open" in str(err)
    assert len(node.started) == 1  # it got as far as the assembly
    assert len(warm_servers) == 1 and warm_servers[0].poll() is not None  # stopped, reaped
