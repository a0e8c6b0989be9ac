"""Engines for the tests of cryptlayer-runtime, each daemon started here with a private
configuration (no systemd): Debian's dockerd 20.10 (`dockerd()`) and containerd 1.6 driven over
its CRI as the kubelet drives it (`containerd()`), with a CRI client generated at test time by
grpcio-tools from Kubernetes' api.proto (tests/cri/api.proto) into a temporary directory, and a
sandbox image made here (static busybox, sleeping). Used by tests/vm/test_engines_docker_cri.py
(real dm-crypt) and tests/unit/test_engine_images.py (the assembly stood in)."""

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

DOCKER = "/usr/bin/docker"  # Debian's 20.10 client (not a newer one elsewhere on PATH)
DOCKERD = "/usr/sbin/dockerd"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
PROTO = Path(__file__).parent / "cri" / "api.proto"
PAUSE = "localhost/cltest/pause:v1"
PLACEHOLDER = "localhost/cryptlayer/placeholder:v1"
HANDLER = "cryptlayer"  # the runtime's name in daemon.json, the CRI's runtime handler
TIMEOUT = 1800  # every runtime call starts Python, slowly under emulation
READY = 600  # a daemon's start, under emulation


def wait_ready(check: Callable[[], bool], log: Path, what: str) -> None:
    deadline = time.monotonic() + READY
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start: {log_of(log)}")
        time.sleep(0.5)


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
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        mounted = [line.split()[4] for line in mountinfo]
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


def placeholder(engine: str, env: dict[str, str]) -> None:
    """`cryptlayer placeholder --engine ENGINE`, through the engine's own client."""
    loaded = subprocess.run([sys.executable, "-m", "cryptlayer", "placeholder", "--engine", engine],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert loaded.stdout == f"{PLACEHOLDER}\n", loaded.stderr


# -- Docker


@dataclass
class Docker:
    env: dict[str, str]  # the client's: DOCKER_HOST, and PATH with Debian's `docker` first
    log: Path  # dockerd's

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([DOCKER, *args], env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL)  # fmt: skip


@contextlib.contextmanager
def dockerd(base: Path, data: Path, run: Path, runtime: Path) -> Iterator[Docker]:
    """A dockerd of its own (and the containerd it starts), its `data-root` in `data`, its
    `exec-root` in `run`, the runtime `cryptlayer` = `runtime`, host networking only; every
    container removed, the daemon stopped and its directories removed at the end."""
    bin_dir = base / "bin"  # `docker` for `cryptlayer placeholder`: Debian's client
    bin_dir.mkdir()
    (bin_dir / "docker").symlink_to(DOCKER)
    socket = base / "docker.sock"
    daemon = {
        "data-root": str(data),
        "exec-root": str(run),
        "pidfile": str(base / "docker.pid"),
        "hosts": [f"unix://{socket}"],
        "deprecated-key-path": str(base / "key.json"),  # (not /etc/docker: read-only in the VM)
        "iptables": False,
        "ip-masq": False,
        "bridge": "none",
        "userland-proxy": False,
        "exec-opts": ["native.cgroupdriver=cgroupfs"],
        "runtimes": {HANDLER: {"path": str(runtime)}},
    }
    (base / "daemon.json").write_text(json.dumps(daemon, indent=2))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(base), "TMPDIR": str(base),
           "DOCKER_HOST": f"unix://{socket}", "DOCKER_CONFIG": str(base / "client")}  # fmt: skip
    log = base / "dockerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen([DOCKERD, "--config-file", str(base / "daemon.json")],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   env={"PATH": os.environ["PATH"]}, start_new_session=True)  # fmt: skip
    client = Docker(env, log)
    try:
        wait_ready(lambda: client("version").returncode == 0, log, "dockerd")
        yield client
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            left = client("ps", "--all", "--quiet").stdout.split()
            if left:
                client("rm", "--force", *left)
        stop_daemon(process)
        remove_tree(data, run)


# -- containerd's CRI


@dataclass
class Cri:
    api: ModuleType  # api_pb2: the CRI's messages
    runtime: Any  # a RuntimeServiceStub on containerd's socket
    log: Path  # containerd's
    env: dict[str, str]  # for ctr and `cryptlayer placeholder`: CONTAINERD_ADDRESS


def generated(out: Path) -> tuple[ModuleType, ModuleType]:
    """The CRI client's modules (api_pb2, api_pb2_grpc), generated from tests/cri/api.proto."""
    from grpc_tools import protoc

    out.mkdir(exist_ok=True)
    status = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}",
                          f"--grpc_python_out={out}", str(PROTO)])  # fmt: skip
    assert status == 0, "grpc_tools.protoc failed on tests/cri/api.proto"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def pause_archive(path: Path) -> None:
    """An oci-archive of a pause-like sandbox image: static busybox, `sleep` for ever (PID 1
    ignores SIGTERM: the CRI stops a sandbox with SIGKILL)."""
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
    """containerd's config.toml: its root and state in `data`, its socket in `base`, the CRI's
    handler `cryptlayer` (the runc shim running `runtime`, the org.cryptlayer.* annotations let
    through), the sandbox image made here; no AppArmor profile (no apparmor_parser in the VM),
    no oom_score_adj below containerd's own (a container host may not lower it)."""
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
  restrict_oom_score_adj = true
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


