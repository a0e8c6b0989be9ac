"""Figure 8 in the VM: the CLI's own start-up, taken out of process-level figures."""

from __future__ import annotations

import sys
from typing import Any

from common import sh, summary, timed

from sections.base import (
    CLI,
    settings,
)


def cli_startup() -> dict[str, Any]:
    """The CLI's own start-up in this machine, to take out of process-level figures."""
    help_times = timed(lambda: sh(*CLI, "--help"), settings.runs, cold=False)
    ps_times = timed(lambda: sh(*CLI, "ps"), settings.runs, cold=False)
    bare = timed(lambda: sh(sys.executable, "-c", "pass"), settings.runs, cold=False)
    return {"help": summary(help_times), "ps": summary(ps_times), "bare_python": summary(bare)}
