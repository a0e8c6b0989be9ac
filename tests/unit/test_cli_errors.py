"""Bad input on the host: every error is one `error:` line with its own exit code, no traceback."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from clirunner import invoke
from packaging.requirements import Requirement

import cryptlayer
from cryptlayer.errors import ExitCode
from cryptlayer.image.manifest import FORMAT
from cryptlayer.tools import runner

CLI = [sys.executable, "-m", "cryptlayer"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_keygen_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "k"
    assert invoke("keygen", str(key))[0] == 0
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(key.read_bytes()) == 32
    before = key.read_bytes()
    code, _, err = invoke("keygen", str(key))
    assert code == ExitCode.USAGE
    assert (
        one_error_line(err)
        == f"error: {key} already exists: choose another name; keygen never overwrites"
    )
    assert key.read_bytes() == before


def test_keygen_keys_differ(tmp_path: Path) -> None:
    invoke("keygen", str(tmp_path / "a"))
    invoke("keygen", str(tmp_path / "b"))
    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()


def test_missing_manifest(tmp_path: Path) -> None:
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.USAGE
    assert one_error_line(err) == (
        f"error: {tmp_path}/manifest.json is missing:"
        " this is not a cryptlayer image, or it is incomplete"
    )


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"format": "other"}), "is malformed: format is 'other'"),
        (json.dumps({"format": FORMAT, "layers": []}), "is malformed: it lists no layers"),
        (json.dumps({"format": FORMAT}), "is malformed: missing 'layers'"),
        (
            json.dumps({"format": FORMAT, "layers": [
                {"file": "../x", "uuid": "", "size": 1, "content_bytes": 1, "source": ""}]}),
            "is malformed: layer file name '../x' is not a plain name",
        ),
    ],
)  # fmt: skip
def test_malformed_manifest(tmp_path: Path, content: str, detail: str) -> None:
    (tmp_path / "manifest.json").write_text(content)
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED  # a damaged copy (test_verify.py)
    assert detail in one_error_line(err)


def test_image_of_the_old_format_is_refused(tmp_path: Path) -> None:
    """An image from before authentication (format v1) carries no MAC: rebuild it."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "cryptlayer.image.v1"}))
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED
    assert one_error_line(err) == (
        f"error: {tmp_path} was built by an older cryptlayer, without image authentication:"
        " rebuild it with this version"
    )


def test_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path))
    code, _, err = invoke("stop", "nosuch")
    assert code == ExitCode.USAGE
    assert (
        one_error_line(err)
        == "error: no container named 'nosuch': see `cryptlayer ps` for the names"
    )


def test_damaged_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path))
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers/bad.json").write_text('{"name": "bad"}')
    code, _, err = invoke("stop", "bad")
    assert code == ExitCode.USAGE
    assert one_error_line(err) == (
        f"error: the record {tmp_path}/containers/bad.json is damaged ('mode'):"
        " check what it holds (losetup -a, dmsetup ls), then remove it"
    )


def test_invalid_name(tmp_path: Path) -> None:
    code, _, err = invoke("start", "--key-file", "k", "--name", "../x", str(tmp_path))
    assert code == ExitCode.USAGE
    assert one_error_line(err).startswith("error: invalid name '../x'")


@pytest.mark.parametrize("command", ["start", "run"])
def test_an_engines_name_is_refused(tmp_path: Path, command: str) -> None:
    """`engine-ID` is what cryptlayer-runtime names the engine's container ID (engine/cli.py):
    a container of cryptlayer's own under such a name would be torn down, its image shredded,
    by the engine's delete of another container whose id is ID (`ctr run IMAGE web`; found by
    review)."""
    code, _, err = invoke(command, "--key-file", "k", "--name", "engine-web", str(tmp_path))
    assert code == (ExitCode.USAGE if command == "start" else ExitCode.RUN_FAILED)  # run: 125
    assert one_error_line(err).startswith(
        "error: the name engine-web is cryptlayer-runtime's (for the engine's container web)"
    )


