"""Lazy start's fetch (distribution/lazy.py) against Debian's docker-registry: the small files
and trees whole, each layer as its header and a hole, so that image/opener.py opens the copy as
any image; the server process's configuration. The NBD device itself is the VM tier's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clirunner import invoke
from luksfixtures import fake_image
from registryfixtures import RunningRegistry

from cryptlayer.distribution import lazy
from cryptlayer.errors import TamperedImageError
from cryptlayer.image.manifest import load
from cryptlayer.image.opener import Policy, open_image

SIZE = 6 << 20


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    return tmp_path / "state"


def _pushed(registry: RunningRegistry, tmp_path: Path, repo: str) -> tuple[Path, str]:
    image = fake_image(tmp_path / "img", size=SIZE)
    ref = f"docker://{registry.host}/{repo}:v1"
    code, _, err = invoke("push", "--no-tls-verify", str(image), ref)
    assert code == 0, err
    return image, ref


def test_fetch_takes_the_small_files_whole_and_only_the_headers_of_layers(
    plain: RunningRegistry, tmp_path: Path, state: Path
) -> None:
    image, ref = _pushed(plain, tmp_path, "lazy/fetch")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    fetched = lazy.fetch(lazy.Remote(ref, tls_verify=False), work / "image")
    copy = fetched.image
    layer = load(image).layers[0]
    for name in ("manifest.json", "keys.json", layer.tree):
        assert (copy / name).read_bytes() == (image / name).read_bytes(), name
    original, lazy_copy = (image / layer.file).read_bytes(), (copy / layer.file).read_bytes()
    assert len(lazy_copy) == len(original) == layer.size == SIZE
    assert lazy_copy[: layer.offset] == original[: layer.offset]  # the header, from the registry
    assert lazy_copy[layer.offset :] == bytes(layer.size - layer.offset)  # and a hole
    assert os.stat(copy / layer.file).st_blocks * 512 < 2 << 20
    chunks = list((state / "blockcache/sha256").rglob("0*"))
    assert [c.name for c in chunks] == ["00000000"]  # one chunk fetched: the header's
    blob = fetched.blobs[0]
    assert blob[1] == layer.size and chunks[0].parent.name == blob[0].removeprefix("sha256:")
    with open_image(copy, Policy()) as opened:  # every check of a local image
        opened.headers()
        assert opened.manifest.digest == load(image).digest


def test_fetch_keeps_pull_s_checks(plain: RunningRegistry, tmp_path: Path) -> None:
    _, ref = _pushed(plain, tmp_path, "lazy/pinned")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    with pytest.raises(TamperedImageError, match="not the pinned"):
        lazy.fetch(lazy.Remote(ref, tls_verify=False), work / "image",
                   digest="sha256:" + "0" * 64)  # fmt: skip
    assert not (work / "image").exists()


def test_the_server_is_told_its_registry_blobs_and_sockets_on_stdin() -> None:
    remote = lazy.Remote("docker://r.example/a:v1", False, None, None, ("alice", "secret"))
    config = json.loads(lazy.server_config(remote, [("sha256:" + "a" * 64, 8192)], [7]))
    assert config["login"] == ["alice", "secret"]  # on a pipe: never argv or env
    assert config["blobs"] == [{"digest": "sha256:" + "a" * 64, "size": 8192, "fd": 7}]
    assert (config["ref"], config["tls_verify"]) == ("docker://r.example/a:v1", False)
