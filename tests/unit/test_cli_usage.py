"""The command line as a new user meets it: usage errors as one `error:` line, usage lines as
typed, --version, --format, and warnings that never bury the error."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from clirunner import invoke
from luksfixtures import fake_image

from cryptlayer import config
from cryptlayer.errors import ExitCode
from cryptlayer.runtime import hostcheck


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
    where the README promises one `error:` line. `run`'s own failures are podman's 125."""
    code, out, err = invoke(*args)
    assert code == (ExitCode.RUN_FAILED if args[0] == "run" else ExitCode.USAGE)
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


def _refused_start(tmp_path: Path) -> tuple[int, list[str]]:
    """`start` on an image whose trust file is missing: refused after the host was checked."""
    image = tmp_path / "img"
    if not image.exists():
        fake_image(image)
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    code, _, err = invoke("start", "--name", "t", "--trust", str(tmp_path / "nosigners"),
                          "-k", str(key), str(image))  # fmt: skip
    return code, err.splitlines()


@pytest.fixture
def noisy_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A host whose core dumps go to files, on storage where an erase may not hold; returns
    the config.toml cryptlayer reads (not there yet)."""
    monkeypatch.setattr(
        hostcheck,
        "problems",
        lambda: [
            hostcheck.Problem("core-pattern", "core_pattern 'core' writes core dumps to files")
        ],
    )
    monkeypatch.setattr(hostcheck, "erase_caveat", lambda image: f"{image} is on flash storage")
    config = tmp_path / "config.toml"
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(config))
    return config  # fmt: skip


def test_the_error_is_the_last_line_after_warnings(tmp_path: Path, noisy_host: Path) -> None:
    code, lines = _refused_start(tmp_path)
    assert code == ExitCode.USAGE
    assert lines[:-1] == [
        f"warning: {tmp_path}/img is on flash storage [erase-storage]",
        "warning: core_pattern 'core' writes core dumps to files: decrypted memory may reach"
        " the disk [core-pattern]",
    ]
    assert lines[-1].startswith("error: ") and "nosigners" in lines[-1], lines


def test_an_operator_silences_a_warning_they_accepted(tmp_path: Path, noisy_host: Path) -> None:
    noisy_host.write_text('quiet-warnings = ["core-pattern"]\n')
    code, lines = _refused_start(tmp_path)
    assert code == ExitCode.USAGE
    assert lines[0] == f"warning: {tmp_path}/img is on flash storage [erase-storage]"
    assert len(lines) == 2 and lines[1].startswith("error: "), lines
    noisy_host.write_text('quiet-warnings = ["core-pattern", "erase-storage"]\n')
    code, lines = _refused_start(tmp_path)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_every_warning_can_be_named_in_the_config() -> None:
    kinds = {p.kind for p in hostcheck.problems()} | {"erase-storage", "signature"}
    assert kinds <= set(config.WARNINGS)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('quiet-warnings = ["cores"]\n', "error: {config}: quiet-warnings names no warning"
         " cores: the warnings are swap, zram-writeback, core-pattern, hibernation,"
         " erase-storage, signature"),
        ('quiet-warnings = "core-pattern"\n', "error: {config}: quiet-warnings is not a list of"
         ' names: e.g. quiet-warnings = ["core-pattern"]'),
        ('trst = "/x"\n', "error: {config}: unknown setting trst (known: allow-unsigned, block-cache-size,"
         " keys, pull, quiet-warnings, registries, runtime, trust): fix or remove it"),
        # cryptlayer's own commands hold the [runtime] table to the same rules as the runtime
        ('[runtime]\nruntim = "runc"\n', "error: {config}: unknown setting runtim in [runtime]"
         " (known: runtime): fix or remove it"),
    ],
)  # fmt: skip
def test_a_wrong_setting_says_what_is_known(
    tmp_path: Path, noisy_host: Path, text: str, line: str
) -> None:
    """It read "unknown settings ['trst']: known: ['trust']" (issue 21, C10)."""
    noisy_host.write_text(text)
    code, lines = _refused_start(tmp_path)
    assert code == ExitCode.USAGE
    assert lines == [line.format(config=noisy_host)]
