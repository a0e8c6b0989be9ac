"""runtime/lazy.py's server process handling: killed by pid *and* start time (never another
process that got a reused pid), and a server that ends by itself is no error."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from cryptlayer.runtime import lazy


def test_the_server_is_killed_only_if_it_is_the_very_process() -> None:
    process = subprocess.Popen(["sleep", "60"])
    try:
        started = lazy.start_time(process.pid)
        assert started
        lazy.kill_server(f"{process.pid}:{int(started) + 1}")  # the pid reused by another
        assert process.poll() is None
        lazy.kill_server(f"{process.pid}:{started}")
        assert lazy.start_time(process.pid) == ""  # killed, and reaped: our child
    finally:
        process.kill()
        process.wait()


def test_a_server_gone_or_never_recorded_is_no_error() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    lazy.kill_server(f"{process.pid}:1")
    lazy.kill_server("")
    assert lazy.start_time(process.pid) == ""


def test_a_dead_server_that_is_not_our_child_is_not_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server of an engine's container is not the deleting process's child (its create
    spawned it; the engine's subreaper or init is its parent now): once it is a zombie, it is
    gone for us, not waited for until DETACH_WAIT passes (which made every lazy delete 10 s
    slower while the parent had not reaped it)."""
    read_end, write_end = os.pipe()
    parent = os.fork()
    if parent == 0:  # a parent that never reaps its child
        os.close(read_end)
        child = subprocess.Popen(["sleep", "100"])
        os.write(write_end, str(child.pid).encode())
        time.sleep(60)
        os._exit(0)
    os.close(write_end)
    try:
        pid = int(os.read(read_end, 64))
        sleeps: list[float] = []
        real_sleep = time.sleep  # (lazy.time is the time module)

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            assert len(sleeps) < 100, "still waiting for a zombie that is not ours"
            real_sleep(seconds)

        monkeypatch.setattr(lazy.time, "sleep", sleep)
        lazy.kill_server(f"{pid}:{lazy.start_time(pid)}")
        assert lazy._state(pid) == "Z"  # killed; its own parent reaps it
    finally:
        os.close(read_end)
        os.kill(parent, signal.SIGKILL)
        os.waitpid(parent, 0)
