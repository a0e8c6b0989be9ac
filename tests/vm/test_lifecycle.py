"""The whole life of an image on real dm-crypt: build, run, stop, shred."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import MARKER_LOWER, MARKER_WRITTEN, Cli, keyslots
from terminal import in_pty

from cryptlayer.errors import ExitCode


def test_run_reads_lower_writes_upper_then_shreds(cli: Cli, image: Path, key_file: Path) -> None:
    script = f"cat /data/hello.txt && echo {MARKER_WRITTEN} > /root/out.txt && cat /root/out.txt"
    code, out, err = cli("run", "--key-file", str(key_file), str(image), "--", "sh", "-c", script)
    assert code == 0, err
    assert out.splitlines() == [MARKER_LOWER, MARKER_WRITTEN]
    layers = sorted(image.glob("*.luks"))
    assert len(layers) == 2
    assert [keyslots(p) for p in layers] == [0, 0]
    code, _, err = cli("run", "--key-file", str(key_file), str(image), "--", "true")
    assert code == ExitCode.RUN_FAILED  # ERASED for the other commands
    assert err.startswith("error: image") and "was shredded (crypto-erased)" in err


def test_exit_status_passes_through(cli: Cli, image: Path, key_file: Path) -> None:
    code, out, _ = cli("run", "--keep", "--key-file", str(key_file), str(image), "--",
                       "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7")  # fmt: skip
    assert code == 7
    assert out == "to-stdout\n"


def test_command_not_found_or_not_runnable(cli: Cli, image: Path, key_file: Path) -> None:
    """crun reports a command missing from the image as its own exit 1, which run passed on as
    if the job had exited 1: now podman's 127 and 126, before the container starts."""
    code, out, err = cli("run", "--keep", "--key-file", str(key_file), str(image), "--", "nosuch")
    assert (code, out) == (ExitCode.NOT_FOUND, "")
    assert err == ("error: the container's command 'nosuch' is not in the image (looked up in its"
                   " PATH): give a command the image holds: IMAGE COMMAND [ARG...]\n")  # fmt: skip
    code, out, err = cli("run", "--keep", "--key-file", str(key_file), str(image), "--", "/etc")
    assert (code, out) == (ExitCode.CANNOT_INVOKE, "")
    assert err == ("error: the container's command '/etc' cannot be run: it is a directory: give a"
                   " program the image can run: IMAGE COMMAND [ARG...]\n")  # fmt: skip


def test_default_command(cli: Cli, image: Path, key_file: Path) -> None:
    out = cli.ok("run", "--keep", "--key-file", str(key_file), str(image))
    assert out == f"{MARKER_LOWER}\n"


def test_build_shows_progress_on_a_terminal(
    cli: Cli, images: Path, key_file: Path, busybox_tree: Path, data_tree: Path
) -> None:
    """A build on a terminal shows each layer's phases and progress; elsewhere it is silent."""
    out = images / "shown"
    code, screen = in_pty([sys.executable, "-m", "cryptlayer", "build", "-k", str(key_file),
                           "-o", str(out), str(busybox_tree), str(data_tree)], [])  # fmt: skip
    assert code == 0, screen
    for layer in ("layer0", "layer1"):
        for phase in ("format", "copy", "shrink"):
            assert f"{layer} {phase}" in screen, screen
    assert "100%" in screen and "MiB/s" in screen
    code, _, err = cli("build", "-k", str(key_file), "-o", str(images / "quiet"), str(data_tree))
    assert (code, err) == (0, "")  # not a terminal: not a word on stderr
