"""Docker 20.10 and Kubernetes through containerd 1.6's CRI run an encrypted image through
cryptlayer-runtime (docs/engines.md), on real dm-crypt: Debian's engines, each daemon started here
with a private configuration (tests/enginefixtures.py; one dockerd, one containerd per boot:
module-scoped fixtures) whose state lies on the scratch disk, and stopped and removed at the end.

- Docker: `daemon.json` names the runtime `cryptlayer`; `docker run --runtime cryptlayer` names
  the image by `-e CRYPTLAYER_IMAGE` (Docker 20.10 sets no annotations).
- containerd: a runtime handler `cryptlayer` (io.containerd.runc.v2, BinaryName, the
  org.cryptlayer.* annotations let through), driven over its socket as the kubelet drives it, by
  a CRI client generated here from Kubernetes' api.proto (tests/cri/api.proto) with grpcio-tools
  into a temporary directory; the sandbox image is a busybox `sleep` made here.

As in test_engines.py, a wrapper gives the runtime this test's CRYPTLAYER_* (the state root on
the scratch disk, the config file), as /etc/cryptlayer would on a node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import enginefixtures as ef
import pytest
from conftest import MARKER_LOWER, Cli, leftovers, slots
from test_engines import RUNTIME, settled, signed


def disk(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A fresh directory on the scratch disk (the VM's; beside CRYPTLAYER_ROOT), for an engine's
    own state: not tmpfs, not inside cryptlayer's state root or scratch directory."""
    scratch = os.environ.get("CRYPTLAYER_SCRATCH")
    base = Path(scratch).parent if scratch else tmp_path_factory.mktemp("disk")
    path = base / f"engine-{name}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def wrapper(base: Path, config: Path) -> Path:
    """The runtime as the engine is given it: cryptlayer-runtime with this test's CRYPTLAYER_*."""
    passed = {k: v for k, v in os.environ.items() if k.startswith("CRYPTLAYER_") or k == "TMPDIR"}
    passed |= {"CRYPTLAYER_CONFIG": str(config), "PATH": os.environ["PATH"]}
    path = base / "cryptlayer-runtime"
    exports = " ".join(f"{k}='{v}'" for k, v in sorted(passed.items()))
    path.write_text(f'#!/bin/sh\nexport {exports}\nexec {RUNTIME} "$@"\n')
    path.chmod(0o755)
    return path


def configure(config: Path, image: Path, key: Path, trust: Path) -> None:
    config.write_text(f"""trust = "{trust}"
[[keys]]
image = "{image.parent}/*"
key-file = "{key}"
""")


# -- Docker


@dataclass
class Docker:
    client: ef.Docker
    config: Path  # cryptlayer's config.toml

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`docker run --rm --runtime cryptlayer --network host ... ARGS`, without AppArmor: the
        VM's kernel has it, but this userspace has no apparmor_parser to load Docker's profile
        (dockerd refuses every container then; a node with AppArmor has the apparmor package)."""
        return self.client("run", "--rm", "--runtime", ef.HANDLER, "--network", "host",
                           "--security-opt", "apparmor=unconfined", *args)  # fmt: skip


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    base = tmp_path_factory.mktemp("docker")
    config = base / "config.toml"
    data, run = disk(tmp_path_factory, "docker"), tmp_path_factory.mktemp("docker-run")
    with ef.dockerd(base, data, run, wrapper(base, config)) as client:
        ef.placeholder("docker", client.env | {"CRYPTLAYER_CONFIG": str(config)})
        yield Docker(client, config)


def test_docker_runs_the_images_default_process_then_shreds(
    cli: Cli, docker: Docker, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """No command given to Docker: the image's own (`cat /data/hello.txt`), from its encrypted
    layers, named in the environment; `--rm` leaves nothing, the node's copy shredded."""
    configure(docker.config, image, key_file, signed(cli, image, tmp_path))
    result = docker.run("-e", f"CRYPTLAYER_IMAGE={image}", ef.PLACEHOLDER)
    assert (result.returncode, result.stdout) == (0, f"{MARKER_LOWER}\n"), (
        result.stderr + ef.log_of(docker.client.log))  # fmt: skip
    assert settled() == []
    assert slots(image) == [0, 0]


