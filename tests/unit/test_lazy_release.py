"""The journal's release of a lazy layer's NBD step (runtime/journal.py): the device attached with
the step's backend identifier is detached, and no other. After a power cut the journal names
/dev/nbdN, which by then is free or attached to a container started since: `gc` must not detach
that one."""

from __future__ import annotations

import pytest

from cryptlayer.runtime import journal, lazy
from cryptlayer.runtime.journal import Kind, Step
from cryptlayer.tools import nbd

OURS = "cryptlayer:0123abcd:0"


@pytest.fixture
def detached(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    found: list[str] = []
    monkeypatch.setattr(lazy, "detach", found.append)
    return found


def _release(step: Step) -> None:
    journal._RELEASERS[Kind.NBD](step, None)  # type: ignore[arg-type]


def test_the_recorded_device_now_another_containers_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, detached: list[str]
) -> None:
    monkeypatch.setattr(nbd, "attached", lambda: {0: "cryptlayer:ffff0000:0"})
    monkeypatch.setattr(nbd, "connected", lambda index: index == 0)
    monkeypatch.setattr(nbd, "backend", lambda index: "cryptlayer:ffff0000:0" if index == 0 else "")
    _release(Step(Kind.NBD, OURS, "/dev/nbd0"))
    assert detached == []


def test_the_device_with_the_steps_backend_is_detached(
    monkeypatch: pytest.MonkeyPatch, detached: list[str]
) -> None:
    attached = {0: "cryptlayer:ffff0000:0", 3: OURS}
    monkeypatch.setattr(nbd, "attached", lambda: attached)
    monkeypatch.setattr(nbd, "connected", lambda index: index in attached)
    monkeypatch.setattr(nbd, "backend", lambda index: attached.get(index, ""))
    _release(Step(Kind.NBD, OURS, "/dev/nbd3"))  # recorded
    _release(Step(Kind.NBD, OURS))  # a crash before the index was recorded
    assert detached == ["/dev/nbd3", "/dev/nbd3"]