def test_key_file_missing_and_empty(tmp_path: Path) -> None:
    code, _, err = invoke(
        "build", "--key-file", str(tmp_path / "nokey"), "-o", str(tmp_path / "i"), str(tmp_path)
    )
    assert code == ExitCode.USAGE
    assert "does not exist: create one with `cryptlayer keygen`" in one_error_line(err)
    (tmp_path / "empty").touch(mode=0o600)
    code, _, err = invoke(
        "build", "--key-file", str(tmp_path / "empty"), "-o", str(tmp_path / "i"), str(tmp_path)
    )
    assert code == ExitCode.USAGE
    assert "is empty" in one_error_line(err)


def test_ps_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path))
    code, out, _ = invoke("ps", "--json")
    assert code == 0
    assert json.loads(out) == []


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A machine without cryptsetup: the runner's PATH is the only place programs are looked up.
    monkeypatch.setitem(runner.BASE_ENV, "PATH", str(tmp_path))
    code, _, err = invoke("shred", str(tmp_path))
    assert code == ExitCode.MISSING_TOOL
    assert one_error_line(err) == (
        "error: cryptsetup not found: install it (apt-get install cryptsetup-bin) and try again"
    )


NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def _nobody_python(where: str) -> tuple[str, dict[str, str]]:
    """How user nobody runs this cryptlayer: as we do, when it can reach the checkout; else (a
    checkout in root's 0700 home, say) the system interpreter with a readable copy, in `where`,
    of cryptlayer and the packages it needs."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed"
    probe = subprocess.run([setpriv, *NOBODY, sys.executable, "-c", "import cryptlayer.cli"],
                           capture_output=True, check=False)  # fmt: skip
    if probe.returncode == 0:
        return sys.executable, {}
    site = Path(where) / "site"
    todo, seen = ["cryptlayer"], set()
    while todo:  # cryptlayer's runtime requirements, and theirs
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        dist = metadata.distribution(name)
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if source.is_file() and not str(file).startswith(".."):
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, site / file)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    shutil.copytree(Path(cryptlayer.__file__).parent, site / "cryptlayer", dirs_exist_ok=True)
    for path in [Path(where), *Path(where).rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return os.path.realpath(sys.executable), {"PYTHONPATH": str(site)}


@pytest.fixture(scope="session")
def nobody_dir() -> Iterator[str]:
    """A directory every user can read (pytest's own are 0700)."""
    where = tempfile.mkdtemp(prefix="cryptlayer-nobody-", dir="/var/tmp")
    os.chmod(where, 0o755)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def _as_nobody(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    python, extra = _nobody_python(str(kw.pop("where")))
    env = {"PATH": os.environ["PATH"], "CRYPTLAYER_ROOT": str(kw.pop("root")), **extra}
    return subprocess.run(
        [str(shutil.which("setpriv")), *NOBODY, python, "-m", "cryptlayer", *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("stop", "x"), "error: must be root to stop containers: run it with sudo"),
        (("gc",), "error: must be root to collect garbage: run it with sudo"),
    ],
)
def test_not_root(tmp_path: Path, nobody_dir: str, args: tuple[str, ...], message: str) -> None:
    tmp_path.chmod(0o755)
    result = _as_nobody(*args, root=tmp_path, where=nobody_dir)
    assert result.returncode == ExitCode.NOT_ROOT
    assert one_error_line(result.stderr) == message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_not_root_build_and_run(tmp_path: Path, nobody_dir: str) -> None:
    tmp_path.chmod(0o755)
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    src = tmp_path / "src"
    src.mkdir()
    result = _as_nobody(
        "build",
        "--key-file",
        str(key),
        "-o",
        str(tmp_path / "img"),
        str(src),
        root=tmp_path,
        where=nobody_dir,
    )
    assert result.returncode == ExitCode.NOT_ROOT
    assert (
        one_error_line(result.stderr) == "error: must be root to build an image: run it with sudo"
    )
    (tmp_path / "img").mkdir()
    (tmp_path / "img/manifest.json").write_text("{}")
    result = _as_nobody(
        "run", "--key-file", str(key), str(tmp_path / "img"), root=tmp_path, where=nobody_dir
    )
    assert result.returncode == ExitCode.RUN_FAILED  # run's own failures: podman's 125
    assert (
        one_error_line(result.stderr) == "error: must be root to start containers: run it with sudo"
    )


def _host_has_dm_crypt() -> bool:
    return Path("/dev/mapper/control").exists() and Path("/sys/module/dm_crypt").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to get as far as the kernel check")
@pytest.mark.skipif(_host_has_dm_crypt(), reason="this host has dm-crypt: the VM tier covers it")
def test_kernel_without_dm_crypt(tmp_path: Path) -> None:
    # Real on hosts like CI's, whose kernel has no device-mapper (the reason for the VM tier).
    key = tmp_path / "k"
    invoke("keygen", str(key))
    code, _, err = invoke(
        "build", "--key-file", str(key), "-o", str(tmp_path / "img"), str(tmp_path)
    )
    assert code == ExitCode.MISSING_TOOL
    assert one_error_line(err) == (
        "error: this kernel has no dm-crypt (device-mapper crypt target): load the dm_crypt "
        "module, or run cryptlayer in a VM with a stock kernel (see README)"
    )
    assert not (tmp_path / "img").exists()


def _run_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outcome: object) -> tuple[int, str]:
    """`cryptlayer run` up to the container (root, key, host check stubbed; a warning pending),
    whose run returns `outcome` if an int, raises it otherwise."""
    import contextlib

    from cryptlayer import cli
    from cryptlayer.runtime import container
    from cryptlayer.tools import system

    def fake_run(*_args: object) -> int:
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, int)
        return outcome

    monkeypatch.setattr(system, "require_root", lambda _what: None)
    monkeypatch.setattr(cli, "_credential", lambda *_a: contextlib.nullcontext(None))
    monkeypatch.setattr(cli, "_check_host", lambda _s: cli.warn("swap", "swap is not encrypted"))
    monkeypatch.setattr(container, "run", fake_run)
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(tmp_path / "none.toml"))
    code, _out, err = invoke("run", "--keep", "--name", "c", str(tmp_path), "true")
    return code, err


