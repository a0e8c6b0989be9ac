"""Figures 1-7, 10, 11 and 14: everything that needs dm-crypt. Runs inside the VM (`make bench`).

Each cryptlayer figure is measured next to its baseline in the same run, on the same disk, with
caches dropped before every timed run. cryptlayer is called in-process (its own start-up taken
out); a few runs as a real process measure that start-up too, which the report shows separately.
Usage: devices.py [--sizes 64,256,1024] [--runs 3] [--layers 1,5,20] [--concurrent 20]
[SECTION...] (default: all of startup unlock limit sizes read concurrent verity process
engine ocicrypt lazy lazychunk).
Arguments, not environment variables: the VM does not inherit the host's environment.
Each section is a module of bench/sections/ (what they share: sections/base.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, sh
from sections import (
    concurrent,
    engine,
    lazy,
    limit,
    ocicrypt,
    process,
    read,
    sizes,
    startup,
    unlock,
    verity,
)
from sections.base import CLI, KEY, WORK, settings

SECTIONS = ("startup", "unlock", "limit", "sizes", "read", "concurrent", "verity", "process",
            "engine", "ocicrypt", "lazy", "lazychunk")  # fmt: skip


def main() -> None:
    import argparse

    numbers = lambda text: [int(n) for n in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=numbers, default=settings.sizes)
    parser.add_argument("--runs", type=int, default=settings.runs)
    parser.add_argument("--layers", type=numbers, default=settings.layers)
    parser.add_argument("--concurrent", type=int, default=settings.concurrent)
    parser.add_argument(
        "--shred-rate",
        type=float,
        default=0.0,
        help="seconds per MiB of one shred pass, from an earlier run",
    )
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=" ".join(SECTIONS))
    args = parser.parse_args()
    if set(args.sections) - set(SECTIONS):
        parser.error(f"sections are {', '.join(SECTIONS)}")
    settings.sizes, settings.runs = args.sizes, args.runs
    settings.layers, settings.concurrent = args.layers, args.concurrent
    settings.shred_s_per_mib = args.shred_rate
    chosen = set(args.sections or SECTIONS)
    WORK.mkdir(parents=True, exist_ok=True)
    sh(*CLI, "keygen", str(KEY))
    try:
        record("machine_vm", machine())
        cli = startup.cli_startup()
        record("cli_startup_vm", cli)
        if "unlock" in chosen:
            record("unlock", unlock.unlock_cost())
        if "limit" in chosen:
            record("dm_crypt_limit", limit.dm_crypt_limit())
        for size in settings.sizes if "sizes" in chosen else []:
            record(f"size_{size}", sizes.start_latency_and_friends(size, cli["help"]["median_s"]))
        if "read" in chosen:
            record("read", read.read_throughput(min(256, max(settings.sizes))))
        if "concurrent" in chosen:
            record("concurrent", concurrent.concurrent_starts(settings.concurrent))
        if "verity" in chosen:
            record("verity", verity.verity_cost(min(256, max(settings.sizes))))
        if "process" in chosen:
            record("process", process.start_as_process())
        if "engine" in chosen:
            record("engine_podman", engine.podman_against_run())
        if "ocicrypt" in chosen:
            record("ocicrypt", ocicrypt.convert_throughput(min(256, max(settings.sizes))))
        for size in settings.sizes if "lazy" in chosen else []:
            record(f"lazy_{size}", lazy.lazy_start(size))
        if "lazychunk" in chosen:
            record("lazy_chunks", lazy.chunk_sizes(lazy.CHUNK_IMAGE_MIB))
    finally:
        KEY.unlink()
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