@contextlib.contextmanager
def containerd(base: Path, data: Path, runtime: Path) -> Iterator[Cri]:
    """A containerd of its own (containerd_config) and a CRI client on its socket, the sandbox
    image imported; at the end every pod stopped and removed, the daemon stopped and `data`
    removed."""
    import grpc

    api, api_grpc = generated(base / "cri-client")
    toml = base / "containerd.toml"
    toml.write_text(containerd_config(base, data, runtime))
    socket = base / "containerd.sock"
    log = base / "containerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen([CONTAINERD, "--config", str(toml)], stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=out, env={"PATH": os.environ["PATH"]},
                                   start_new_session=True)  # fmt: skip
    channel = grpc.insecure_channel(f"unix://{socket}")
    stub = api_grpc.RuntimeServiceStub(channel)

    def ready() -> bool:
        try:
            stub.Version(api.VersionRequest(), timeout=30)
        except grpc.RpcError:
            return False
        return True

    env = {"PATH": os.environ["PATH"], "HOME": str(base), "TMPDIR": str(base),
           "CONTAINERD_ADDRESS": str(socket)}  # fmt: skip
    try:
        wait_ready(ready, log, "containerd")
        pause_archive(base / "pause.tar")
        imported = subprocess.run([CTR, "--namespace", "k8s.io", "images", "import",
                                   str(base / "pause.tar")], env=env, capture_output=True,
                                  text=True, timeout=TIMEOUT)  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        yield Cri(api, stub, log, env)
    finally:
        with contextlib.suppress(grpc.RpcError):
            for pod in stub.ListPodSandbox(api.ListPodSandboxRequest(), timeout=TIMEOUT).items:
                stub.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                    timeout=TIMEOUT)  # fmt: skip
                stub.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
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


def container_config(api: ModuleType, name: str, image: str, command: list[str]) -> Any:
    """What the kubelet sends for a container of such a pod (`command` empty: none given)."""
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name),
        image=api.ImageSpec(image=image),
        command=command,
        log_path=f"{name}.log",
        linux=api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
            namespace_options=api.NamespaceOption(network=api.NODE))),
    )  # fmt: skip


def run_to_exit(cri: Cri, sandbox: str, pod: Any, container: Any) -> tuple[int, str]:
    """CreateContainer, StartContainer, ContainerStatus until it has exited, StopContainer,
    RemoveContainer, as the kubelet runs a container of a pod with restartPolicy Never: its exit
    code and its log file's text (stdout and stderr)."""
    api, runtime = cri.api, cri.runtime
    cid = runtime.CreateContainer(api.CreateContainerRequest(
        pod_sandbox_id=sandbox, config=container, sandbox_config=pod),
        timeout=TIMEOUT).container_id  # fmt: skip
    try:
        runtime.StartContainer(api.StartContainerRequest(container_id=cid), timeout=TIMEOUT)
        deadline = time.monotonic() + READY  # (then the failure shows where it stopped)
        while True:
            status = runtime.ContainerStatus(api.ContainerStatusRequest(container_id=cid),
                                             timeout=TIMEOUT).status  # fmt: skip
            if status.state == api.CONTAINER_EXITED or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status.state == api.CONTAINER_EXITED, f"{status}\n{log_of(cri.log)}"
        return status.exit_code, cri_log(Path(pod.log_directory) / container.log_path)
    finally:
        runtime.StopContainer(api.StopContainerRequest(container_id=cid, timeout=10),
                              timeout=TIMEOUT)  # fmt: skip
        runtime.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=TIMEOUT)


def remove_pod(cri: Cri, sandbox: str) -> None:
    api, runtime = cri.api, cri.runtime
    runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=TIMEOUT)
    runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=TIMEOUT)


def cri_log(path: Path) -> str:
    """A CRI log file's text: each line `TIME STREAM TAG TEXT` (F: a full line, P: partial)."""
    text = ""
    for line in path.read_text().splitlines():
        _time, _stream, tag, content = [*line.split(" ", 3), ""][:4]
        text += content + ("\n" if tag == "F" else "")
    return text


def push_signed(host: str, base: Path, size: int = 0) -> dict[str, str]:
    """A node's registry images, as the engine's pull and lazy start meet them: a fake image
    (luksfixtures, `size` bytes of layer) pushed unsigned to team/unsigned:v1, then signed by a
    new SSH key and pushed to team/app:v1. The trust file naming that key, the image's digest
    and its directory."""
    from clirunner import invoke
    from luksfixtures import fake_image

    image = fake_image(base / "img", size=size)
    assert invoke("push", "--no-tls-verify", str(image), f"{host}/team/unsigned:v1")[0] == 0
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "k")],
                   check=True)  # fmt: skip
    trust = base / "allowed_signers"
    trust.write_text("a@b " + " ".join((base / "k.pub").read_text().split()[:2]) + "\n")
    assert invoke("sign", str(image), "--sign-key", str(base / "k"))[0] == 0
    assert invoke("push", "--no-tls-verify", str(image), f"{host}/team/app:v1")[0] == 0
    digest = invoke("inspect", "--json", str(image))[1]
    return {"trust": str(trust), "digest": json.loads(digest)["digest"], "image": str(image)}
