"""Where cryptlayer-runtime's own process time goes in a podman run (figure 12's trace, split
further): each call podman and conmon make to the runtime, run with PYTHONPROFILEIMPORTTIME=1,
its wall time and its imports (`-X importtime`'s sum, and the top-level imports by cumulative
time); `cryptlayer run` of the same image beside it. In the VM:
    flock /work/vm.lock env CRYPTLAYER_VM_RWDIR=OUT scripts/in-vm .venv/bin/python \
        bench/engine_imports.py OUT
Writes OUT/engine-imports.json and prints a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sh
from sections import engine as E
from sections.base import CLI, KEY, WORK, build

COMMANDS = E.RUNTIME_COMMANDS


def parse(text: str) -> dict[str, Any]:
    """`-X importtime` lines of one process (possibly with a forked child's after them)."""
    total_us, top, lines = 0, [], 0
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, raw = line[len("import time:") :].split("|", 2)
        name = raw.strip()
        lines += 1
        total_us += int(self_us)
        depth = (len(raw) - len(raw.lstrip(" ")) - 1) // 2
        if depth == 0:
            top.append((int(cumulative), name))
    top.sort(reverse=True)
    return {"modules": lines, "import_s": total_us / 1e6,
            "top": [(n, c / 1e6) for c, n in top[:25]]}  # fmt: skip


def profiled_wrapper(path: Path, config: Path, out: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    passed = {k: v for k, v in os.environ.items() if k.startswith("CRYPTLAYER_") or k == "TMPDIR"}
    passed |= {"CRYPTLAYER_CONFIG": str(config), "PATH": os.environ["PATH"]}
    exports = " ".join(f"{k}='{v}'" for k, v in sorted(passed.items()))
    path.write_text(
        f"#!/bin/bash\nexport {exports}\nexport PYTHONPROFILEIMPORTTIME=1\n"
        f'f={out}/call.$$.$RANDOM\necho "ARGV $*" > $f\nbegin=$EPOCHREALTIME\n'
        f'{E.RUNTIME} "$@" 2>>$f\nstatus=$?\necho "TIME $begin $EPOCHREALTIME" >> $f\n'
        "exit $status\n"
    )
    path.chmod(0o755)
    return path


def calls(out: Path) -> list[dict[str, Any]]:
    found = []
    for f in sorted(out.glob("call.*")):
        text = f.read_text(errors="replace")
        argv = text.splitlines()[0][5:].split()
        command = next((a for a in argv if a in COMMANDS), "?")
        timing = [ln for ln in text.splitlines() if ln.startswith("TIME ")]
        begin, end = (float(x) for x in timing[-1].split()[1:3]) if timing else (0.0, 0.0)
        found.append({"command": command, "wall_s": end - begin, "begin": begin, "raw": text,
                      **parse(text)})  # fmt: skip
        f.unlink()
    return sorted(found, key=lambda c: c["begin"])


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    KEY.unlink(missing_ok=True)  # (devices.py removes its own; one left by a failed run)
    sh(*CLI, "keygen", str(KEY))
    work = WORK / "engine-imports"
    work.mkdir(parents=True)
    image = work / "images" / "img"
    image.parent.mkdir()
    build([E._busybox(work / "tree")], image)
    config = work / "config.toml"
    config.write_text(f'trust = "{E._sign(image, work)}"\n[[keys]]\nimage = "{image.parent}/*"\n'
                      f'key-file = "{KEY}"\n')  # fmt: skip
    env = E._podman_env(work)
    plain = E._wrapper(work / "plain" / "cryptlayer-runtime", config, trace=None)
    out = work / "calls"
    out.mkdir()
    profiled = profiled_wrapper(work / "prof" / "cryptlayer-runtime", config, out)
    E._sh(*CLI, "placeholder", "--engine", "podman", env=env)
    run_env = {**os.environ, "CRYPTLAYER_CONFIG": str(config)}

    def podman(runtime: Path) -> float:
        return E._timed(lambda: E._sh(
            "podman", "run", "--rm", "--runtime", str(runtime), "--network", "none", *E.LIMITS,
            "--annotation", f"org.cryptlayer.image={image}", "--annotation",
            "org.cryptlayer.keep=true", E.PLACEHOLDER, "true", env=env))  # fmt: skip

    def run(extra: dict[str, str]) -> tuple[float, str]:
        begin = time.perf_counter()
        done = subprocess.run([*CLI, "run", "--keep", "--key-file", str(KEY), str(image), "true"],
                              env={**run_env, **extra}, capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return time.perf_counter() - begin, done.stderr

    result: dict[str, Any] = {"podman": [], "run": []}
    podman(plain)  # warm
    run({})
    for _ in range(2):
        total = podman(profiled)
        time.sleep(1)
        while E._records():
            time.sleep(0.5)
        time.sleep(3)  # the delete's process exits after its record is gone
        result["podman"].append({"total_s": total, "calls": calls(out)})
        wall, stderr = run({"PYTHONPROFILEIMPORTTIME": "1"})
        result["run"].append({"wall_s": wall, "raw": stderr, **parse(stderr)})
    result["plain_podman_s"] = podman(plain)
    result["plain_run_s"] = run({})[0]
    bare = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True,
                          text=True)  # fmt: skip
    result["bare_python"] = {"raw": bare.stderr, **parse(bare.stderr)}
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"])
    result["bare_python_wall_s"] = time.perf_counter() - begin
    subprocess.run(["podman", "rm", "--all", "--force"], env=env, capture_output=True)
    KEY.unlink()
    text = json.dumps(result, indent=1)
    if dest is not None:
        (dest / "engine-imports.json").write_text(text)
    for p in result["podman"]:
        print(f"podman total {p['total_s']:.2f}")
        for c in p["calls"]:
            print(f"  {c['command']:8} wall {c['wall_s']:.2f} imports {c['import_s']:.2f} "
                  f"({c['modules']} modules)")  # fmt: skip
            for name, s in c["top"][:12]:
                print(f"      {s:6.2f} {name}")
    for r in result["run"]:
        print(f"run wall {r['wall_s']:.2f} imports {r['import_s']:.2f} ({r['modules']} modules)")
        for name, s in r["top"][:12]:
            print(f"      {s:6.2f} {name}")
    print(f"plain podman {result['plain_podman_s']:.2f} run {result['plain_run_s']:.2f} "
          f"bare python {result['bare_python_wall_s']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
