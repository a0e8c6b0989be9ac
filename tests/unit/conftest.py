"""Fixtures shared by the host tier's test files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from luksfixtures import fake_image
from registryfixtures import RunningRegistry, registry


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """Debian's docker-registry over plain HTTP, one per test file."""
    with registry(tmp_path_factory.mktemp("plain")) as running:
        yield running


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """Debian's docker-registry over HTTPS with a password, one per test file."""
    with registry(tmp_path_factory.mktemp("secure"), secure=True) as running:
        yield running


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small image (header-only layer, luksfixtures.fake_image) in the test's own directory;
    test_inspect.py has its own, with a command to show."""
    return fake_image(tmp_path / "img")


@pytest.fixture
def warm_servers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The lazy servers started warm (distribution/lazy.py `_Warm`) while the test runs: their
    processes (subprocess.Popen), to check they are stopped."""
    from cryptlayer.distribution import lazy

    started: list[Any] = []
    real = lazy._Warm.__init__

    def record(self: lazy._Warm, remote: lazy.Remote) -> None:
        real(self, remote)
        started.append(self.process)

    monkeypatch.setattr(lazy._Warm, "__init__", record)
    return started
