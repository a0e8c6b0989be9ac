"""image/process.py: the container's process as podman makes it (args, env, overrides)."""

from __future__ import annotations

import pytest

from cryptlayer.errors import (
    UsageError,
)
from cryptlayer.image.manifest import ImageConfig
from cryptlayer.image.process import Overrides, merge_env, process_args


def test_process_args_like_podman() -> None:
    cfg = ImageConfig(entrypoint=("/entry",), cmd=("default",))
    assert process_args(cfg, ()) == ["/entry", "default"]
    assert process_args(cfg, ("x", "y")) == ["/entry", "x", "y"]
    assert process_args(ImageConfig(cmd=("a",)), ("b",)) == ["b"]
    with pytest.raises(UsageError, match="no default command"):
        process_args(ImageConfig(), ())


def test_merge_env_later_wins_and_rejects_garbage() -> None:
    assert merge_env(("A=1", "B=2"), ("A=3",)) == ["A=3", "B=2"]
    with pytest.raises(UsageError, match="use KEY=VALUE"):
        merge_env(("NOEQUALS",))


def test_build_overrides_replace_only_what_was_given() -> None:
    """build's --cmd/--env/...: the same Overrides as run's, written into the image's config."""
    base = ImageConfig(entrypoint=("/init",), cmd=("serve",), env=("A=1",), workdir="/srv")
    assert Overrides().image_config(base) == base
    changed = Overrides(command=(), env=("B=2",), user="app").image_config(base)
    assert changed == ImageConfig(entrypoint=("/init",), cmd=(), env=("B=2",), workdir="/srv",
                                  user="app")  # fmt: skip
    shell = ("/bin/sh", "-c")
    assert Overrides(entrypoint=shell).image_config(base).entrypoint == shell
