"""podman, docker and containerd's ctr: loading an image archive into an engine's store."""

from __future__ import annotations

import os
from pathlib import Path

from cryptlayer.tools.runner import run, which

# The engine's own client settings, kept from our environment (the runner's is clean otherwise):
# which daemon or socket, which user's store (rootless podman), where a client's config lives.
CLIENT_ENV = ("HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "CONTAINER_HOST", "CONTAINERS_CONF",
              "CONTAINERS_STORAGE_CONF",
              "DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG", "CONTAINERD_ADDRESS")  # fmt: skip


def load(engine: str, archive: Path) -> None:
    """`podman load`, `docker load` or `ctr -n k8s.io images import` (Kubernetes' namespace) of
    `archive`; CommandError with the engine's message when it fails."""
    argv = {
        "podman": ["podman", "load", "--input", str(archive)],
        "docker": ["docker", "load", "--input", str(archive)],
        "containerd": ["ctr", "--namespace", "k8s.io", "images", "import", str(archive)],
    }[engine]
    run([which(argv[0]), *argv[1:]], env={k: os.environ[k] for k in CLIENT_ENV if k in os.environ})
