"""Fault injection: a crash (SIGKILL) at every journal point of `run` and of `stop`, then `gc`.

The crash points are journal.crash_point's: before and after each step is taken, and before
and after each is released (CRYPTLAYER_CRASH_AT=N kills the process at the Nth). Each point is
one test: it runs in a forked copy of this process (Python starts slowly under emulation; a fork is instant), is
killed at its point, and then `gc` must leave no mapping, loop device, mount, runtime file or
record behind, and the image erased, since every run here was to shred it.

`make test` crashes `run` at each point up to the release of its own two steps (the OCI config
and the container: every step taken, and those released) and `stop` at each of its points (every
other step released). The rest of `run`'s points release the steps `stop` releases, in the same
order (only the record's mode differs): they are marked `full_sweep`, and `make
test-full-sweep` runs them, as CI does after `make test`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Cli, leftovers, slots

from cryptlayer.runtime import journal

FINISHED = 3  # the child's exit status when it passed its point without dying


@pytest.fixture(scope="module")
def base(one_layer: tuple[Path, Path]) -> tuple[Path, Path]:
    """One single-layer image to copy for each case, and its key."""
    return one_layer


def counted(cli: Cli, *args: str) -> int:
    """Run the command in-process, counting the crash points it passes (none is taken)."""
    os.environ[journal.CRASH_AT] = "0"
    journal.crash_points = 0
    try:
        cli.ok(*args)
    finally:
        del os.environ[journal.CRASH_AT]
    return journal.crash_points


def crash_at(point: int, *args: str) -> bool:
    """Run the command in a forked child that kills itself at crash point `point`; True if it did."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 4
        try:
            os.environ[journal.CRASH_AT] = str(point)
            journal.crash_points = 0
            Cli.new()(*args)
            status = FINISHED
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == FINISHED, f"point {point}: exit {os.WEXITSTATUS(status)}"
    return False


def copy_of(template: Path, images: Path, name: str) -> Path:
    """A fresh copy of the template image (each case erases its own)."""
    shutil.copytree(template, images / name)
    return images / name


def clean_after_gc(cli: Cli, image: Path, what: str) -> None:
    code, _out, err = cli("gc")
    assert code == 0, f"{what}: gc failed: {err}"
    assert leftovers() == [], f"{what}: left after gc: {leftovers()}"
    assert slots(image) == [0], f"{what}: the image can still be opened"
    assert cli.ok("gc") == "nothing to clean up\n", f"{what}: a second gc found more"


# How many crash points a one-layer `run`, a `start` and a `stop` pass. Pinned so that each point
# is a test of its own (pytest counts and reports them); test_the_points_are_all_covered fails,
# saying the new numbers, when a change adds or removes steps.
RUN_POINTS = 78
START_POINTS = 35
STOP_POINTS = 35
# `run` is `start`'s steps, then the OCI config and the container (two points each to take, two
# each to release), then the release of `start`'s steps, which is `stop`.
RUN_OWN = START_POINTS + 8


def test_the_points_are_all_covered(cli: Cli, base: tuple[Path, Path], images: Path) -> None:
    template, key = base
    image = copy_of(template, images, "counted")
    run = counted(cli, "run", "--name", "count", "--key-file", str(key), str(image))
    image = copy_of(template, images, "c2")
    start = counted(cli, "start", "--name", "count", "--key-file", str(key), str(image))
    stop = counted(cli, "stop", "count")
    assert (run, start, stop) == (RUN_POINTS, START_POINTS, STOP_POINTS), "update the numbers"
    assert run == RUN_OWN + stop  # what the full sweep leaves out, stop's points cover
    image = copy_of(template, images, "past")  # one point further: the command just completes
    assert not crash_at(run + 1, "run", "--name", "past", "--key-file", str(key), str(image))
    assert leftovers() == []


@pytest.mark.parametrize(
    "point",
    [p if p <= RUN_OWN else pytest.param(p, marks=pytest.mark.full_sweep)
     for p in range(1, RUN_POINTS + 1)],
)  # fmt: skip
def test_a_crash_in_run(cli: Cli, base: tuple[Path, Path], images: Path, point: int) -> None:
    template, key = base
    image = copy_of(template, images, "img")
    assert crash_at(point, "run", "--name", f"r{point}", "--key-file", str(key), str(image))
    clean_after_gc(cli, image, f"run, crash point {point}/{RUN_POINTS}")


@pytest.mark.parametrize("point", range(1, STOP_POINTS + 1))
def test_a_crash_in_stop(cli: Cli, base: tuple[Path, Path], images: Path, point: int) -> None:
    template, key = base
    image = copy_of(template, images, "img")
    cli.ok("start", "--name", f"s{point}", "--key-file", str(key), str(image))
    assert crash_at(point, "stop", f"s{point}")
    clean_after_gc(cli, image, f"stop, crash point {point}/{STOP_POINTS}")


def test_gc_finds_renamed_mappings_by_uuid_when_the_journal_is_lost(
    cli: Cli, base: tuple[Path, Path], images: Path
) -> None:
    """The disk holding $CRYPTLAYER_ROOT was replaced: no record, no opening. And someone renamed
    a mapping. gc still finds it: cryptsetup's dm UUID keeps the name it was opened with."""
    from cryptlayer import paths
    from cryptlayer.tools import udev

    template, key = base
    image = copy_of(template, images, "lost")
    cli.ok("start", "--keep", "--name", "lost", "--key-file", str(key), str(image))
    (layer,) = [m for m in udev.mappings("cryptlayer--") if not m.endswith("-verity")]
    subprocess.run(["dmsetup", "rename", layer, "innocuous"], check=True)
    assert "innocuous" in udev.cryptlayer_mappings()
    for journal_file in [*paths.records_dir().glob("*.json"), *paths.openings_dir().glob("*.json")]:
        journal_file.unlink()
    out = cli.ok("gc")
    assert "removed orphan mapping innocuous\n" in out
    assert "removed orphan mapping cryptlayer-lost-scratch\n" in out
    assert leftovers() == []
    assert slots(image) == [1]  # --keep: gc closes, it does not erase what nobody owed
