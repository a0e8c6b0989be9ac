"""`cryptlayer placeholder` (distribution/placeholder.py): the small image engines create
encrypted-image containers from, as each engine's loader reads it (skopeo's containers/image is
podman's; cryptlayer's own strict OCI reader checks every digest), pushed to a registry or a
layout, and handed to podman, docker and ctr (stand-ins that record what they were given: no
engine runs on this host)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clirunner import invoke
from registryfixtures import RunningRegistry

from cryptlayer.build.oci import open_image, verify_blob
from cryptlayer.distribution import placeholder
from cryptlayer.tools import runner


def skopeo_config(reference: str, *extra: str) -> dict[str, object]:
    out = subprocess.run(["skopeo", "inspect", *extra, "--config", reference], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    config: dict[str, object] = json.loads(out)
    return config


def test_the_image_is_always_the_same_bytes() -> None:
    first, second = placeholder.image(), placeholder.image()
    assert first == second
    assert first.layer.digest == (  # Docker's own empty layer: a tar of no member
        "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef")  # fmt: skip


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
def test_archives_as_the_loaders_read_them(tmp_path: Path, transport: str) -> None:
    archive = tmp_path / "placeholder.tar"
    (placeholder.oci_archive if transport == "oci-archive" else placeholder.docker_archive)(archive)
    config = skopeo_config(f"{transport}:{archive}")
    assert config["config"] == {
        "Entrypoint": ["/.cryptlayer/entrypoint"], "WorkingDir": "/.cryptlayer/workdir",
        "Env": ["PATH=/.cryptlayer/path"],
        "Labels": {"org.cryptlayer.placeholder": "v1",
                   "org.opencontainers.image.title": "cryptlayer placeholder",
                   "org.opencontainers.image.description": placeholder.DESCRIPTION},
    }  # fmt: skip
    assert "Cmd" not in config["config"]  # type: ignore[operator]
    assert config["architecture"] == placeholder.architecture() and config["os"] == "linux"
    with open_image(f"{transport}:{archive}") as image:  # every blob checked against its digest
        assert image.config.entrypoint == (placeholder.ENTRYPOINT,)
        assert image.config.cmd == ()
        assert len(image.layers) == 1
        verify_blob(image.layers[0])


def test_oci_archive_names_the_image(tmp_path: Path) -> None:
    """podman and ctr name a loaded oci-archive from index.json (io.containerd.image.name);
    containers/storage takes it as podman load stores it."""
    archive = tmp_path / "placeholder.tar"
    placeholder.oci_archive(archive)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(tmp_path), "index.json"], check=True)
    (entry,) = json.loads((tmp_path / "index.json").read_text())["manifests"]
    assert entry["annotations"] == {"io.containerd.image.name": placeholder.REFERENCE,
                                    "org.opencontainers.image.ref.name": "v1"}  # fmt: skip
    store = f"containers-storage:[vfs@{tmp_path}/storage+{tmp_path}/run]{placeholder.REFERENCE}"
    subprocess.run(["skopeo", "copy", "-q", f"oci-archive:{archive}", store], check=True)
    assert skopeo_config(store)["config"] == skopeo_config(f"oci-archive:{archive}")["config"]


def test_docker_archive_names_the_image(tmp_path: Path) -> None:
    archive = tmp_path / "placeholder.tar"
    placeholder.docker_archive(archive)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(tmp_path), "manifest.json"], check=True)
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())
    assert entry["RepoTags"] == ["localhost/cryptlayer/placeholder:v1"]


@pytest.fixture
def engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """podman, docker and ctr stand-ins on the runner's PATH: each records its argv and a copy
    of the archive it was given into the returned directory."""
    record = tmp_path / "record"
    bin_dir = tmp_path / "bin"
    record.mkdir()
    bin_dir.mkdir()
    for name in ("podman", "docker", "ctr"):
        (bin_dir / name).write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > {record}/argv
for last; do :; done
cp "$last" {record}/archive.tar
ls -ld "$(dirname "$last")" > {record}/dir
""")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setitem(runner.BASE_ENV, "PATH", f"{bin_dir}:/usr/bin:/bin")
    yield record


@pytest.mark.parametrize(
    ("engine", "argv", "transport"),
    [
        ("podman", ["load", "--input"], "oci-archive"),
        ("docker", ["load", "--input"], "docker-archive"),
        ("containerd", ["--namespace", "k8s.io", "images", "import"], "oci-archive"),
    ],
)
def test_loaded_into_the_engine(
    engines: Path, engine: str, argv: list[str], transport: str
) -> None:
    code, out, err = invoke("placeholder", "--engine", engine)
    assert (code, out, err) == (0, "localhost/cryptlayer/placeholder:v1\n", "")
    given = (engines / "argv").read_text().splitlines()
    assert given[:-1] == argv
    assert Path(given[-1]).name == "placeholder.tar"
    assert not Path(given[-1]).parent.exists()  # the private directory is gone
    assert (engines / "dir").read_text().startswith("drwx------")  # private while it lived
    config = skopeo_config(f"{transport}:{engines / 'archive.tar'}")
    assert config["config"]["Entrypoint"] == ["/.cryptlayer/entrypoint"]  # type: ignore[index]


def test_engine_failures(engines: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, _, err = invoke("placeholder")
    assert (code, err) == (2, "error: say where the placeholder goes: give --engine"
                              " podman|docker|containerd, --push REF, or both\n")  # fmt: skip
    code, _, err = invoke("placeholder", "--engine", "rkt")
    assert (code, err) == (
        2,
        "error: unknown engine 'rkt': use one of podman, docker, containerd\n",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(runner.BASE_ENV, "PATH", str(empty))
    for engine, program, package in [("podman", "podman", "podman"),
                                     ("docker", "docker", "docker.io"),
                                     ("containerd", "ctr", "containerd")]:  # fmt: skip
        code, _, err = invoke("placeholder", "--engine", engine)
        assert (code, err) == (4, f"error: {program} not found: install it (apt-get install"
                                  f" {package}) and try again\n")  # fmt: skip
    (empty / "docker").write_text(
        "#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n"
    )
    (empty / "docker").chmod(0o755)
    code, _, err = invoke("placeholder", "--engine", "docker")
    assert code == 1
    assert err.startswith(f"error: {empty}/docker failed with exit status 1: Cannot connect")


def test_pushed_to_a_layout(tmp_path: Path) -> None:
    code, out, _ = invoke("placeholder", "--push", f"oci:{tmp_path}/layout:v1")
    assert (code, out) == (0, f"oci:{tmp_path}/layout:v1\n")
    config = skopeo_config(f"oci:{tmp_path}/layout:v1")
    assert config["config"]["WorkingDir"] == "/.cryptlayer/workdir"  # type: ignore[index]


def test_pushed_to_a_registry(plain: RunningRegistry) -> None:
    ref = f"{plain.host}/cryptlayer/placeholder:v1"
    code, out, err = invoke("placeholder", "--push", f"docker://{ref}", "--tls-verify=false")
    assert (code, out) == (0, f"{ref}\n"), err
    digest = placeholder.image().manifest.digest
    assert err == f"pushed the placeholder to docker://{ref}: manifest digest {digest}\n"
    config = skopeo_config(f"docker://{ref}", "--tls-verify=false")
    assert config["config"]["Entrypoint"] == ["/.cryptlayer/entrypoint"]  # type: ignore[index]
