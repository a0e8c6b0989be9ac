"""cryptlayer-runtime (engine/cli.py): runc's and crun's command line as engines write it, the
decision at create and run, hostile bundles, the error in the runtime's log, and the hand-over
to the real runtime by exec (a stand-in runtime that records what it was given proves it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptlayer import config, paths
from cryptlayer.engine import cli as engine
from cryptlayer.engine.cli import Invocation, Refused, encrypted_image
from cryptlayer.runtime import state

RUNTIME = str(Path(sys.executable).with_name("cryptlayer-runtime"))

# A stand-in runtime: records its argv, environment, ignored signals, pid and stdin, and exits 42.
RECORDER = """#!/bin/sh
printf '%s\\0' "$0" "$@" > "$RECORD/argv"
env > "$RECORD/env"
grep SigIgn /proc/$$/status > "$RECORD/sigign"
echo $$ > "$RECORD/pid"
cat > "$RECORD/stdin"
echo "the real runtime's output"
exit 42
"""


# -- the command line


@pytest.mark.parametrize(
    ("argv", "command", "log", "log_format", "args"),
    [
        # podman (conmon's --runtime-arg, then conmon's own create arguments)
        (["--log-format=json", "--log", "/b/oci-log", "create", "--bundle", "/b", "--pid-file",
          "/b/pidfile", "--console-socket", "/s", "cid"], "create", "/b/oci-log", "json",
         ["--bundle", "/b", "--pid-file", "/b/pidfile", "--console-socket", "/s", "cid"]),
        (["--systemd-cgroup", "--log-format=json", "--log=/b/oci-log", "start", "cid"], "start",
         "/b/oci-log", "json", ["cid"]),
        (["--cgroup-manager", "disabled", "state", "cid"], "state", None, "text", ["cid"]),
        # containerd-shim-runc-v2 (go-runc) and dockerd (through it)
        (["--root", "/run/containerd/runc/k8s.io", "--log", "/run/t/log.json", "--log-format",
          "json", "--systemd-cgroup", "create", "--bundle", "/t", "--pid-file", "/t/init.pid",
          "cid"], "create", "/run/t/log.json", "json", ["--bundle", "/t", "--pid-file",
                                                        "/t/init.pid", "cid"]),
        (["--root", "/r", "--debug", "--rootless=false", "kill", "--all", "cid", "9"], "kill",
         None, "text", ["--all", "cid", "9"]),
        (["--root=/r", "--rootless", "true", "delete", "--force", "cid"], "delete", None, "text",
         ["--force", "cid"]),
        # Go's flag package: one dash for a long option; crun's argp: abbreviations
        (["-root", "/r", "-log", "/l", "-log-format", "json", "ps", "cid"], "ps", "/l", "json",
         ["cid"]),
        (["--log-f=json", "--log-level", "debug", "--criu", "/usr/sbin/criu", "features"],
         "features", None, "json", []),
        # an option of a newer runtime: a value unless a command follows it
        (["--future", "value", "create", "cid"], "create", None, "text", ["cid"]),
        (["--future", "create", "cid"], "create", None, "text", ["cid"]),
        (["--future=1", "run", "cid"], "run", None, "text", ["cid"]),
        (["--version"], None, None, "text", []),
        (["-v"], None, None, "text", []),
        (["--", "state", "cid"], "state", None, "text", ["cid"]),
        ([], None, None, "text", []),
    ],
)  # fmt: skip
def test_global_options(
    argv: list[str], command: str | None, log: str | None, log_format: str, args: list[str]
) -> None:
    invocation = Invocation(argv)
    assert (invocation.command, invocation.log, invocation.log_format, invocation.args) == (
        command, log, log_format, args)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "bundle", "config_file"),
    [
        (["cid"], ".", "config.json"),
        (["--bundle", "/b", "cid"], "/b", "config.json"),
        (["--bundle=/b", "cid"], "/b", "config.json"),
        (["-b", "/b", "cid"], "/b", "config.json"),
        (["-b/b", "cid"], "/b", "config.json"),  # argp
        (["-b=/b", "cid"], "/b", "config.json"),  # Go's flag package
        (["-bundle", "/b", "cid"], "/b", "config.json"),  # Go's flag package
        (["--bund", "/b", "cid"], "/b", "config.json"),  # argp's abbreviation
        (["-db", "/b", "cid"], "/b", "config.json"),  # argp: -d (detach), then -b's value
        (["--pid-file", "/p", "--console-socket", "/s", "--preserve-fds", "2", "--no-pivot",
          "--no-new-keyring", "--pidfd-socket", "/f", "--bundle", "/b", "cid"], "/b",
         "config.json"),
        (["--bundle", "/a", "--bundle", "/b", "cid"], "/b", "config.json"),  # the last, as both
        # crun's --config: config.json is the bundle's; another name, from the working directory
        (["--bundle", "/b", "--config", "config.json", "cid"], "/b", "config.json"),
        (["--bundle", "/b", "-f", "/etc/x.json", "cid"], "/b", "/etc/x.json"),
        (["--bundle", "/b", "--config=x.json", "cid"], "/b", os.path.abspath("x.json")),
        (["--pid-file", "--bundle", "cid"], ".", "config.json"),  # a value, not an option
        (["--", "--bundle", "/b"], ".", "config.json"),
        (["--bundle", "", "cid"], ".", "config.json"),  # runc: its working directory
    ],
)  # fmt: skip
def test_bundle_options(args: list[str], bundle: str, config_file: str) -> None:
    assert Invocation(["create", *args]).bundle_config() == (bundle, config_file)
    operands = Invocation(["create", *args]).operands()
    assert operands == (["--bundle", "/b"] if args[0] == "--" else ["cid"])
    assert Invocation(["--root", "/r", "run", *args]).bundle_config() == (bundle, config_file)
    restore = ["--detach", "--image-path", "/ckpt", "--work-path", "/w", "--manage-cgroups-mode",
               "soft", "--tcp-established", *args]  # fmt: skip
    assert Invocation(["restore", *restore]).bundle_config() == (bundle, config_file)


# -- the decision


def bundle_with(tmp_path: Path, spec: object) -> str:
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return str(tmp_path)


def spec(annotations: dict[str, object] | None = None, env: list[str] | None = None) -> object:
    return {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": env or ["PATH=/bin"]},
            "root": {"path": "rootfs"}, "annotations": annotations or {}}  # fmt: skip


@pytest.mark.parametrize(
    ("annotations", "env", "image"),
    [
        ({}, ["PATH=/bin", "TERM=xterm"], None),
        ({"io.kubernetes.cri.sandbox-id": "x"}, None, None),
        ({"org.cryptlayer.image": "/srv/img"}, None, "/srv/img"),
        ({}, ["PATH=/bin", "CRYPTLAYER_IMAGE=docker://reg/app:v1"], "docker://reg/app:v1"),
        ({"org.cryptlayer.image": "/srv/img"}, ["CRYPTLAYER_IMAGE=/srv/img"], "/srv/img"),
        ({}, ["CRYPTLAYER_IMAGE_X=1", "XCRYPTLAYER_IMAGE=1"], None),
        # a pod's sandbox gets the pod's annotations (containerd's pod_annotations), never its
        # image: created under its own sandbox id (the container id here is "c1")
        (
            {"org.cryptlayer.image": "/srv/img", "io.kubernetes.cri.container-type": "sandbox",
             "io.kubernetes.cri.sandbox-id": "c1"},
            None,
            None,
        ),
        (
            {"org.cryptlayer.image": "/srv/img", "io.kubernetes.cri-o.ContainerType": "sandbox",
             "io.kubernetes.cri-o.SandboxID": "c1"},
            None,
            None,
        ),
        (
            {"org.cryptlayer.image": "/srv/img", "io.kubernetes.cri.container-type": "container",
             "io.kubernetes.cri.sandbox-id": "c1"},
            None,
            "/srv/img",
        ),
        (
            {"org.cryptlayer.image": "/srv/img", "io.kubernetes.cri.container-type": "sandbox",
             "io.kubernetes.cri.sandbox-id": ["c1"]},
            None,
            "/srv/img",
        ),
    ],
)  # fmt: skip
def test_which_image(
    tmp_path: Path, annotations: dict[str, object], env: list[str] | None, image: str | None
) -> None:
    bundle = bundle_with(tmp_path, spec(annotations, env))
    assert encrypted_image(bundle, "config.json", ["c1"]) == image


@pytest.mark.parametrize(
    ("annotations", "env", "message"),
    [
        ({"org.cryptlayer.image": "/a"}, ["CRYPTLAYER_IMAGE=/b"], "name two different images"),
        ({}, ["CRYPTLAYER_IMAGE=/a", "CRYPTLAYER_IMAGE=/b"], "sets CRYPTLAYER_IMAGE twice"),
        ({"org.cryptlayer.image": ""}, None, "annotation org.cryptlayer.image is empty"),
        ({}, ["CRYPTLAYER_IMAGE="], "environment variable CRYPTLAYER_IMAGE is empty"),
        ({"org.cryptlayer.image": 7}, None, "org.cryptlayer.image is not a string"),
        ({"org.cryptlayer.key-file": "/k"}, None, "org.cryptlayer.key-file would carry key"),
        ({}, ["CRYPTLAYER_KEY=abc"], "CRYPTLAYER_KEY would carry key material"),
    ],
)
def test_refused_specs(
    tmp_path: Path, annotations: dict[str, object], env: list[str] | None, message: str
) -> None:
    with pytest.raises(Refused, match=message):
        encrypted_image(bundle_with(tmp_path, spec(annotations, env)), "config.json")


def test_hostile_config_files(tmp_path: Path) -> None:
    """What the bundle's config.json must be before a byte of it is parsed: the bundle's own
    regular file, of bounded size, strict JSON. Anything else is refused with the reason, never
    passed through unread (it could name an encrypted image) and never blocked on."""

    def huge(p: Path) -> None:
        p.touch()
        os.truncate(p, engine.MAX_CONFIG + 1)  # sparse: nothing is written

    cases = {
        "symlink": lambda p: p.symlink_to("/etc/hostname"),
        "fifo": lambda p: os.mkfifo(p),  # opening it for reading would block forever
        "directory": lambda p: p.mkdir(),
        "huge": huge,
        "not json": lambda p: p.write_text("{annotations: 1"),
        "not utf-8": lambda p: p.write_bytes(b'{"a": "\xff"}'),
        "array": lambda p: p.write_text("[]"),
        "twice": lambda p: p.write_text('{"annotations": {}, "annotations": {"a": "b"}}'),
        "nan": lambda p: p.write_text('{"x": NaN}'),
        "deep": lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
        "wrong types": lambda p: p.write_text('{"process": {"env": [1]}}'),
    }
    expected = {
        "symlink": "config.json is a symbolic link: cryptlayer-runtime reads the bundle's own",
        "fifo": r"config.json is not a regular file \(a FIFO\)",
        "directory": r"config.json is not a regular file \(a directory\)",
        "huge": f"config.json has {engine.MAX_CONFIG + 1} bytes, more than {engine.MAX_CONFIG}",
        "not json": "config.json is not valid JSON: Expecting property name",
        "not utf-8": "config.json is not UTF-8 text",
        "array": "config.json is not a JSON object",
        "twice": "config.json is not valid JSON: the key 'annotations' appears twice",
        "nan": "config.json is not valid JSON: NaN is not JSON",
        "deep": "config.json nests too deeply",
        "wrong types": "config.json: process.env must be a list of strings",
    }
    for name, make in cases.items():
        bundle = tmp_path / name.replace(" ", "-")
        bundle.mkdir()
        make(bundle / "config.json")
        with pytest.raises(Refused) as caught:
            encrypted_image(str(bundle), "config.json")
        assert re.search(expected[name], str(caught.value)), name
        assert f"{bundle}/config.json" in str(caught.value), name


def test_no_config_file_names_nothing(tmp_path: Path) -> None:
    """The runtime reports a missing bundle or config.json itself, as engines expect."""
    assert encrypted_image(str(tmp_path), "config.json") is None
    assert encrypted_image(str(tmp_path / "absent"), "config.json") is None
    assert encrypted_image(str(tmp_path), str(tmp_path / "other.json")) is None


def test_an_unreadable_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(Refused, match=r"cannot open the bundle .*/file: Not a directory"):
        encrypted_image(str(tmp_path / "file"), "config.json")


# -- the hand-over, through the installed entry point


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment whose PATH finds a recording crun and runc, no config file, a private
    cache directory; RECORD says where the stand-in writes."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name in ("crun", "runc"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    yield {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record),
           "CRYPTLAYER_CONFIG": str(tmp_path / "config.toml"),
           "CRYPTLAYER_RUNDIR": str(tmp_path / "run")}  # fmt: skip


def run_runtime(
    argv: list[str], env: dict[str, str], stdin: bytes = b"", cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[bytes], int]:
    proc = subprocess.Popen([RUNTIME, *argv], env=env, cwd=cwd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = proc.communicate(stdin, timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def recorded(env: dict[str, str], what: str) -> str:
    return (Path(env["RECORD"]) / what).read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["--root", "/run/r", "--log", "/tmp/l.json", "--log-format", "json", "state", "c1"],
        ["--systemd-cgroup", "kill", "--all", "c1", "KILL"],
        ["exec", "--process", "/tmp/p.json", "--detach", "--pid-file", "/tmp/p", "c1"],
        ["features"],
        ["--version"],
        ["checkpoint", "--image-path", "/x", "c1"],
        ["no-such-command", "with spaces", "", "--and=odd\nargs"],
    ],
)
def test_passes_through_by_exec(fake: dict[str, str], argv: list[str]) -> None:
    """The real runtime gets the same arguments, the engine's environment unchanged (not the
    LC_CTYPE that Python's start-up adds under the C locale), SIGPIPE back to its default, our
    stdin and stdout, and the same process (exec, not a child): its exit status is ours."""
    env = {**fake, "LC_ALL": "", "LANG": "", "ENGINE_SAYS": "1"}
    del env["LC_ALL"], env["LANG"]
    result, pid = run_runtime(argv, env, stdin=b"the engine's input")
    assert result.returncode == 42, result.stderr
    assert result.stdout == b"the real runtime's output\n"
    assert recorded(fake, "argv").split("\0")[:-1] == [
        str(Path(env["PATH"].split(":")[0]) / "crun"),
        *argv,
    ]
    assert int(recorded(fake, "pid")) == pid
    assert recorded(fake, "stdin") == "the engine's input"
    seen = dict(line.split("=", 1) for line in recorded(fake, "env").splitlines() if "=" in line)
    assert seen["ENGINE_SAYS"] == "1"
    assert "LC_CTYPE" not in seen
    assert not int(recorded(fake, "sigign").split()[1], 16) & (1 << (13 - 1))  # SIGPIPE


def test_create_and_run_without_an_image_pass_through(fake: dict[str, str], tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, spec({"io.podman.annotations.autoremove": "TRUE"}))
    for argv in (["create", "--bundle", bundle, "--pid-file", f"{bundle}/pid", "c1"],
                 ["--root", "/r", "run", "-d", "c1"]):  # fmt: skip
        result, _ = run_runtime(argv, fake, cwd=Path(bundle))
        assert result.returncode == 42, result.stderr
        assert recorded(fake, "argv").split("\0")[1:-1] == argv
    # no config.json: the real runtime says so (or shows its help)
    for argv in (["create", "--bundle", "/nonexistent", "c1"], ["run", "--help"]):
        result, _ = run_runtime(argv, fake, cwd=Path(fake["RECORD"]).parent / "bin")
        assert result.returncode == 42, result.stderr
        assert recorded(fake, "argv").split("\0")[1:-1] == argv


def test_the_configured_runtime(fake: dict[str, str], tmp_path: Path) -> None:
    """[runtime] runtime picks runc (on PATH) or a path; a change of the file is seen at once,
    although the answer is kept between calls."""
    conf = Path(fake["CRYPTLAYER_CONFIG"])
    bin_dir = Path(fake["PATH"].split(":")[0])
    other = tmp_path / "elsewhere" / "my-runtime"
    other.parent.mkdir()
    shutil.copy(bin_dir / "crun", other)
    for setting, expected in [('runtime = "runc"', bin_dir / "runc"), ("", bin_dir / "crun"),
                              (f'runtime = "{other}"', other),
                              ('runtime = "crun"', bin_dir / "crun")]:  # fmt: skip
        conf.write_text(f'trust = "/etc/signers"\n[runtime]\n{setting}\n')
        for _ in range(2):  # parsed, then from what was kept
            result, _ = run_runtime(["state", "c1"], fake)
            assert result.returncode == 42, result.stderr
            assert recorded(fake, "argv").split("\0")[0] == str(expected)
    kept = list((tmp_path / "run").iterdir())
    assert [p.name.split(".")[1] for p in kept] == ["engine-runtime"]


def test_the_kept_answer_never_takes_a_containers_name(
    fake: dict[str, str], tmp_path: Path
) -> None:
    """The run directory holds each container's directory under its name: what the runtime keeps
    there is named as cryptlayer's own entries are (.images, .oci), never as a container may be,
    so `cryptlayer run --name` cannot meet it (and fail on a file where its directory goes)."""
    Path(fake["CRYPTLAYER_CONFIG"]).write_text('[runtime]\nruntime = "runc"\n')
    assert run_runtime(["state", "c1"], fake)[0].returncode == 42
    kept = list((tmp_path / "run").iterdir())
    assert kept
    for entry in kept:
        assert not state.NAME_RE.match(entry.name), entry.name


def test_a_cache_others_may_write_is_not_read(fake: dict[str, str], tmp_path: Path) -> None:
    conf = Path(fake["CRYPTLAYER_CONFIG"])
    conf.write_text('[runtime]\nruntime = "runc"\n')
    assert run_runtime(["state", "c1"], fake)[0].returncode == 42
    (kept,) = (tmp_path / "run").iterdir()
    text = kept.read_text()
    kept.write_text(text.replace("runc", "/bin/false"))
    kept.chmod(0o666)
    assert run_runtime(["state", "c1"], fake)[0].returncode == 42  # not /bin/false's 1
    assert recorded(fake, "argv").split("\0")[0].endswith("/runc")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '[runtime]\nruntime = "youki"\n',
            "[runtime] runtime youki is not crun, runc or an absolute path",
        ),
        ('[runtime]\nruntime = "bin/crun"\n', "is not crun, runc or an absolute path"),
        ("[runtime]\nruntime = 1\n", "[runtime] runtime int is not crun, runc or an absolute path"),
        ('[runtime]\nruntim = "runc"\n', "unknown setting runtim in [runtime] (known: runtime)"),
        ('runtime = "runc"\n', "runtime is not a table"),
        (
            '[runtime]\nruntime = "/nonexistent/crun"\n',
            "no OCI runtime /nonexistent/crun: install it",
        ),
        ("[runtime\n", "cannot read"),
    ],
)
def test_config_errors(fake: dict[str, str], content: str, message: str) -> None:
    Path(fake["CRYPTLAYER_CONFIG"]).write_text(content)
    result, _ = run_runtime(["state", "c1"], fake)
    assert result.returncode == engine.FAILED
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("error: cryptlayer-runtime: ")
    assert message in line
    assert not Path(fake["RECORD"], "argv").exists()


@pytest.mark.parametrize(
    ("what", "change", "shown"),
    [
        ("config", lambda conf, prog: conf.chmod(0o666), "{conf} is writable by group or others"),
        ("config", lambda conf, prog: conf.parent.chmod(0o777), "{confdir} is writable by group"),
        ("config", lambda conf, prog: os.chown(conf, 65534, 65534), "{conf} is owned by uid 65534"),
        ("runtime", lambda conf, prog: prog.chmod(0o777), "{prog} is writable by group or others"),
        ("runtime", lambda conf, prog: prog.parent.chmod(0o775), "{progdir} is writable by group"),
        ("runtime", lambda conf, prog: os.chown(prog.parent, 65534, 0), "{progdir} is owned by"),
        # a symbolic link to it from a directory anyone may write: whoever can replace the link
        # chooses the program as well
        ("runtime", lambda conf, prog: (prog.parent.parent / "open").chmod(0o777),
         "{root}/open is writable by group or others"),
        # ... and a link on the way from one link to the next (safe/hop -> open/link -> prog)
        ("hop", lambda conf, prog: (prog.parent.parent / "open").chmod(0o777),
         "{root}/open is writable by group or others"),
    ],
)  # fmt: skip
def test_what_others_can_write_never_picks_the_program(
    fake: dict[str, str], tmp_path: Path, what: str, change: object, shown: str
) -> None:
    """cryptlayer-runtime runs as root and execs what the config file names: a config file, or a
    program, that another user could change or replace (writable by group or others, owned by
    another user, in such a directory, as named or as the symbolic links resolve) would let
    that user choose what root runs. Refused, as a kept answer from such a file is."""
    confdir = tmp_path / "etc"
    confdir.mkdir()
    conf = confdir / "config.toml"
    prog = tmp_path / "opt" / "bin" / "my-runtime"
    prog.parent.mkdir(parents=True)
    shutil.copy(Path(fake["PATH"].split(":")[0]) / "crun", prog)
    (tmp_path / "opt" / "open").mkdir()
    (tmp_path / "opt" / "open" / "link").symlink_to(prog)
    (tmp_path / "opt" / "safe").mkdir()
    (tmp_path / "opt" / "safe" / "hop").symlink_to("../open/link")
    named = tmp_path / "opt" / "open" / "link" if "open" in shown else prog
    if what == "hop":
        named = tmp_path / "opt" / "safe" / "hop"
    conf.write_text(f'[runtime]\nruntime = "{named}"\n')
    env = {**fake, "CRYPTLAYER_CONFIG": str(conf)}
    assert run_runtime(["state", "c1"], env)[0].returncode == 42  # (and the answer is kept)
    assert callable(change)
    change(conf, prog)
    result, _ = run_runtime(["state", "c1"], env)
    assert result.returncode == engine.FAILED, result.stdout
    (line,) = result.stderr.decode().splitlines()
    expected = shown.format(conf=conf, confdir=confdir, prog=prog, progdir=prog.parent,
                            root=tmp_path / "opt")  # fmt: skip
    assert line.startswith("error: cryptlayer-runtime: "), line
    assert expected in line, line
    assert "chmod go-w" in line or "chown" in line, line


def test_a_sticky_directory_is_not_others_to_replace(fake: dict[str, str], tmp_path: Path) -> None:
    """/tmp-like (mode 1777): others may write into it but not replace what is root's."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    prog = sticky / "my-runtime"
    shutil.copy(Path(fake["PATH"].split(":")[0]) / "crun", prog)
    Path(fake["CRYPTLAYER_CONFIG"]).write_text(f'[runtime]\nruntime = "{prog}"\n')
    result, _ = run_runtime(["state", "c1"], fake)
    assert result.returncode == 42, result.stderr
    assert recorded(fake, "argv").split("\0")[0] == str(prog)


def test_never_runs_itself(fake: dict[str, str]) -> None:
    Path(fake["CRYPTLAYER_CONFIG"]).write_text(f'[runtime]\nruntime = "{RUNTIME}"\n')
    result, _ = run_runtime(["state", "c1"], fake)
    assert result.returncode == engine.FAILED
    assert b"is cryptlayer-runtime itself" in result.stderr


def test_where_the_runtime_is_found(
    fake: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PATH first, then where engines look (containers.conf's list), never a relative PATH
    entry; none: one line that says what to install."""
    bin_dir = fake["PATH"].split(":")[0]
    monkeypatch.setenv("PATH", f"relative:{bin_dir}")
    assert engine.resolve("runc") == f"{bin_dir}/runc"
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(engine, "SEARCH", (bin_dir,))
    assert engine.resolve("crun") == f"{bin_dir}/crun"
    monkeypatch.setattr(engine, "SEARCH", ())
    with pytest.raises(Refused, match=r"no OCI runtime runc \(on PATH or in \): install it"
                                      r" \(apt-get install runc\)"):  # fmt: skip
        engine.resolve("runc")
    (tmp_path / "crun").write_text("not executable")
    with pytest.raises(Refused, match="no OCI runtime crun"):
        engine.resolve("crun")


@pytest.mark.parametrize("how", ["annotation", "env"])
@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.parametrize("command", ["create", "run", "restore"])
def test_a_bad_image_name_fails_in_the_runtimes_log(
    fake: dict[str, str], tmp_path: Path, how: str, log_format: str, command: str
) -> None:
    """An image that is neither a path nor a docker:// reference (and restore, always): one
    error line on stderr and in the log (runc's and crun's JSON, which podman and containerd read), exit 125, and the real
    runtime never runs."""
    given = ({"org.cryptlayer.image": "srv/app"}, None) if how == "annotation" else (
        None, ["CRYPTLAYER_IMAGE=srv/app"])  # fmt: skip
    bundle = bundle_with(tmp_path, spec(*given))
    log = tmp_path / "log.json"
    log.write_text('{"level":"info","msg":"an earlier line","time":"2026-01-01T00:00:00Z"}\n')
    extra = ["--detach", "--image-path", f"{bundle}/checkpoint"] if command == "restore" else []
    argv = ["--root", "/r", "--log", str(log), f"--log-format={log_format}", command,
            "--bundle", bundle, "--pid-file", f"{bundle}/pid", *extra, "c1"]  # fmt: skip
    result, _ = run_runtime(argv, fake)
    assert result.returncode == engine.FAILED == 125
    message = ("cryptlayer-runtime: the image srv/app is neither an absolute path nor a docker://"
               " reference: name the image directory on the node by its absolute path, or a"
               " registry image as docker://REGISTRY/REPO:TAG")  # fmt: skip
    if command == "restore":
        message = ("cryptlayer-runtime: the container names the encrypted image"
                   " srv/app: restoring a checkpoint of one is not available (its"
                   " memory would have been written to disk)")  # fmt: skip
    assert result.stderr.decode() == f"error: {message}\n"
    assert result.stdout == b""
    _earlier, last = log.read_text().splitlines()
    if log_format == "json":
        record = json.loads(last)
        assert record["level"] == "error"
        assert record["msg"] == message
        assert record["time"].endswith("Z") and record["time"][:2] == "20"
    else:
        assert last.startswith('time="20') and f"level=error msg={json.dumps(message)}" in last
    assert not Path(fake["RECORD"], "argv").exists()


@pytest.mark.parametrize(
    ("image", "shown"),
    [
        ("docker://reg.example/team/app:v1\n\x1b[31mforged", "docker://reg.example/team/app:v1\\n"),
        ("docker://reg.example/Team\nx", "docker://reg.example/Team\\nx"),
        ("docker://reg.\nexample/team/app", "docker://reg.\\nexample/team/app"),
        ("docker://evil.example?/team/app", "docker://evil.example?/team/app"),
    ],
)
def test_a_hostile_reference_fails_on_one_line(
    fake: dict[str, str], tmp_path: Path, image: str, shown: str
) -> None:
    """A reference from the spec with a newline or a terminal escape in it (the tag, the
    repository, the registry's host, which nothing checked) is shown escaped, on one line, and a
    registry host that is not HOST[:PORT] is refused before anything is fetched (found by
    review: the message carried the spec's text raw)."""
    config = tmp_path / "config.toml"
    config.write_text("allow-unsigned = true\n")
    bundle = bundle_with(tmp_path, spec({"org.cryptlayer.image": image}))
    env = {**fake, "CRYPTLAYER_ROOT": str(tmp_path / "state")}
    result, _ = run_runtime(["create", "--bundle", bundle, "c1"], env)
    assert result.returncode == 125
    text = result.stderr.decode()
    assert text.startswith(f"error: cryptlayer-runtime: {shown}") or shown in text
    assert text.count("\n") == 1 and "\x1b" not in text
    assert not Path(fake["RECORD"], "argv").exists()


@pytest.mark.parametrize(
    "marks",
    [
        {"io.kubernetes.cri.container-type": "sandbox"},
        {"io.kubernetes.cri-o.ContainerType": "sandbox"},
        # the sandbox id of another container (the pod's real sandbox), or of the other engine's
        {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb1"},
        {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri-o.SandboxID": "c1"},
        {"io.kubernetes.cri-o.ContainerType": "sandbox", "io.kubernetes.cri.sandbox-id": "c1"},
        {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": ""},
    ],
)
@pytest.mark.parametrize("how", ["annotation", "env"])
def test_a_container_cannot_pass_as_a_pods_sandbox(
    fake: dict[str, str], tmp_path: Path, marks: dict[str, str], how: str
) -> None:
    """A pod's sandbox passes through with the pod's annotations, but its marker alone is an
    annotation anyone can write (`podman run --annotation io.kubernetes.cri-o.ContainerType=
    sandbox`): only the engine's own sandbox, whose sandbox-id annotation is its own container
    id, passes; a container that merely says it is one names its image like any other."""
    given = {"org.cryptlayer.image": "srv/app"} if how == "annotation" else {}
    env = ["CRYPTLAYER_IMAGE=srv/app"] if how == "env" else None
    bundle = bundle_with(tmp_path, spec({**given, **marks}, env))
    result, _ = run_runtime(["create", "--bundle", bundle, "--pid-file", f"{bundle}/pid", "c1"],
                            fake)  # fmt: skip
    assert result.returncode == engine.FAILED, result.stdout
    assert b"the image srv/app is neither an absolute path" in result.stderr
    assert not Path(fake["RECORD"], "argv").exists()


@pytest.mark.parametrize(
    ("type_key", "id_key"),
    [
        ("io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id"),  # containerd
        ("io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"),  # CRI-O
    ],
)
def test_the_engines_own_sandbox_passes_through(
    fake: dict[str, str], tmp_path: Path, type_key: str, id_key: str
) -> None:
    """The pause container, created under the sandbox's id, with the pod's annotations."""
    sandbox = "0f3c" * 16
    bundle = bundle_with(tmp_path, spec({"org.cryptlayer.image": "/srv/img", type_key: "sandbox",
                                         id_key: sandbox}))  # fmt: skip
    argv = ["--root", "/r", "create", "--bundle", bundle, "--pid-file", f"{bundle}/pid", sandbox]
    result, _ = run_runtime(argv, fake)
    assert result.returncode == 42, result.stderr
    assert recorded(fake, "argv").split("\0")[1:-1] == argv


def test_an_empty_bundle_is_the_working_directory(fake: dict[str, str], tmp_path: Path) -> None:
    """runc reads config.json from its working directory when --bundle is empty (it changes
    directory only to a bundle it is given): so is it read here, not passed through unread."""
    bundle = bundle_with(tmp_path, spec({"org.cryptlayer.image": "srv/app"}))
    for argv in (
        ["create", "--bundle", "", "c1"],
        ["run", "--bundle=", "c1"],
        ["run", "-b", "", "c1"],
    ):
        assert Invocation(argv).bundle_config() == (".", "config.json")
        result, _ = run_runtime(argv, fake, cwd=Path(bundle))
        assert result.returncode == engine.FAILED, result.stdout
        assert b"the image srv/app is neither an absolute path" in result.stderr


def test_a_refusal_with_stderr_closed_still_reaches_the_log(
    fake: dict[str, str], tmp_path: Path
) -> None:
    """An engine that gives the runtime no stderr (descriptor 2 closed) reads the log: the
    message is there and the exit status is still the runtime's failure, not a traceback's 1."""
    bundle = bundle_with(tmp_path, spec({"org.cryptlayer.image": "srv/app"}))
    log = tmp_path / "log.json"
    argv = ["--log", str(log), "--log-format", "json", "create", "--bundle", bundle, "c1"]
    result = subprocess.run(["sh", "-c", 'exec "$0" "$@" 2>&-', RUNTIME, *argv], env=fake,
                            capture_output=True, timeout=60)  # fmt: skip
    assert result.returncode == engine.FAILED
    assert json.loads(log.read_text())["msg"].startswith(
        "cryptlayer-runtime: the image srv/app is neither an absolute path"
    )
    assert not Path(fake["RECORD"], "argv").exists()


@pytest.mark.parametrize(
    ("process", "annotations", "shown"),
    [
        # the placeholder as podman and Docker make it from its config: no image named at all
        ({"args": ["/.cryptlayer/entrypoint"], "cwd": "/.cryptlayer/workdir",
          "env": ["PATH=/.cryptlayer/path", "HOSTNAME=x"]}, {}, ""),
        # one marker is enough (the user gave the others: --entrypoint, -e PATH=...)
        ({"args": ["/bin/sh"], "cwd": "/.cryptlayer/workdir", "env": ["PATH=/bin"]}, {}, ""),
        ({"args": ["/bin/sh"], "cwd": "/", "env": ["PATH=/.cryptlayer/path"]}, {}, ""),
        # the image named under a name that is not the one: said so
        ({"args": ["/.cryptlayer/entrypoint"], "cwd": "/", "env": []},
         {"org.cryptlayer.Image": "/srv/img"}, "(not annotation org.cryptlayer.Image: "),
        ({"args": ["/.cryptlayer/entrypoint"], "cwd": "/", "env": ["CRYPTLAYER_IMAGE =/srv/img"]},
         {}, "(not environment variable CRYPTLAYER_IMAGE : "),
        ({"args": ["/.cryptlayer/entrypoint"], "cwd": "/", "env": []},
         {"org.cryptlayer.digest": "sha256:x", "org.cryptlayer.imgae": "/srv/img"},
         "(not annotation org.cryptlayer.imgae: names are exact)"),
        ({"args": ["/.cryptlayer/entrypoint"], "cwd": "/", "env": ["CRYPTLAYER_KEEP=1"]}, {},
         "names no encrypted image: give"),
        ({"args": ["/.cryptlayer/entrypoint"], "cwd": "/", "env": []},
         {"org.cryptlayer.image\u200b": "/srv/img"}, "(not annotation org.cryptlayer.image\\u200b"),
    ],
)  # fmt: skip
def test_the_placeholder_without_an_image_is_refused(
    fake: dict[str, str], tmp_path: Path, process: dict[str, object],
    annotations: dict[str, str], shown: str,
) -> None:  # fmt: skip
    """A container made from the placeholder that names no encrypted image (forgotten, or
    misspelled: another case, a space, an invisible character) would have the real runtime fail
    on a missing /.cryptlayer/entrypoint; it is refused with what to give instead."""
    spec = {"ociVersion": "1.0.2", "process": process, "root": {"path": "rootfs"},
            "annotations": annotations}  # fmt: skip
    bundle = bundle_with(tmp_path, spec)
    result, _ = run_runtime(["create", "--bundle", bundle, "c1"], fake)
    assert result.returncode == engine.FAILED, result.stdout
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("error: cryptlayer-runtime: the container is made from cryptlayer's"
                           " placeholder image but names no encrypted image"), line  # fmt: skip
    assert "org.cryptlayer.image=IMAGE" in line and "CRYPTLAYER_IMAGE=IMAGE" in line
    assert shown in line
    assert not Path(fake["RECORD"], "argv").exists()


def test_crun_log_destinations(fake: dict[str, str], tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, spec({"org.cryptlayer.image": "/srv/img"}))
    log = tmp_path / "crun.log"
    for destination in (f"file:{log}", "journald:cid", "syslog:cid"):
        argv = ["--log", destination, "--log-format", "json", "run", "-b", bundle, "c1"]
        result, _ = run_runtime(argv, fake)
        assert result.returncode == engine.FAILED
        assert len(log.read_text().splitlines()) == 1  # the file's only, the others' on stderr
    assert not (tmp_path / "journald:cid").exists()


def test_a_hostile_bundle_fails_on_stderr_and_in_the_log(
    fake: dict[str, str], tmp_path: Path
) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    os.mkfifo(bundle / "config.json")
    log = tmp_path / "log.json"
    result, _ = run_runtime(["--log", str(log), "--log-format", "json", "create", "--bundle",
                             str(bundle), "c1"], fake)  # fmt: skip
    assert result.returncode == engine.FAILED
    assert result.stderr.decode() == (f"error: cryptlayer-runtime: {bundle}/config.json is not a"
                                      " regular file (a FIFO)\n")  # fmt: skip
    assert json.loads(log.read_text())["msg"] == result.stderr.decode()[7:-1]


def test_a_pass_through_imports_nothing_heavy(fake: dict[str, str]) -> None:
    """The start-up cost is the interpreter's: no typing, re, json, tomllib, pathlib or enum
    (the benchmark's `state` figure rests on this), with no config file and with one kept."""
    probe = ("import os, sys\n"
             "def execve(*a):\n"
             "    heavy = {'typing', 're', 'json', 'tomllib', 'pathlib', 'enum', 'signal'}\n"
             "    print(sorted(m for m in sys.modules if m in heavy or m.startswith('cryptlayer')))\n"
             "    sys.exit(0)\n"
             "os.execve = execve\n"
             "sys.argv = ['cryptlayer-runtime', 'state', 'c1']\n"
             "from cryptlayer.engine.cli import main\n"
             "main()\n")  # fmt: skip
    first = subprocess.run([sys.executable, "-c", probe], env=fake, capture_output=True,
                           text=True, check=True)  # fmt: skip
    assert first.stdout == "['cryptlayer', 'cryptlayer.engine', 'cryptlayer.engine.cli']\n"
    Path(fake["CRYPTLAYER_CONFIG"]).write_text('[runtime]\nruntime = "runc"\n')
    subprocess.run([sys.executable, "-c", probe], env=fake, check=True, capture_output=True)
    kept = subprocess.run([sys.executable, "-c", probe], env=fake, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert kept.stdout == first.stdout


def test_defaults_match_config_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine/cli.py names config.py's file and paths.py's run directory without importing them."""
    monkeypatch.delenv("CRYPTLAYER_CONFIG", raising=False)
    monkeypatch.delenv("CRYPTLAYER_RUNDIR", raising=False)
    assert str(config.DEFAULT) == engine.CONFIG_DEFAULT
    assert str(paths.run_root()) == engine.RUNDIR_DEFAULT


# -- a real container, through the real runtime


def test_a_real_container_through_runc(tmp_path: Path) -> None:
    """busybox in a bundle, `cryptlayer-runtime run` with runc configured: the container's
    output and exit status come through unchanged. (runc, not crun: crun 1.8 refuses this host's
    cgroups, v1 controllers mounted beside a v2 hierarchy, "hybrid mode", and so does it under
    podman here; runc runs it.)"""
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", bundle / "rootfs/bin/busybox")
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config_json = json.loads((bundle / "config.json").read_text())
    config_json["process"].update(terminal=False,
                                  args=["/bin/busybox", "sh", "-c", "echo hello from runc; exit 7"])  # fmt: skip
    (bundle / "config.json").write_text(json.dumps(config_json))
    (tmp_path / "config.toml").write_text('[runtime]\nruntime = "runc"\n')
    env = {"PATH": os.environ["PATH"], "CRYPTLAYER_CONFIG": str(tmp_path / "config.toml"),
           "CRYPTLAYER_RUNDIR": str(tmp_path / "run")}  # fmt: skip
    state = tmp_path / "state"
    name = f"cryptlayer-test-{uuid.uuid4().hex[:8]}"
    try:
        result = subprocess.run([RUNTIME, "--root", str(state), "run", "--bundle", str(bundle),
                                 name], env=env, capture_output=True, timeout=120)  # fmt: skip
        assert (result.returncode, result.stdout) == (7, b"hello from runc\n"), result.stderr
        # runc run deletes its container at the end: nothing left in its state
        listed = subprocess.run([RUNTIME, "--root", str(state), "list", "-q"], env=env,
                                capture_output=True, check=True)  # fmt: skip
        assert listed.stdout == b""
        # and the same bundle naming an encrypted image never reaches runc
        config_json["annotations"] = {"org.cryptlayer.image": "/srv/img"}
        (bundle / "config.json").write_text(json.dumps(config_json))
        refused = subprocess.run([RUNTIME, "--root", str(state), "run", "--bundle", str(bundle),
                                  name], env=env, capture_output=True, timeout=120)  # fmt: skip
        assert refused.returncode == 125
        assert refused.stdout == b""
        assert not (state / name).exists()
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", name],
                       capture_output=True, check=False)  # fmt: skip


def test_a_log_nobody_reads_is_not_waited_on(fake: dict[str, str], tmp_path: Path) -> None:
    """A FIFO as --log with no reader: opening it for writing would block for ever."""
    bundle = bundle_with(tmp_path, spec({"org.cryptlayer.image": "/srv/img"}))
    os.mkfifo(tmp_path / "log.fifo")
    argv = ["--log", str(tmp_path / "log.fifo"), "create", "--bundle", bundle, "c1"]
    result = subprocess.run([RUNTIME, *argv], env=fake, capture_output=True, timeout=20)
    assert result.returncode == engine.FAILED
    # (the node's config names no trust: refused before anything is opened)
    assert result.stderr.startswith(
        f"error: cryptlayer-runtime: {fake['CRYPTLAYER_CONFIG']} names no trust".encode()
    )


# -- a real engine: podman 4.3 and its conmon

PODMAN = """set -eu
# The config file where engines' calls find it: podman and conmon call the runtime with an
# environment of their own, without $CRYPTLAYER_CONFIG. /etc is overlaid in this mount
# namespace only, and the kept answer goes to a tmpfs of its own.
mount -t overlay overlay -o lowerdir=/etc,upperdir={tmp}/etc/upper,workdir={tmp}/etc/work /etc
mkdir -p /etc/cryptlayer /run/cryptlayer
printf '[runtime]\\nruntime = "runc"\\n' > /etc/cryptlayer/config.toml
mount -t tmpfs -o mode=0700 tmpfs /run/cryptlayer
export CONTAINERS_CONF={tmp}/containers.conf CONTAINERS_STORAGE_CONF={tmp}/storage.conf
unset CRYPTLAYER_CONFIG CRYPTLAYER_RUNDIR
{python} -m cryptlayer placeholder --engine podman
podman import -q {tmp}/rootfs.tar localhost/busybox:1 > /dev/null
# (lower limits than podman's defaults: this host's sandbox forbids raising them)
run="podman run --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
set +e
$run --rm --runtime cryptlayer localhost/busybox:1 /bin/busybox sh -c 'echo hello; exit 3'
echo "status $?"
$run -d --name detached --runtime cryptlayer localhost/busybox:1 /bin/busybox sleep 600 >/dev/null
podman exec detached /bin/busybox echo "exec $?"
podman rm -f -t 0 detached > /dev/null
echo "rm $?"
# the placeholder with no image named (forgotten): refused, not runc's missing entrypoint
$run --rm --runtime cryptlayer localhost/cryptlayer/placeholder:v1
echo "status $?"
# a container that calls itself a pod's sandbox is still refused (a marker anyone can write)
$run --rm --runtime cryptlayer --annotation io.kubernetes.cri-o.ContainerType=sandbox \\
    --annotation org.cryptlayer.image=srv/app localhost/busybox:1 /bin/busybox echo ran
echo "status $?"
$run --rm --runtime cryptlayer --annotation org.cryptlayer.image=srv/app \\
    localhost/cryptlayer/placeholder:v1
echo "status $?"
podman ps -a --format '{{{{.Names}}}}'
"""


def test_podman_through_the_runtime(tmp_path: Path) -> None:
    """podman (conmon, its --log-format=json --log, its own direct calls) with
    cryptlayer-runtime registered: a container passed through to runc runs and its exit status
    comes back; a detached one takes `exec` and `rm -f`; the placeholder loads under its name;
    a registry image (not pulled at create yet) is refused and podman shows our message, from
    the runtime's log."""
    (tmp_path / "etc" / "upper").mkdir(parents=True)
    (tmp_path / "etc" / "work").mkdir()
    (tmp_path / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", tmp_path / "rootfs/bin/busybox")
    subprocess.run(["tar", "-C", str(tmp_path / "rootfs"), "-cf", str(tmp_path / "rootfs.tar"), "."],
                   check=True)  # fmt: skip
    (tmp_path / "containers.conf").write_text(f"""[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{tmp_path}/events.log"
tmp_dir = "{tmp_path}/libpod"
runtime_supports_json = ["crun", "runc", "kata", "runsc", "krun", "cryptlayer"]
[engine.runtimes]
cryptlayer = ["{RUNTIME}"]
""")
    (tmp_path / "storage.conf").write_text(f"""[storage]
driver = "vfs"
graphroot = "{tmp_path}/storage"
runroot = "{tmp_path}/storage-run"
""")
    script = PODMAN.format(tmp=tmp_path, python=sys.executable)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.stdout.splitlines() == [
        "localhost/cryptlayer/placeholder:v1", "hello", "status 3", "exec 0", "rm 0", "status 126",
        "status 126", "status 126",
    ], result.stderr  # fmt: skip
    assert result.stderr.splitlines()[-1] == (
        "Error: OCI runtime error: cryptlayer: cryptlayer-runtime: the image srv/app is neither"
        " an absolute path nor a docker:// reference: name the image directory on the node by"
        " its absolute path, or a registry image as docker://REGISTRY/REPO:TAG")  # fmt: skip
    assert (
        "Error: OCI runtime error: cryptlayer: cryptlayer-runtime: the container is made from"
        " cryptlayer's placeholder image but names no encrypted image: give the annotation"
        " org.cryptlayer.image=IMAGE"
    ) in result.stderr
    assert (tmp_path / "etc/upper/cryptlayer/config.toml").exists()  # not the host's /etc


# -- a delete the engine kills at its deadline (containerd's CRI: 10 s for a container's exit)

# The real runtime as containerd's shim finds it after the first delete: crun's delete of that
# container once, then no such container (delete and state fail, as crun's do).
GONE_AFTER_DELETE = """#!/bin/sh
echo "$*" >> "$RECORD/calls"
case " $* " in
  *" delete "*) [ -e "$RECORD/deleted" ] && exit 1; touch "$RECORD/deleted"; exit 0 ;;
  *" state "*) [ -e "$RECORD/deleted" ] && exit 1; exit 0 ;;
esac
exit 0
"""

# container.stop stood in: a teardown that holds the state lock until the test says go (as the
# real one holds it for the whole teardown), and says when it has begun.
SLOW_TEARDOWN = """
import os, sys, time
from pathlib import Path

from cryptlayer.runtime import container, state

RECORD = Path(os.environ["RECORD"])


def stop(name, force=False):
    with state.locked():
        record = state.load(name)
        with open(RECORD / "teardown", "a") as log:
            print("begun", os.getpid(), file=log)
        while not (RECORD / "go").exists():
            time.sleep(0.05)
        state.remove(record)
        with open(RECORD / "teardown", "a") as log:
            print("done", os.getpid(), file=log)


container.stop = stop
sys.argv[0] = "cryptlayer-runtime"
from cryptlayer.engine.cli import main

main()
"""


def wait_for(condition: object, what: str) -> None:
    import time

    deadline = time.monotonic() + 60
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited a minute for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("asked_again_while_tearing_down", [True, False])
def test_a_delete_killed_at_the_engines_deadline_still_tears_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked_again_while_tearing_down: bool
) -> None:
    """containerd's shim runs the runtime's delete under the CRI's 10 s deadline and SIGKILLs it
    then: the teardown goes on in a process of its own. The engine asks again (the real runtime
    no longer knows the container), while that teardown runs (the delete waits for it), or, as
    containerd's shim does (it reads the killed delete's output to its end), once it has ended
    (its tombstone says the container was ours): either way that delete succeeds (crun's failure
    is not runc's `container does not exist`, which the shim would take for done), and the
    container is torn down once. Before: the kill stopped the teardown halfway, and the delete
    asked again failed with crun's status, for the CRI to ask again for ever."""
    record_dir, bin_dir = tmp_path / "record", tmp_path / "bin"
    record_dir.mkdir()
    bin_dir.mkdir()
    (bin_dir / "crun").write_text(GONE_AFTER_DELETE)
    (bin_dir / "crun").chmod(0o755)
    (tmp_path / "runtime.py").write_text(SLOW_TEARDOWN)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record_dir),
           "CRYPTLAYER_CONFIG": str(tmp_path / "config.toml"),
           "CRYPTLAYER_ROOT": str(tmp_path / "state"),
           "CRYPTLAYER_RUNDIR": str(tmp_path / "run")}  # fmt: skip
    monkeypatch.setenv("CRYPTLAYER_ROOT", env["CRYPTLAYER_ROOT"])
    monkeypatch.setenv("CRYPTLAYER_RUNDIR", env["CRYPTLAYER_RUNDIR"])
    cid = "5e" * 32
    name = engine.container_name(cid)
    with state.locked():
        record = state.create(state.Record(name, str(tmp_path / "img"), True, state.Mode.START, 0))
    argv = [sys.executable, str(tmp_path / "runtime.py"), "--root", "/run/containerd/runc/k8s.io",
            "--log", str(tmp_path / "log.json"), "--log-format", "json", "delete", cid]  # fmt: skip
    teardown = record_dir / "teardown"
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(teardown.exists, "the first teardown to begin")
    first.kill()  # the shim's exec.CommandContext at the deadline
    assert first.wait(timeout=60) == -9
    try:
        if not asked_again_while_tearing_down:
            (record_dir / "go").touch()
            wait_for(lambda: not record.path.exists(), "the teardown to end")
        again = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if asked_again_while_tearing_down:
            calls = record_dir / "calls"
            wait_for(lambda: calls.read_text().count("state") == 1, "the second delete")
    finally:
        (record_dir / "go").touch()  # (never a teardown left waiting)
    _, err = again.communicate(timeout=60)
    assert (again.returncode, err) == (0, b"")
    wait_for(lambda: not record.path.exists(), "the teardown to end")
    done = [line.split()[0] for line in teardown.read_text().splitlines()]
    assert done == ["begun", "done"]  # the first delete's, once
    assert (record_dir / "calls").read_text().splitlines() == [
        f"--root /run/containerd/runc/k8s.io --log {tmp_path}/log.json --log-format json"
        f" {command} {cid}" for command in ("delete", "delete", "state")]  # fmt: skip
    assert not (tmp_path / "log.json").exists()
    assert list((tmp_path / "run").iterdir()) == []  # (no tombstone left)
    # a container neither the runtime nor cryptlayer knows: the runtime's failure, as it was
    unknown = subprocess.run(argv, env=env, capture_output=True)
    assert unknown.returncode == 1
