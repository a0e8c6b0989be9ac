"""Figure 8: CLI start-up on the host (no VM needed), against a bare interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, sh, summary, timed

CLI = [sys.executable, "-m", "cryptlayer"]
RUNS = 15


def main() -> None:
    record("machine_host", machine())
    figures = {
        "help": timed(lambda: sh(*CLI, "--help"), RUNS, cold=False),
        "ps": timed(lambda: sh(*CLI, "ps"), RUNS, cold=False),
        "bare_python": timed(lambda: sh(sys.executable, "-c", "pass"), RUNS, cold=False),
    }
    record("cli_startup_host", {name: summary(times) for name, times in figures.items()})


if __name__ == "__main__":
    main()
