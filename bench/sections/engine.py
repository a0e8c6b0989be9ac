"""Figure 12, its second half: `podman run --rm --runtime cryptlayer-runtime` of an encrypted
image against `cryptlayer run` of the same image, start to exit of `true`, both as the processes
users run, interleaved, in one run (issue 23's target: at most 1.2x); then one podman run traced,
to say where its time goes (each call podman and conmon make to the runtime, podman's own), and
the in-process start and stop that both sides share.

Both sides as a node runs them: a signed one-layer busybox image, its key and trust from the
node's config.toml; no network (cryptlayer run's default, podman's `--network none`); the image
kept (`--keep`, `org.cryptlayer.keep=true`), so that every run opens the same copy; podman's
storage (vfs) and state on the scratch disk, its runtime a wrapper that gives it the CRYPTLAYER_*
variables (conmon hands the runtime an environment of its own), as tests/vm/test_engines.py does.
Caches are warm on both sides (one untimed run of each first): the programs, Python's modules
and the image's headers are in the page cache, as on a node that starts containers often.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import summary

from cryptlayer import paths
from cryptlayer.keys.sources import Credential
from cryptlayer.runtime import container
from sections.base import CLI, KEY, WORK, build, key, settings

RUNTIME = str(Path(sys.executable).with_name("cryptlayer-runtime"))
PLACEHOLDER = "localhost/cryptlayer/placeholder:v1"
# as tests/vm/test_engines.py: the guest's hard limits are below podman's defaults
LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
RUNTIME_COMMANDS = ("create", "start", "state", "kill", "delete", "exec", "features", "run")


def podman_against_run() -> dict[str, Any]:
    """The figure: medians of settings.runs runs of each side, their ratio, and one traced
    podman run split by runtime call."""
    work = WORK / "engine"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = work / "images" / "img"
    image.parent.mkdir()
    out: dict[str, Any] = {"build_s": build([_busybox(work / "tree")], image)}
    config = work / "config.toml"
    config.write_text(f'trust = "{_sign(image, work)}"\n[[keys]]\nimage = "{image.parent}/*"\n'
                      f'key-file = "{KEY}"\n')  # fmt: skip
    env = _podman_env(work)
    wrapper = _wrapper(work / "cryptlayer-runtime", config, trace=None)
    traced = _wrapper(work / "traced" / "cryptlayer-runtime", config, trace=work / "trace")
    run_env = {**os.environ, "CRYPTLAYER_CONFIG": str(config)}
    placeholder = _sh(*CLI, "placeholder", "--engine", "podman", env=env).strip()
    assert placeholder == PLACEHOLDER, placeholder

    def podman(runtime: Path) -> None:
        _sh("podman", "run", "--rm", "--runtime", str(runtime), "--network", "none", *LIMITS,
           "--annotation", f"org.cryptlayer.image={image}", "--annotation",
           "org.cryptlayer.keep=true", PLACEHOLDER, "true", env=env)  # fmt: skip

    def run() -> None:
        _sh(*CLI, "run", "--keep", "--key-file", str(KEY), str(image), "true", env=run_env)

    podman(wrapper)  # untimed: both sides' programs and modules into the page cache
    run()
    podman_s, run_s = [], []
    for _ in range(settings.runs):
        podman_s.append(_timed(lambda: podman(wrapper)))
        run_s.append(_timed(run))
    out["podman_run"], out["cryptlayer_run"] = summary(podman_s), summary(run_s)
    out["ratio"] = out["podman_run"]["median_s"] / out["cryptlayer_run"]["median_s"]
    out["traced"] = _traced(lambda: podman(traced), work / "trace")
    out["in_process"] = _in_process(image)
    out["bare_python"] = summary([_timed(lambda: _sh(sys.executable, "-c", "pass"))
                                  for _ in range(settings.runs)])  # fmt: skip
    out["podman_version"] = _sh("podman", "--version").strip()
    subprocess.run(["podman", "rm", "--all", "--force"], env=env, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _sh(*argv: str, env: dict[str, str] | None = None) -> str:
    """common.sh with an environment; a failure shows the program's stderr."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def _busybox(root: Path) -> Path:
    """A minimal root file system: static busybox, `sh` and `true`."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("etc", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def _sign(image: Path, work: Path) -> Path:
    """Sign `image` with a new publisher key; the allowed_signers file trusting it."""
    publisher = work / "publisher"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(publisher))
    _sh(*CLI, "sign", str(image), "--sign-key", str(publisher), "--name", "release")
    trust = work / "allowed_signers"
    public = Path(f"{publisher}.pub").read_text().split()[:2]
    trust.write_text("release@example " + " ".join(public) + "\n")
    return trust


def _podman_env(work: Path) -> dict[str, str]:
    (work / "containers.conf").write_text(f"""[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{work}/events.log"
tmp_dir = "{work}/libpod"
runtime_supports_json = ["crun", "runc", "cryptlayer-runtime"]
runtime_supports_nocgroups = ["crun", "cryptlayer-runtime"]
""")
    (work / "storage.conf").write_text(f"""[storage]
driver = "vfs"
graphroot = "{work}/storage"
runroot = "{work}/storage-run"
""")
    return {"PATH": os.environ["PATH"], "HOME": str(work), "TMPDIR": str(work),
            "CONTAINERS_CONF": str(work / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(work / "storage.conf")}  # fmt: skip


def _wrapper(path: Path, config: Path, trace: Path | None) -> Path:
    """The runtime as podman is given it: this process's CRYPTLAYER_* exported, then exec; with
    `trace`, run as a child instead, each call's start, end and argv appended to `trace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    passed = {k: v for k, v in os.environ.items() if k.startswith("CRYPTLAYER_") or k == "TMPDIR"}
    passed |= {"CRYPTLAYER_CONFIG": str(config), "PATH": os.environ["PATH"]}
    exports = " ".join(f"{k}='{v}'" for k, v in sorted(passed.items()))
    if trace is None:
        path.write_text(f'#!/bin/sh\nexport {exports}\nexec {RUNTIME} "$@"\n')
    else:
        path.write_text(f'#!/bin/bash\nexport {exports}\nbegin=$EPOCHREALTIME\n{RUNTIME} "$@"\n'
                        f'status=$?\necho "$begin $EPOCHREALTIME $*" >> {trace}\n'
                        'exit $status\n')  # fmt: skip
    path.chmod(0o755)
    return path


def _timed(fn: Any) -> float:
    """Seconds of one call of `fn`, once the previous container is gone (conmon's cleanup may
    still tear one down after `podman run --rm` returned: never counted in the next run)."""
    deadline = time.monotonic() + 600
    while _records() and time.monotonic() < deadline:
        time.sleep(0.5)
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def _records() -> list[str]:
    records = paths.records_dir()
    return [p.name for p in records.iterdir()] if records.is_dir() else []


def _traced(podman: Any, trace: Path) -> dict[str, Any]:
    """One podman run through the tracing wrapper: its total, and per runtime command the calls
    and their seconds (calls may overlap: conmon's cleanup runs beside podman)."""
    trace.unlink(missing_ok=True)
    started = [0.0]

    def go() -> None:
        started[0] = time.time()
        podman()

    total = _timed(go)
    calls: dict[str, dict[str, float]] = {}
    timeline = []  # (command, seconds from podman's start to the call's, the call's seconds)
    for line in trace.read_text().splitlines():
        begin, end, *argv = line.split()
        command = next((a for a in argv if a in RUNTIME_COMMANDS), "?")
        entry = calls.setdefault(command, {"calls": 0, "s": 0.0})
        entry["calls"] += 1
        entry["s"] += float(end) - float(begin)
        timeline.append((command, float(begin) - started[0], float(end) - float(begin)))
    runtime_s = sum(c["s"] for c in calls.values())
    timeline.sort(key=lambda t: t[1])
    # podman's 20 s wait for a cleanup that never marks the container exited (podman 4.3 at
    # --log-level debug without a syslog socket: docs/engines.md) shows as the longest time
    # with no runtime call open, between `start`'s end and `delete`
    ends = [begin + took for _, begin, took in timeline]
    idle = [nxt[1] - max(ends[: i + 1]) for i, nxt in enumerate(timeline[1:])]
    return {"total_s": total, "runtime_calls": calls, "runtime_s": runtime_s,
            "podman_own_s": total - runtime_s, "longest_idle_s": max(idle, default=0.0),
            "timeline": timeline}  # fmt: skip


def _in_process(image: Path) -> dict[str, Any]:
    """What both sides share, in-process: assembling the image's container (`start`) and its
    teardown (`stop`), median of settings.runs each."""
    starts, stops = [], []
    for _ in range(settings.runs):
        begin = time.perf_counter()
        with Credential(key=key()) as credential:
            container.start(image, credential, container.StartOptions("bench", shred=False))
        starts.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        container.stop("bench")
        stops.append(time.perf_counter() - begin)
    return {"start": summary(starts), "stop": summary(stops)}
