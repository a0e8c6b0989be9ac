"""The command line as a new user meets it: usage errors as one `error:` line, usage lines as
typed, --version, --format, and warnings that never bury the error."""

from __future__ import annotations

from importlib import metadata

import pytest
from typer.testing import CliRunner

from cryptlayer.cli import app
from cryptlayer.errors import ExitCode


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["run"], "error: missing argument 'IMAGE': see `cryptlayer run --help`"),
        (["build", "-o"], "error: option '-o' requires an argument: see `cryptlayer build --help`"),
        (["inspect", "--bogus", "img"], "error: no such option: --bogus: see `cryptlayer inspect --help`"),
        (["nosuch"], "error: no such command 'nosuch': see `cryptlayer --help`"),
        (["stop"], "error: missing argument 'NAME': see `cryptlayer stop --help`"),
        (["run", "--scratch-size", "0", "img"],
         "error: invalid value: '0' is not a size like 512M or 2G: see `cryptlayer run --help`"),
        (["ps", "extra"], "error: got unexpected extra argument(s) (extra): see `cryptlayer ps --help`"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_error_line(args: list[str], line: str) -> None:
    """click's three-line `Usage: ... Try ... Error: ...` box was what a mistyped command got,
    where the README promises one `error:` line."""
    code, out, err = invoke(*args)
    assert code == ExitCode.USAGE
    assert err == line + "\n"
    assert out == ""


def test_usage_lines_read_as_typed() -> None:
    """typer wrote `{IMAGE}` for a required argument and `[command]...` for run's command."""
    code, out, _ = invoke("run", "--help")
    assert code == 0
    usage = out.splitlines()[0]
    assert usage.endswith(" run [OPTIONS] IMAGE [COMMAND [ARG]...]"), usage
    for command in ("inspect", "verify", "push", "pull", "shred", "stop", "keygen"):
        code, out, _ = invoke(command, "--help")
        assert code == 0
        assert "{" not in out.splitlines()[0], out.splitlines()[0]


def test_version() -> None:
    code, out, _ = invoke("--version")
    assert code == 0
    assert out == f"cryptlayer {metadata.version('cryptlayer')}\n"


def test_no_arguments_shows_the_help() -> None:
    code, _, err = invoke()
    assert code == ExitCode.USAGE
    assert "Usage:" in err and "Commands:" in err


def test_help_exits_0() -> None:
    code, out, err = invoke("--help")
    assert (code, err) == (0, "")
    assert "--version" in out
