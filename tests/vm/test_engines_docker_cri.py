"""Docker 20.10 and Kubernetes through containerd 1.6's CRI run an encrypted image through
cryptlayer-runtime (docs/engines.md), on real dm-crypt: Debian's engines, each daemon started here
with a private configuration (one dockerd, one containerd per boot: module-scoped fixtures) whose
state lies on the scratch disk, and stopped and removed at the end.

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

import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import MARKER_LOWER, Cli, leftovers, slots
from test_engines import PLACEHOLDER, RUNTIME, settled, signed

DOCKER = "/usr/bin/docker"  # Debian's 20.10 client (not a newer one elsewhere on PATH)
DOCKERD = "/usr/sbin/dockerd"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
TIMEOUT = 1800  # every runtime call starts Python, slowly under emulation
READY = 600  # a daemon's start, under emulation
PROTO = Path(__file__).parents[1] / "cri" / "api.proto"
PAUSE = "localhost/cltest/pause:v1"
HANDLER = "cryptlayer"


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


def placeholder(engine: str, env: dict[str, str]) -> None:
    """`cryptlayer placeholder --engine ENGINE`, through the engine's own client."""
    loaded = subprocess.run([sys.executable, "-m", "cryptlayer", "placeholder", "--engine", engine],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert loaded.stdout == f"{PLACEHOLDER}\n", loaded.stderr


def wait_ready(check: Any, log: Path, what: str) -> None:
    deadline = time.monotonic() + READY
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start: {log.read_text()[-4000:]}")
        time.sleep(2)


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def remove_tree(*roots: Path) -> None:
    """Unmount what an engine left mounted under `roots` (deepest first), then remove them; what
    stays mounted is an error."""
    for _ in range(3):
        mounted = [
            line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
        ]
        inside = sorted({m for m in mounted for r in roots if m.startswith(f"{r}/")}, reverse=True)
        if not inside:
            break
        for path in inside:
            subprocess.run(["umount", "--lazy", path], capture_output=True)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
        assert not root.exists(), f"{root} is left"


def log_of(path: Path) -> str:
    return path.read_text(errors="replace")[-6000:] if path.exists() else "(no log)"


# -- Docker


@dataclass
class Docker:
    env: dict[str, str]
    config: Path  # cryptlayer's config.toml
    log: Path

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOCKER, *args], env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`docker run --rm --runtime cryptlayer --network host ... ARGS`, without AppArmor: the
        VM's kernel has it, but this userspace has no apparmor_parser to load Docker's profile
        (dockerd refuses every container then; a node with AppArmor has the apparmor package)."""
        return self("run", "--rm", "--runtime", HANDLER, "--network", "host", "--security-opt",
                    "apparmor=unconfined", *args)  # fmt: skip


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    base = tmp_path_factory.mktemp("docker")
    data, run = disk(tmp_path_factory, "docker"), tmp_path_factory.mktemp("docker-run")
    config = base / "config.toml"
    bin_dir = base / "bin"  # `docker` for `cryptlayer placeholder`: Debian's client
    bin_dir.mkdir()
    (bin_dir / "docker").symlink_to(DOCKER)
    socket = base / "docker.sock"
    daemon = {
        "data-root": str(data),
        "exec-root": str(run),
        "pidfile": str(base / "docker.pid"),
        "hosts": [f"unix://{socket}"],
        "deprecated-key-path": str(base / "key.json"),  # (not /etc/docker, read-only here)
        "iptables": False,
        "ip-masq": False,
        "bridge": "none",
        "userland-proxy": False,
        "exec-opts": ["native.cgroupdriver=cgroupfs"],
        "runtimes": {HANDLER: {"path": str(wrapper(base, config))}},
    }
    (base / "daemon.json").write_text(json.dumps(daemon, indent=2))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(base), "TMPDIR": str(base),
           "DOCKER_HOST": f"unix://{socket}", "DOCKER_CONFIG": str(base / "client")}  # fmt: skip
    log = base / "dockerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen([DOCKERD, "--config-file", str(base / "daemon.json")],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   env={"PATH": os.environ["PATH"]}, start_new_session=True)  # fmt: skip
    node = Docker(env, config, log)
    try:
        wait_ready(lambda: node("version").returncode == 0, log, "dockerd")
        placeholder("docker", env | {"CRYPTLAYER_CONFIG": str(config)})
        yield node
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            left = node("ps", "--all", "--quiet").stdout.split()
            if left:
                node("rm", "--force", *left)
        stop_daemon(process)
        remove_tree(data, run)


def test_docker_runs_the_images_default_process_then_shreds(
    cli: Cli, docker: Docker, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """No command given to Docker: the image's own (`cat /data/hello.txt`), from its encrypted
    layers, named in the environment; `--rm` leaves nothing, the node's copy shredded."""
    configure(docker.config, image, key_file, signed(cli, image, tmp_path))
    result = docker.run("-e", f"CRYPTLAYER_IMAGE={image}", PLACEHOLDER)
    assert (result.returncode, result.stdout) == (0, f"{MARKER_LOWER}\n"), result.stderr + log_of(
        docker.log
    )
    assert settled() == []
    assert slots(image) == [0, 0]


