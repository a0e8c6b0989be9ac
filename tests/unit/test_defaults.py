"""Defaults live in the core; the command line shows the core's (issue 22 item 3)."""

from __future__ import annotations

from clirunner import invoke

from cryptlayer import cli
from cryptlayer.image import envelope
from cryptlayer.runtime import container


def test_the_cli_shows_the_cores_defaults() -> None:
    options = container.StartOptions("x")
    assert cli._size(cli.SCRATCH) == options.scratch_bytes == container.DEFAULT_SCRATCH
    assert cli._size_text(3 << 20) == "3M" and cli._size_text(1536) == "1536"
    assert envelope.Principals().iter_time_ms == envelope.DEFAULT_ITER_TIME_MS
    code, out, _ = invoke("run", "--help")
    assert code == 0
    assert "[default: 1G]" in out and "[default: 10.0]" in out
    assert f"[default: {options.stop_timeout}]" in out
    code, out, _ = invoke("build", "--help")
    assert code == 0 and f"[default: {envelope.DEFAULT_ITER_TIME_MS}; x>=1]" in out
