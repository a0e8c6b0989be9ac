"""Figure 7: containers started at once from one image, as processes."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common import MiB, drop_caches, make_tree

from cryptlayer.runtime import container
from sections.base import (
    CLI,
    KEY,
    WORK,
    build,
)


def concurrent_starts(count: int = 20) -> dict[str, Any]:
    """Figure 7: `count` containers started at once from one image, as processes."""
    work = WORK / "concurrent"
    tree = work / "tree"
    make_tree(tree, 32 * MiB, 2)
    image = work / "img"
    build(sorted(tree.iterdir()), image)
    used = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            info = dict(
                line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()
            )
            used.append(int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0]))
            time.sleep(0.05)

    drop_caches()
    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(0.3)
    base = min(used)
    begin = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*CLI, "start", "--keep", "--key-file", str(KEY), "--name", f"c{i}", str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(count)
    ]
    errors = [p.stderr.read().decode() for p in procs if p.wait() != 0 and p.stderr]
    total = time.perf_counter() - begin
    stop.set()
    sampler.join()
    for i in range(count):
        try:
            container.stop(f"c{i}")
        except Exception as err:  # report it, and keep stopping the others
            errors.append(str(err))
    shutil.rmtree(work)
    return {
        "containers": count,
        "total_s": total,
        "peak_memory_mib": (max(used) - base) / 1024,
        "failures": errors,
    }