def test_docker_gives_the_commands_status_and_output(
    cli: Cli, docker: Docker, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """A command given to Docker runs in the image, without the variables that named the image;
    its exit status is `docker run`'s; nothing is left, the node's copy shredded."""
    configure(docker.config, image, key_file, signed(cli, image, tmp_path))
    script = 'cat /data/hello.txt; echo "[${CRYPTLAYER_IMAGE:-}]"; exit 3'
    result = docker.run("-e", f"CRYPTLAYER_IMAGE={image}", PLACEHOLDER, "sh", "-c", script)
    assert (result.returncode, result.stdout) == (3, f"{MARKER_LOWER}\n[]\n"), (
        result.stderr + log_of(docker.log)
    )
    assert settled() == []
    assert slots(image) == [0, 0]


def test_docker_shows_cryptlayers_error(docker: Docker, images: Path, tmp_path: Path) -> None:
    """The node's config has no key for the image: `docker run` fails with cryptlayer's one line
    (Docker's 125: the daemon's error); nothing is left."""
    trust = tmp_path / "allowed_signers"
    trust.write_text("")
    docker.config.write_text(f'trust = "{trust}"\n')
    missing = images / "unknown"
    result = docker.run("-e", f"CRYPTLAYER_IMAGE={missing}", PLACEHOLDER)
    assert (result.returncode, result.stdout) == (125, ""), result.stderr
    assert f"cryptlayer-runtime: no key for the image {missing} in {docker.config}" in (
        result.stderr), result.stderr  # fmt: skip
    assert settled() == []


# -- containerd's CRI, as the kubelet drives it


@dataclass
class Cri:
    api: ModuleType  # api_pb2
    runtime: Any  # RuntimeServiceStub
    config: Path  # cryptlayer's config.toml
    log: Path


def generated(out: Path) -> tuple[ModuleType, ModuleType]:
    """The CRI client's modules (api_pb2, api_pb2_grpc), generated from tests/cri/api.proto."""
    from grpc_tools import protoc

    status = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}",
                          f"--grpc_python_out={out}", str(PROTO)])  # fmt: skip
    assert status == 0, "grpc_tools.protoc failed on tests/cri/api.proto"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def pause_archive(path: Path) -> None:
    """An oci-archive of a pause-like sandbox image: static busybox, `sleep` forever."""
    from cryptlayer import oci

    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    layer_io = io.BytesIO()
    with tarfile.open(fileobj=layer_io, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("bin")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(busybox), 0o755
        tar.addfile(info, io.BytesIO(busybox))
    layer = layer_io.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [oci.digest_of(layer)]}}).encode()  # fmt: skip

    def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
        return {"mediaType": media_type, "digest": oci.digest_of(data), "size": len(data), **extra}

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    }).encode()  # fmt: skip
    index = json.dumps({"schemaVersion": 2, "manifests": [descriptor(
        "application/vnd.oci.image.manifest.v1+json", manifest,
        annotations={"io.containerd.image.name": PAUSE})]}).encode()  # fmt: skip
    with tarfile.open(path, "w") as tar:
        members = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
        members += [(str(oci.blob_path(oci.digest_of(b))), b) for b in (layer, config, manifest)]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def containerd_config(base: Path, data: Path, runtime: Path) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{data}/root"
