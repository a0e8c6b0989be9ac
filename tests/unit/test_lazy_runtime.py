"""runtime/lazy.py's server process handling: killed by pid *and* start time (never another
process that got a reused pid), and a server that ends by itself is no error."""

from __future__ import annotations

import subprocess

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
