"""Linters and the strict type check are tests too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> None:
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check() -> None:
    _run(sys.executable, "-m", "ruff", "check", "src", "tests", "bench")


def test_ruff_format() -> None:
    _run(sys.executable, "-m", "ruff", "format", "--check", "src", "tests", "bench")


def test_mypy_strict() -> None:
    _run(sys.executable, "-m", "mypy")
