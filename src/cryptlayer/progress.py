"""Progress of long work (a layer's build; later a push or a pull) on a terminal.

typer's (click's) progress bar on standard error when it is a terminal; nothing otherwise, or
with --quiet. The work reports (phase, bytes done, bytes in all); the bar shows the phase, the
share done and the rate. Updates may come from any thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

MiB = 1 << 20
POLL = 0.25  # seconds between two looks at a file system being filled
RATED = ("copy", "push", "pull")  # phases that move bytes: their rate is shown


class Progress(Protocol):
    def update(self, phase: str, done: int) -> None: ...

    def close(self) -> None: ...


class Silent:
    """No output (not a terminal, or --quiet)."""

    def update(self, phase: str, done: int) -> None:
        pass

    def close(self) -> None:
        pass


class Bar:
    """A progress bar on standard error: `LABEL PHASE [####    ]  42%  12.3 MiB/s`."""

    def __init__(self, label: str, total: int) -> None:
        import typer

        self.label, self.total = label, max(total, 1)
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._bar: Any = typer.progressbar(
            length=self.total, label=label, file=sys.stderr, show_eta=False, show_percent=True,
            item_show_func=lambda rate: rate, width=30,
        )  # fmt: skip
        self._bar.__enter__()

    def update(self, phase: str, done: int) -> None:
        with self._lock:
            done = min(max(done, 0), self.total)
            elapsed = max(time.monotonic() - self._started, 1e-3)
            self._bar.label = f"{self.label} {phase:<8}"
            rate = f"{done / MiB / elapsed:.1f} MiB/s" if phase in RATED else ""
            self._bar.current_item = rate
            if done > self._bar.pos:
                self._bar.update(done - self._bar.pos)
            else:
                self._bar.render_progress()  # a new phase at the same position

    def close(self) -> None:
        with self._lock:
            self._bar.__exit__(None, None, None)


def for_terminal(quiet: bool = False) -> Callable[[str, int], Progress]:
    """A factory of progress displays (label, total bytes): bars on a terminal, else silence."""
    if quiet or not sys.stderr.isatty():
        return lambda _label, _total: Silent()
    return Bar


@contextmanager
def watching(target: Path, progress: Progress, phase: str) -> Iterator[None]:
    """While the body fills the file system mounted on `target`, report its growth in bytes."""

    def used() -> int:
        st = os.statvfs(target)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    base = used()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL):
            progress.update(phase, used() - base)

    progress.update(phase, 0)
    watcher = threading.Thread(target=poll, name="progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    progress.update(phase, used() - base)