state = "{data}/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{base}/containerd.sock"

[{cri}]
  sandbox_image = "{PAUSE}"
  disable_apparmor = true
  restrict_oom_score_adj = true  # (never below containerd's own)
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.cni]
    bin_dir = "{base}/cni-bin"
    conf_dir = "{base}/cni-conf"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [{cri}.containerd.runtimes.{HANDLER}]
      runtime_type = "io.containerd.runc.v2"
      pod_annotations = ["org.cryptlayer.*"]
      container_annotations = ["org.cryptlayer.*"]
      [{cri}.containerd.runtimes.{HANDLER}.options]
        BinaryName = "{runtime}"
"""


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cri]:
    import grpc

    base = tmp_path_factory.mktemp("containerd")
    data = disk(tmp_path_factory, "containerd")
    api, api_grpc = generated(tmp_path_factory.mktemp("cri-client"))
    config = base / "config.toml"
    toml = base / "containerd.toml"
    toml.write_text(containerd_config(base, data, wrapper(base, config)))
    socket = base / "containerd.sock"
    log = base / "containerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen([CONTAINERD, "--config", str(toml)], stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=out, env={"PATH": os.environ["PATH"]},
                                   start_new_session=True)  # fmt: skip
    channel = grpc.insecure_channel(f"unix://{socket}")
    runtime = api_grpc.RuntimeServiceStub(channel)

    def ready() -> bool:
        try:
            runtime.Version(api.VersionRequest(), timeout=30)
        except grpc.RpcError:
            return False
        return True

    node = Cri(api, runtime, config, log)
    try:
        wait_ready(ready, log, "containerd")
        env = {"PATH": os.environ["PATH"], "HOME": str(base), "TMPDIR": str(base),
               "CONTAINERD_ADDRESS": str(socket)}  # fmt: skip
        pause_archive(base / "pause.tar")
        imported = subprocess.run([CTR, "--namespace", "k8s.io", "images", "import",
                                   str(base / "pause.tar")], env=env, capture_output=True,
                                  text=True, timeout=TIMEOUT)  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        placeholder("containerd", env | {"CRYPTLAYER_CONFIG": str(config)})
        yield node
    finally:
        with contextlib.suppress(grpc.RpcError):
            for pod in runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=TIMEOUT).items:
                runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                       timeout=TIMEOUT)  # fmt: skip
                runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                         timeout=TIMEOUT)  # fmt: skip
        channel.close()
        stop_daemon(process)
        remove_tree(data)


def pod_config(api: ModuleType, name: str, logs: Path, annotations: dict[str, str]) -> Any:
    """What the kubelet sends for a pod with hostNetwork and these annotations (no hostname: the
    node's, in the node's UTS namespace)."""
    host = api.NamespaceOption(network=api.NODE)
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace="default"),
        log_directory=str(logs),
        annotations=annotations,
        labels={"io.kubernetes.pod.name": name},
        linux=api.LinuxPodSandboxConfig(
            security_context=api.LinuxSandboxSecurityContext(namespace_options=host)),
    )  # fmt: skip


def cri_log(path: Path) -> str:
    """A CRI log file's text: each line `TIME STREAM TAG TEXT` (F: a full line, P: partial)."""
    text = ""
    for line in path.read_text().splitlines():
        _time, _stream, tag, content = [*line.split(" ", 3), ""][:4]
        text += content + ("\n" if tag == "F" else "")
    return text


