"""Shared by the benchmarks: timing, test data, results, the machine they ran on."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "docs/benchmarks/results.json"
MiB = 1 << 20


def sh(*argv: str, stdin: Any = None) -> str:
    """Run a tool; its stdout. Failing loudly is right for a benchmark."""
    return subprocess.run(argv, check=True, capture_output=True, text=True, stdin=stdin).stdout


def drop_caches() -> None:
    """Cold caches before every timed run, for cryptlayer and baselines alike."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(
    fn: Callable[[], Any], runs: int, setup: Callable[[], Any] | None = None, cold: bool = True
) -> list[float]:
    """Seconds per run of `fn`; `setup` (untimed) and a cache drop before each."""
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        if cold:
            drop_caches()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "runs_s": [round(t, 4) for t in times]}


def make_tree(root: Path, total: int, parts: int, seed: int = 1) -> dict[str, int]:
    """`total` bytes of incompressible data in `parts` directories (part00..): 70% in large files
    (4-16 MiB), 30% in small ones (1-32 KiB), like a typical root file system plus its data."""
    rng = random.Random(seed)
    dirs = [root / f"part{i:02}" for i in range(parts)]
    for d in dirs:
        d.mkdir(parents=True)
    written = files = small = 0
    large_budget = int(total * 0.7)
    i = 0
    while written < large_budget:
        size = min(rng.randint(4 * MiB, 16 * MiB), large_budget - written)
        (dirs[i % parts] / f"large{i:05}.bin").write_bytes(rng.randbytes(size))
        written, files, i = written + size, files + 1, i + 1
    while written < total:
        size = min(rng.randint(1024, 32 * 1024), total - written)
        sub = dirs[i % parts] / f"d{(i // parts) % 64:02}"
        sub.mkdir(exist_ok=True)
        (sub / f"small{i:06}.dat").write_bytes(rng.randbytes(size))
        written, files, small, i = written + size, files + 1, small + 1, i + 1
    return {"bytes": written, "files": files, "small_files": small}


def group(parts: list[Path], layers: int, into: Path) -> list[Path]:
    """`layers` directories, each hard-linking an equal share of `parts` (no data is copied)."""
    per = len(parts) // layers
    out = []
    for n in range(layers):
        target = into / f"layer{n:02}"
        target.mkdir(parents=True)
        for part in parts[n * per : (n + 1) * per]:
            sh("cp", "-al", str(part), str(target / part.name))
        out.append(target)
    return out


def machine() -> dict[str, Any]:
    """Where the numbers come from; emulated-VM numbers are valid as ratios only."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    try:
        virt = subprocess.run(
            ["systemd-detect-virt"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        virt = "unknown"
    mem = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    emulated = "QEMU TCG" in cpu or (virt == "qemu" and not Path("/dev/kvm").exists())
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_mib": int(mem) // 1024,
        "virtualization": virt or "none",
        "software_emulation": emulated,
        "cryptsetup": sh("cryptsetup", "--version").strip(),
        "python": platform.python_version(),
    }


def record(section: str, value: dict[str, Any]) -> None:
    """Merge one section into results.json (atomically: a crash keeps the previous file)."""
    data: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[section] = value
    data.setdefault("generated", {})[section] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(RESULTS)
    print(f"bench: {section}: {json.dumps(value)[:300]}", flush=True)


@contextlib.contextmanager
def registry_blob(size: int) -> Iterator[tuple[Path, Any, str, str, bytes]]:
    """For the lazy path's host benchmarks (lazyhost.py, lazyserver.py): a scratch directory as
    CRYPTLAYER_ROOT and HOME, `size` random bytes written to its `blob` and pushed as a blob to
    Debian's docker-registry on 127.0.0.1 (tests/registryfixtures.py), no credentials; yields
    (the directory, the registry's client, the reference, the blob's digest, its bytes)."""
    import hashlib
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from registryfixtures import registry

    from cryptlayer.distribution.registry import Registry, parse_reference

    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        os.environ["CRYPTLAYER_ROOT"] = str(tmp / "state")
        os.environ["HOME"] = str(tmp / "home")
        data = os.urandom(size)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (tmp / "blob").write_bytes(data)
        with registry(tmp / "registry") as running:  # (it reads REGISTRY_* as its config)
            os.environ["REGISTRY_AUTH_FILE"] = str(tmp / "auth.json")
            ref = f"docker://{running.host}/lazy/app:v1"
            reg = Registry(parse_reference(ref), tls_verify=False)
            reg.conn.scheme = "http"
            with open(tmp / "blob", "rb") as f:
                reg.push_blob(f, digest, size, lambda _: None)
            yield tmp, reg, ref, digest, data