def test_docker_gives_the_commands_status_and_output(
    cli: Cli, docker: Docker, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """A command given to Docker runs in the image, without the variables that named the image;
    its exit status is `docker run`'s; nothing is left, the node's copy shredded."""
    configure(docker.config, image, key_file, signed(cli, image, tmp_path))
    script = 'cat /data/hello.txt; echo "[${CRYPTLAYER_IMAGE:-}]"; exit 3'
    result = docker.run("-e", f"CRYPTLAYER_IMAGE={image}", ef.PLACEHOLDER, "sh", "-c", script)
    assert (result.returncode, result.stdout) == (3, f"{MARKER_LOWER}\n[]\n"), (
        result.stderr + ef.log_of(docker.client.log))  # fmt: skip
    assert settled() == []
    assert slots(image) == [0, 0]


def test_docker_shows_cryptlayers_error(docker: Docker, images: Path, tmp_path: Path) -> None:
    """The image named is not on the node: `docker run` fails with cryptlayer's one line
    (Docker's 125: the daemon's error); nothing is left. (The path is resolved and checked before
    a key is looked for: part 12's review.)"""
    trust = tmp_path / "allowed_signers"
    trust.write_text("")
    docker.config.write_text(f'trust = "{trust}"\n')
    missing = images / "unknown"
    result = docker.run("-e", f"CRYPTLAYER_IMAGE={missing}", ef.PLACEHOLDER)
    assert (result.returncode, result.stdout) == (125, ""), result.stderr
    assert f"cryptlayer-runtime: {missing} is not an image directory" in result.stderr, (
        result.stderr)  # fmt: skip
    assert settled() == []


# -- containerd's CRI, as the kubelet drives it


@dataclass
class Cri:
    cri: ef.Cri
    config: Path  # cryptlayer's config.toml


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    base = tmp_path_factory.mktemp("containerd")
    config = base / "config.toml"
    with ef.containerd(base, disk(tmp_path_factory, "containerd"), wrapper(base, config)) as cri:
        ef.placeholder("containerd", cri.env | {"CRYPTLAYER_CONFIG": str(config)})
        yield Cri(cri, config)


def test_a_pod_runs_the_images_default_process_then_shreds(
    cli: Cli, cri: Cri, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """RunPodSandbox (host network, the `cryptlayer` handler, the pod's annotation naming the
    image; its sandbox passed through), CreateContainer from the placeholder with no command,
    StartContainer: the image's default process runs from its encrypted layers; its exit code
    (ContainerStatus) and log file; then Stop/Remove of the container and the pod leave
    nothing, the node's copy shredded."""
    api, runtime = cri.cri.api, cri.cri.runtime
    configure(cri.config, image, key_file, signed(cli, image, tmp_path))
    logs = tmp_path / "pod-logs"
    logs.mkdir()
    pod = ef.pod_config(api, "job", logs, {"org.cryptlayer.image": str(image)})
    try:
        sandbox = runtime.RunPodSandbox(api.RunPodSandboxRequest(
            config=pod, runtime_handler=ef.HANDLER), timeout=ef.TIMEOUT).pod_sandbox_id  # fmt: skip
    except Exception as err:
        raise AssertionError(f"{err}\n{ef.log_of(cri.cri.log)}") from None
    try:
        assert leftovers() == []  # the sandbox, with the pod's annotations: passed through
        container = ef.container_config(api, "app", ef.PLACEHOLDER, [])
        try:
            ran = ef.run_to_exit(cri.cri, sandbox, pod, container)
        except Exception as err:
            raise AssertionError(f"{err}\n{ef.log_of(cri.cri.log)}") from None
        assert ran == (0, f"{MARKER_LOWER}\n")
    finally:
        ef.remove_pod(cri.cri, sandbox)
    assert settled() == []
    assert slots(image) == [0, 0]
    # (shown with -rA: whether containerd had to ask again for the runtime's delete, whose
    # teardown has 10 s of the CRI's handling of the container's exit)
    print([line for line in cri.cri.log.read_text().splitlines() if "TaskExit" in line])


def test_a_pod_with_key_material_is_refused_with_cryptlayers_error(
    cri: Cri, tmp_path: Path
) -> None:
    """A pod whose annotations carry key material: RunPodSandbox fails with cryptlayer's one
    line (its sandbox is refused too: keys come from the node only); nothing is left."""
    import grpc

    api, runtime = cri.cri.api, cri.cri.runtime
    cri.config.write_text(f'trust = "{tmp_path / "allowed_signers"}"\n')
    logs = tmp_path / "pod-logs"
    logs.mkdir()
    pod = ef.pod_config(api, "keyed", logs, {"org.cryptlayer.key": "00" * 32})
    with pytest.raises(grpc.RpcError) as failed:
        runtime.RunPodSandbox(api.RunPodSandboxRequest(config=pod, runtime_handler=ef.HANDLER),
                              timeout=ef.TIMEOUT)  # fmt: skip
    details = failed.value.details()  # type: ignore[attr-defined]
    assert "cryptlayer-runtime: the container's annotation org.cryptlayer.key would carry key" \
        in details, details  # fmt: skip
    assert "00" * 32 not in details
    left = runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=ef.TIMEOUT).items
    assert [p.metadata.name for p in left] == []
    assert leftovers() == []
