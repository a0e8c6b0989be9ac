"""Progress on long work: a bar on a terminal, silence elsewhere, a file system watched."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from terminal import in_pty

from cryptlayer import progress

CHILD = """
from cryptlayer.progress import for_terminal
bar = for_terminal(False)("layer0", 10 << 20)
print(type(bar).__name__, flush=True)
bar.update("format", 0)
bar.update("copy", 5 << 20)
bar.update("shrink", 10 << 20)
bar.close()
"""


def test_a_bar_on_a_terminal() -> None:
    code, out = in_pty([sys.executable, "-c", CHILD], [])
    assert code == 0, out
    assert "Bar" in out
    assert "layer0 copy" in out and "50%" in out and "MiB/s" in out
    assert "layer0 shrink" in out and "100%" in out


def test_silent_when_not_a_terminal_or_quiet() -> None:
    assert isinstance(progress.for_terminal(False)("x", 1), progress.Silent)  # pytest: no tty
    assert isinstance(progress.for_terminal(True)("x", 1), progress.Silent)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def update(self, phase: str, done: int) -> None:
        self.seen.append((phase, done))

    def close(self) -> None:
        pass


def test_watching_reports_what_the_file_system_gained(tmp_path: Path) -> None:
    recorder = Recorder()
    with progress.watching(tmp_path, recorder, "copy"), open(tmp_path / "f", "wb") as f:
        for _ in range(8):
            f.write(b"x" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
            time.sleep(0.1)
    assert recorder.seen and all(phase == "copy" for phase, _ in recorder.seen)
    assert max(done for _, done in recorder.seen) >= 1 << 20