def test_run_passes_the_containers_status_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The job's own 8 is the job's: no error line, whatever cryptlayer's codes mean."""
    code, err = _run_with(monkeypatch, tmp_path, 8)
    assert code == 8
    assert err == "warning: swap is not encrypted [swap]\n"


def test_run_own_failures_are_125_naming_the_cause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """run exited 8 for a tampered image and 5 for a wrong key, as a job might: a script could
    not tell them apart (failed before the fix: exit 8 and 5). Now podman's 125, the cause in
    the error line, after the warnings."""
    from cryptlayer.errors import TamperedImageError, WrongKeyError

    for error, line in [
        (
            TamperedImageError("layer 0 was changed", "rebuild it"),
            "layer 0 was changed: rebuild it",
        ),
        (WrongKeyError("the key does not open the image"), "the key does not open the image"),
        (OSError(5, "Input/output error"), "Input/output error"),
    ]:
        code, err = _run_with(monkeypatch, tmp_path, error)
        assert code == ExitCode.RUN_FAILED == 125
        assert err == f"warning: swap is not encrypted [swap]\nerror: {line}\n"


def test_run_command_not_found_or_not_runnable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cryptlayer.errors import CannotInvokeError, CommandNotFoundError

    code, err = _run_with(monkeypatch, tmp_path, CommandNotFoundError("'x' is not in the image"))
    assert (code, err.splitlines()[-1]) == (127, "error: 'x' is not in the image")
    code, err = _run_with(monkeypatch, tmp_path, CannotInvokeError("'x' cannot be run"))
    assert (code, err.splitlines()[-1]) == (126, "error: 'x' cannot be run")


def test_other_commands_keep_their_codes(tmp_path: Path) -> None:
    """Only run maps its own failures to 125: verify of a missing image is still bad input."""
    code, _out, err = invoke("verify", str(tmp_path / "none"))
    assert code == ExitCode.USAGE
    assert one_error_line(err).startswith("error: ")


def test_unexpected_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(_image: Path) -> None:
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr("cryptlayer.image.inspect.inspect_image", boom)
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.FAILURE
    assert err == ("error: unexpected RuntimeError: something nobody foresaw: run again with"
                   " --debug for the traceback, and report it\n")  # fmt: skip
