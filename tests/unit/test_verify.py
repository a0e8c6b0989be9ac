"""image/verify.py: a copy of an image, checked as a mirror or CI job checks it (issue 21 C6):
any damage to it is exit 8 from `verify`, whatever was damaged."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirunner import invoke
from copyfixtures import DAMAGE, one_line
from luksfixtures import fake_image

from cryptlayer.errors import ExitCode


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_verify_exits_8_on_any_damage(tmp_path: Path, case: str) -> None:
    image = fake_image(tmp_path / "img")
    assert invoke("verify", str(image))[0] == 0
    name, damage = DAMAGE[case]
    damage(image / name)  # type: ignore[operator]
    code, out, err = invoke("verify", str(image))
    assert code == ExitCode.TAMPERED, err
    assert out == ""
    line = one_line(err)
    assert line.startswith("error: ") and name in line


def test_verify_of_what_is_no_image_is_bad_input(tmp_path: Path) -> None:
    """Not a damaged copy: not an image at all (a wrong path, say)."""
    code, _, err = invoke("verify", str(tmp_path))
    assert code == ExitCode.USAGE
    assert "manifest.json is missing" in one_line(err)