def test_a_pod_runs_the_images_default_process_then_shreds(
    cli: Cli, cri: Cri, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """RunPodSandbox (host network, the `cryptlayer` handler, the pod's annotation naming the
    image; its sandbox passed through), CreateContainer from the placeholder with no command,
    StartContainer: the image's default process runs from its encrypted layers; its exit code
    and log file; then Stop/Remove of the container and the pod leave nothing, the node's copy
    shredded."""
    api, runtime = cri.api, cri.runtime
    configure(cri.config, image, key_file, signed(cli, image, tmp_path))
    logs = tmp_path / "pod-logs"
    logs.mkdir()
    pod = pod_config(api, "job", logs, {"org.cryptlayer.image": str(image)})
    try:
        sandbox = runtime.RunPodSandbox(api.RunPodSandboxRequest(
            config=pod, runtime_handler=HANDLER), timeout=TIMEOUT).pod_sandbox_id  # fmt: skip
    except Exception as err:
        raise AssertionError(f"{err}\n{log_of(cri.log)}") from None
    try:
        container = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="app"),
            image=api.ImageSpec(image=PLACEHOLDER),
            log_path="app.log",
            linux=api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
                namespace_options=api.NamespaceOption(network=api.NODE))),
        )  # fmt: skip
        cid = runtime.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=sandbox, config=container, sandbox_config=pod),
            timeout=TIMEOUT).container_id  # fmt: skip
        try:
            runtime.StartContainer(api.StartContainerRequest(container_id=cid), timeout=TIMEOUT)
        except Exception as err:
            raise AssertionError(f"{err}\n{log_of(cri.log)}") from None
        deadline = time.monotonic() + TIMEOUT
        while True:
            status = runtime.ContainerStatus(api.ContainerStatusRequest(container_id=cid),
                                             timeout=TIMEOUT).status  # fmt: skip
            if status.state == api.CONTAINER_EXITED or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert (status.state, status.exit_code) == (api.CONTAINER_EXITED, 0), status
        assert cri_log(logs / "app.log") == f"{MARKER_LOWER}\n"
        runtime.StopContainer(api.StopContainerRequest(container_id=cid, timeout=10),
                              timeout=TIMEOUT)  # fmt: skip
        runtime.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=TIMEOUT)
    finally:
        runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sandbox),
                               timeout=TIMEOUT)  # fmt: skip
        runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sandbox),
                                 timeout=TIMEOUT)  # fmt: skip
    assert settled() == []
    assert slots(image) == [0, 0]
    # (shown with -rA: whether containerd had to retry the runtime's delete, whose teardown must
    # fit in the 10 s the CRI gives its handling of a container's exit)
    print([line for line in cri.log.read_text().splitlines() if "TaskExit" in line])


def test_a_pod_with_key_material_is_refused_with_cryptlayers_error(
    cri: Cri, tmp_path: Path
) -> None:
    """A pod whose annotations carry key material: RunPodSandbox fails with cryptlayer's one
    line (its sandbox is refused too: keys come from the node only); nothing is left."""
    api, runtime = cri.api, cri.runtime
    import grpc

    cri.config.write_text(f'trust = "{tmp_path / "allowed_signers"}"\n')
    logs = tmp_path / "pod-logs"
    logs.mkdir()
    pod = pod_config(api, "keyed", logs, {"org.cryptlayer.key": "00" * 32})
    with pytest.raises(grpc.RpcError) as failed:
        runtime.RunPodSandbox(api.RunPodSandboxRequest(config=pod, runtime_handler=HANDLER),
                              timeout=TIMEOUT)  # fmt: skip
    details = failed.value.details()  # type: ignore[attr-defined]
    assert "cryptlayer-runtime: the container's annotation org.cryptlayer.key would carry key" \
        in details, details  # fmt: skip
    assert "00" * 32 not in details
    left = runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=TIMEOUT).items
    assert [p.metadata.name for p in left] == []
    assert leftovers() == []
