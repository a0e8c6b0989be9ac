"""The CLI run in-process, as the host tier's tests call it (the VM tier has its own, in
tests/vm/conftest.py)."""

from __future__ import annotations

from typer.testing import CliRunner

from cryptlayer.cli import app


def invoke(*args: str, input: str | bytes | None = None) -> tuple[int, str, str]:
    """`cryptlayer ARGS...` with INPUT on stdin: (exit code, stdout, stderr). An exception that
    escapes the CLI's own handling fails the test with its traceback."""
    result = CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr
