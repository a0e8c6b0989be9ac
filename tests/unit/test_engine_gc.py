"""Faults of the containers engines make through cryptlayer-runtime (docs/engines.md, "Faults"):
which of them `gc` tears down (the real runtime no longer holds the container, or its create
died), which it leaves alone (it still runs, or its create is under way), the holder a create
killed before its record leaves; and the host's warnings reaching the engine's user.

No devices here: the teardown itself is container.py's (the VM tier's test_engine_faults.py
runs it on dm-crypt); these tests stand in for it and watch what gc decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptlayer.engine import cli as engine
from cryptlayer.engine import encrypted
from cryptlayer.errors import BusyError, UsageError
from cryptlayer.runtime import gc, hostcheck, state
from cryptlayer.runtime.state import Holder, Mode, Record


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private state root and run root; the runtime's state directory (its --root)."""
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("CRYPTLAYER_RUNDIR", str(tmp_path / "run"))
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(tmp_path / "config.toml"))
    oci_root = tmp_path / "crun-root"
    oci_root.mkdir()
    yield oci_root


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def record(name: str, pid: int = 0, *, boot: str = "") -> Record:
    """An engine's container as container.start leaves it (a START record)."""
    made = state.create(Record(name, "/images/app", True, Mode.START, pid))
    if boot:
        made.boot = boot
        made.save()
    return made


def held(name: str, oci_root: Path, cid: str) -> None:
    """The holder a create writes, released again (its creator has ended)."""
    os.close(state.hold(name, Holder("/usr/bin/crun", str(oci_root), cid)))


def test_a_container_the_engine_deleted_without_telling_is_abandoned(root: Path) -> None:
    """The engine deleted the container in the real runtime without calling our delete (or the
    runtime's create never made it): at rest, nobody working on it, and crun's state has no
    ROOT/ID. Before the holder, gc left every started container at rest alone, forever."""
    made = record("engine-gone")
    held("engine-gone", root, "gone")
    assert gc._abandoned(made)


def test_a_container_the_runtime_still_holds_is_left_alone(root: Path) -> None:
    made = record("engine-alive")
    held("engine-alive", root, "alive")
    (root / "alive").mkdir()
    assert not gc._abandoned(made)


def test_a_create_under_way_is_left_alone(root: Path) -> None:
    """The creating process holds the holder locked from before its record exists until it ends:
    gc does not tear down what is being assembled, nor what its runtime is creating."""
    made = record("engine-new")
    fd = state.hold("engine-new", Holder("/usr/bin/crun", str(root), "new"))
    try:
        assert state.being_created("engine-new")
        assert not gc._abandoned(made)
        with pytest.raises(BusyError, match="being created by another process"):
            state.hold("engine-new", Holder("/usr/bin/crun", str(root), "new"))
    finally:
        os.close(fd)
    assert not state.being_created("engine-new")
    assert gc._abandoned(made)


def test_a_create_killed_mid_assembly_is_abandoned(root: Path) -> None:
    """SIGKILL while assembling: the record names the dead creator, the holder is unlocked."""
    made = record("engine-killed", dead_pid())
    held("engine-killed", root, "killed")
    assert gc._abandoned(made)


def test_a_container_of_an_earlier_boot_is_abandoned(root: Path) -> None:
    """After a power cut: the runtime's /run state is gone with the boot, and so is the
    container, whatever its holder says."""
    made = record("engine-cut", boot="an-earlier-boot")
    held("engine-cut", root, "cut")
    (root / "cut").mkdir()  # (a runtime root on a disk would survive the boot)
    assert gc._abandoned(made)


def test_cryptlayers_own_started_container_is_still_left_alone(root: Path) -> None:
    assert not gc._abandoned(record("started"))


def test_without_a_known_root_the_runtimes_state_answers(root: Path, tmp_path: Path) -> None:
    answer = tmp_path / "runtime"
    answer.write_text('#!/bin/sh\n[ "$1 $2" = "state known" ]\n')
    answer.chmod(0o755)
    assert Holder(str(answer), "", "known").knows()
    assert not Holder(str(answer), "", "other").knows()
    assert Holder(str(tmp_path / "no-such-runtime"), "", "x").knows()  # cannot tell: left alone


@pytest.fixture
def torn_down(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """gc's teardown stood in for (no devices here): the record is forgotten."""
    names: list[str] = []

    def teardown(rec: Record) -> None:
        names.append(rec.name)
        state.remove(rec)

    monkeypatch.setattr(gc, "teardown", teardown)
    monkeypatch.setattr(gc, "_collect_orphans", lambda report: None)
    return names


def test_gc_tears_down_what_nobody_will_delete_and_no_more(
    root: Path, torn_down: list[str]
) -> None:
    record("engine-gone")
    held("engine-gone", root, "gone")
    record("engine-alive")
    held("engine-alive", root, "alive")
    (root / "alive").mkdir()
    record("engine-new")
    creating = state.hold("engine-new", Holder("/usr/bin/crun", str(root), "new"))
    held("engine-early", root, "early")  # killed before its record was written
    late = state.hold("engine-late", Holder("/usr/bin/crun", str(root), "late"))  # not yet
    try:
        report = gc.collect()
    finally:
        os.close(creating)
        os.close(late)
    assert torn_down == ["engine-gone"]
    assert report.containers == ["engine-gone"]
    assert report.orphans == ["holder of engine-early"]
    assert state.holder_names() == ["engine-alive", "engine-late", "engine-new"]
    assert sorted(r.name for r in state.all_records()) == ["engine-alive", "engine-new"]


def test_delete_forgets_the_holder(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptlayer.runtime import container

    monkeypatch.setattr(container, "stop", lambda name: state.remove(state.load(name)))
    record("engine-done")
    held("engine-done", root, "done")
    encrypted.stop("engine-done")
    assert state.holder_names() == []


def test_a_create_that_fails_before_its_record_leaves_no_holder(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_key(image: Path, **_: object) -> None:
        raise UsageError("no key for it")

    monkeypatch.setattr(encrypted, "trust", lambda: None)
    monkeypatch.setattr(encrypted, "credential_for", no_key)
    spec = {"annotations": {engine.ANNOTATION: str(tmp_path / "img")}}
    with pytest.raises(UsageError, match="no key for it"):
        encrypted.assemble(spec, str(tmp_path / "img"), "c1", str(tmp_path / "config.json"),
                           holder=Holder("/usr/bin/crun", str(root), "c1"),
                           warn=lambda line: None)  # fmt: skip
    assert state.holder_names() == []


def test_a_failed_create_keeps_the_holder_of_the_names_container(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A second create of an id whose container exists fails (BusyError): the existing
    container's holder stays, for its delete and for gc."""
    from cryptlayer.runtime import container

    def busy(*_args: object) -> None:
        raise BusyError("a container named 'engine-c1' already exists")

    record("engine-c1")
    held("engine-c1", root, "c1")
    monkeypatch.setattr(encrypted, "trust", lambda: None)
    monkeypatch.setattr(encrypted, "credential_for", lambda image, **_: contextlib.nullcontext())
    monkeypatch.setattr(container, "start", busy)
    spec = {"annotations": {engine.ANNOTATION: str(tmp_path / "img")}}
    with pytest.raises(BusyError):
        encrypted.assemble(spec, str(tmp_path / "img"), "c1", str(tmp_path / "config.json"),
                           holder=Holder("/usr/bin/crun", str(root), "c1"),
                           warn=lambda line: None)  # fmt: skip
    assert state.holder_names() == ["engine-c1"]


# -- the root the holder names


@pytest.mark.parametrize(
    ("argv", "runtime", "expected"),
    [
        (["--root", "/run/containerd/runc/k8s.io", "create", "c"], "/usr/sbin/runc",
         "/run/containerd/runc/k8s.io"),
        (["--root=/var/run/docker/runtime-runc/moby", "create", "c"], "/usr/bin/runc",
         "/var/run/docker/runtime-runc/moby"),
        (["create", "c"], "/usr/bin/crun", "/run/crun"),
        (["create", "c"], "/usr/sbin/runc", "/run/runc"),
        (["create", "c"], "/opt/bin/youki", ""),
    ],
)  # fmt: skip
def test_the_runtimes_root(argv: list[str], runtime: str, expected: str) -> None:
    assert engine.state_root(runtime, engine.Invocation(argv).root) == expected


# -- what `cryptlayer run` warns about, at create


@pytest.fixture
def problems(monkeypatch: pytest.MonkeyPatch) -> None:
    found = [
        hostcheck.Problem("swap", "swap /dev/sda2 is not on dm-crypt"),
        hostcheck.Problem("core-pattern", "core_pattern 'core' writes core dumps to files"),
    ]
    monkeypatch.setattr(hostcheck, "problems", lambda: found)
    monkeypatch.setattr(hostcheck, "erase_caveat", lambda image: None)


def test_the_hosts_warnings_reach_the_engine(
    root: Path, problems: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Before this, cryptlayer-runtime assembled on such a host without a word: the warnings
    `cryptlayer run` prints go to the runtime's log, at level warning; not to stderr, which at
    `create` is the container's own (containerd's CRI test saw them in the job's output)."""
    log = tmp_path / "log.json"
    invocation = engine.Invocation(["--log", str(log), "--log-format", "json", "create", "c1"])
    lines = encrypted.host_warnings(tmp_path, False)
    assert lines == ["swap /dev/sda2 is not on dm-crypt: decrypted memory may reach the disk"
                     " [swap]", "core_pattern 'core' writes core dumps to files: decrypted"
                     " memory may reach the disk [core-pattern]"]  # fmt: skip
    for line in lines:
        engine.warn(line, invocation)
    assert capfd.readouterr().err == ""
    logged = [json.loads(entry) for entry in log.read_text().splitlines()]
    assert [(e["level"], e["msg"]) for e in logged] == [
        ("warning", f"cryptlayer-runtime: {line}") for line in lines
    ]


def test_the_nodes_config_silences_them(root: Path, problems: None, tmp_path: Path) -> None:
    Path(os.environ["CRYPTLAYER_CONFIG"]).write_text('quiet-warnings = ["swap"]\n')
    assert [line.rsplit(" ", 1)[1] for line in encrypted.host_warnings(
        tmp_path, False)] == ["[core-pattern]"]  # fmt: skip


def test_an_image_that_will_be_shredded_gets_the_storage_caveat(
    root: Path, problems: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostcheck, "erase_caveat", lambda image: f"{image} is on btrfs")
    kinds = [line.rsplit(" ", 1)[1] for line in encrypted.host_warnings(tmp_path, False)]
    assert kinds == ["[swap]", "[core-pattern]", "[erase-storage]"]
    kept = [line.rsplit(" ", 1)[1] for line in encrypted.host_warnings(tmp_path, True)]
    assert kept == ["[swap]", "[core-pattern]"]
    assert encrypted.host_warnings(None, False) == encrypted.host_warnings(tmp_path, True)


def test_assemble_warns_before_it_opens_anything(
    root: Path, problems: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []

    def no_key(image: Path, **_: object) -> None:
        assert len(said) == 2  # the warnings came first
        raise UsageError("no key for it")

    monkeypatch.setattr(encrypted, "trust", lambda: None)
    monkeypatch.setattr(encrypted, "credential_for", no_key)
    spec = {"annotations": {engine.ANNOTATION: str(tmp_path / "img")}}
    with pytest.raises(UsageError, match="no key for it"):
        encrypted.assemble(spec, str(tmp_path / "img"), "c1", str(tmp_path / "config.json"),
                           holder=Holder("/usr/bin/crun", str(root), "c1"),
                           warn=said.append)  # fmt: skip
    assert [line.rsplit(" ", 1)[1] for line in said] == ["[swap]", "[core-pattern]"]


def test_the_text_log_has_the_level_too(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log"
    engine.warn("swap is on [swap]", engine.Invocation(["--log", str(log), "create", "c1"]))
    assert 'level=warning msg="cryptlayer-runtime: swap is on [swap]"' in log.read_text()
    assert capfd.readouterr().err == ""


def test_without_a_log_the_warning_goes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    engine.warn("swap is on [swap]", engine.Invocation(["create", "c1"]))
    assert capfd.readouterr().err == "warning: cryptlayer-runtime: swap is on [swap]\n"
    engine.warn("swap is on [swap]", engine.Invocation(["--log", "journald:x", "create", "c1"]))
    assert capfd.readouterr().err == "warning: cryptlayer-runtime: swap is on [swap]\n"


@pytest.fixture
def crun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in crun on PATH (exit 0), a bundle naming an image, and --log's file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "crun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {"annotations": {engine.ANNOTATION: "/srv/app"}, "process": {"args": ["sh"]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def create_through_main(
    bundle: Path, log: Path, monkeypatch: pytest.MonkeyPatch, assembled: bool
) -> int:
    """cryptlayer-runtime's main() for a `create`, the assembly stood in: it warns, then fails
    (no key) or returns the record's name."""

    def assemble(*args: object, holder: object, warn: object) -> str:
        assert callable(warn)
        warn("swap /dev/sda2 is not on dm-crypt [swap]")
        if not assembled:
            raise UsageError("no key for the image /srv/app")
        return "engine-c1"

    monkeypatch.setattr(encrypted, "assemble", assemble)
    monkeypatch.setattr(encrypted, "stop", lambda name: None)
    monkeypatch.setattr(engine, "leave", sys.exit)  # in-process: not os._exit (cli.leave)
    argv = ["cryptlayer-runtime", "--log", str(log), "--log-format", "json", "create",
            "--bundle", str(bundle), "c1"]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as ended:
        engine.main()
    assert isinstance(ended.value.code, int)
    return ended.value.code


def test_a_failed_create_shows_its_one_error_line(
    root: Path, crun: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """podman shows the runtime's stderr whole as its error: only the error line goes there,
    and to the log (the warnings are for a create that goes on)."""
    log = tmp_path / "log.json"
    assert create_through_main(crun, log, monkeypatch, assembled=False) == engine.FAILED
    assert capfd.readouterr().err == "error: cryptlayer-runtime: no key for the image /srv/app\n"
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["level"], e["msg"]) for e in logged] == [
        ("error", "cryptlayer-runtime: no key for the image /srv/app"),
    ]


def test_a_create_that_goes_on_warns_in_its_log_only(
    root: Path, crun: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    log = tmp_path / "log.json"
    assert create_through_main(crun, log, monkeypatch, assembled=True) == 0
    warning = "cryptlayer-runtime: swap /dev/sda2 is not on dm-crypt [swap]"
    assert capfd.readouterr().err == ""  # (the container's stderr, at create)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["level"], e["msg"]) for e in logged] == [("warning", warning)]
