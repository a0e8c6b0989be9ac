"""An image's default process (entrypoint, cmd, env, workdir, user: the statement's config)
and what a command line changes of it: `run` for one container, `build` for the image."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from cryptlayer.errors import UsageError
from cryptlayer.image.manifest import ImageConfig

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Network(StrEnum):
    """Which network the container sees (podman's --network)."""

    NONE = "none"  # a network namespace of its own, with only loopback (the default)
    HOST = "host"  # the host's: its interfaces, loopback services and abstract sockets


@dataclass(frozen=True)
class Overrides:
    """What the command line changes of an image's default process, where it was given: `run`
    changes the container's (a COMMAND, -e, -w, -u, --network, as podman's), `build` the
    image's config (--cmd, --env, --workdir, --user, --entrypoint)."""

    command: tuple[str, ...] | None = None  # run: none or empty keeps the image's
    env: tuple[str, ...] = ()  # run: added to the image's; build: the config's, all of it
    workdir: str | None = None
    user: str | None = None
    network: Network = Network.NONE  # run only
    entrypoint: tuple[str, ...] | None = None  # build only

    def image_config(self, config: ImageConfig) -> ImageConfig:
        """`config` with each field that was given in its place (build)."""
        given: dict[str, Any] = {"entrypoint": self.entrypoint, "cmd": self.command,
                                 "env": self.env or None, "workdir": self.workdir,
                                 "user": self.user}  # fmt: skip
        return replace(config, **{k: v for k, v in given.items() if v is not None})


def process_args(config: ImageConfig, command: tuple[str, ...] | None) -> list[str]:
    """Entrypoint + (command or Cmd), as podman does; UsageError if that is empty."""
    args = [*config.entrypoint, *(command or config.cmd)]
    if not args:
        raise UsageError(
            "the image has no default command",
            "give one after the image: IMAGE -- COMMAND [ARG...]",
        )
    return args


def merge_env(*layers: tuple[str, ...]) -> list[str]:
    """KEY=VALUE lists merged left to right; later ones win."""
    merged: dict[str, str] = {}
    for env in layers:
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"invalid environment entry {item!r}", "use KEY=VALUE")
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]
