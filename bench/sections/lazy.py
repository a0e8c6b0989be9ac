"""Figure 14: lazy start (issue 25, docs/lazy.md): time to a job's first output from an image in a
registry, three ways side by side in one run, on a local registry and behind a link shaped to
100 Mbit/s and 20 ms round trip; what a lazy start fetches against what the job reads; a second
start; sequential reads through the lazy device.

The registry is Debian's docker-registry, started here on the guest's loopback (as
tests/registryfixtures.py starts it); the shaped link is `tc qdisc ... netem delay 10ms rate
100mbit` on `lo`, so every packet each way waits 10 ms and the link carries 100 Mbit/s. The image
is a real tree: this machine's Python 3.11 (the interpreter, its libraries and /usr/lib/python3.11
without the static libpython) plus filler files (random bytes: 70% in files of 4-16 MiB, 30% in
files of 1-32 KiB) up to the size, and JOB_FILES data files the job reads. The job: Python starts,
imports a few modules of the standard library, reads the data files, and prints one line.

The three ways, each timed from the first command to the job's first line, as processes (the
users' commands), caches dropped before each (the programs' own files warmed again, as a node
that starts containers has them; base.warm_caches):
- lazy: `cryptlayer run --keep docker://...` (nothing cached: the block cache emptied);
- pull + run: `cryptlayer pull docker://... DIR`, then `cryptlayer run --keep DIR`;
- ocicrypt's way: the same tree as one uncompressed tar layer, encrypted by skopeo (`skopeo copy
  --encryption-key jwe:...`) and pushed; then `skopeo copy --decryption-key ... dir:`, each layer
  untarred, and the job run in the tree with chroot.
Then a second lazy start (the block cache kept): the layer bytes it fetched (target: none). The
bytes fetched are the block cache's (every layer byte a lazy start fetches goes through it: the
headers and the chunks) plus the image's other files (statement, keys.json, verity trees,
manifest), which are fetched whole; what the job read is what the kernel read from the NBD devices
(/sys/block/nbdN/stat), from one lazy `start` with the job run in its root by chroot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import MiB, drop_caches, sh, summary

from cryptlayer.image import manifest as statement
from cryptlayer.paths import block_cache_dir
from sections.base import CLI, KEY, WORK, build, settings, warm_caches

TESTS = Path(__file__).resolve().parents[2] / "tests"
PYTHON = "/usr/bin/python3.11"
PYLIB = "/usr/lib/python3.11"
# The job reads JOB_FILES data files of JOB_FILE bytes, and Python's own (its binary, libraries and
# modules: measured in the figure): about 4% of a 512 MiB image. Python is 48 MB of the 64 MiB one.
JOB_FILES = 3
JOB_FILE = 4 * MiB
POOL = 16 * MiB  # filler files are cut from a pool of random bytes (nothing here compresses)
MODULES = "json, argparse, logging, email.parser, xml.etree.ElementTree, http.client, unittest"
JOB = (
    f"import glob, {MODULES}\n"
    "n = sum(len(open(p, 'rb').read()) for p in sorted(glob.glob('/data/job/*')))\n"
    "print('ready', n, flush=True)\n"
)
SHAPE = ("delay", "10ms", "rate", "100mbit", "limit", "100000")
SEQUENTIAL_MAX = 64 * MiB  # sequential read: the filler's large files up to this
WAYS = ("lazy", "pull_run", "ocicrypt")
WARM = (("skopeo", "--version"), ("tar", "--version"), ("chroot", "--version"))


def lazy_start(size_mib: int) -> dict[str, Any]:
    """The figure for images of `size_mib` MiB of content: see the module's text."""
    sys.path.insert(0, str(TESTS))
    from registryfixtures import registry

    work = WORK / "lazy"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict[str, Any] = {"size_mib": size_mib, "job": JOB, "netem": " ".join(SHAPE)}
    phases: dict[str, float] = {}
    tree = work / "tree"
    with _phase(phases, "tree"):
        out["content"] = real_tree(tree, size_mib * MiB)
    image = work / "img"
    phases["build"] = build([tree], image)
    _say(f"build {phases['build']:.1f} s")
    out["image_bytes"] = sum(p.stat().st_size for p in image.iterdir() if p.is_file())
    out["header_bytes"] = sum(layer.offset for layer in statement.load(image).layers)
    out["small_files_bytes"] = sum(
        p.stat().st_size for p in image.iterdir() if p.is_file() and p.suffix != ".luks"
    )
    layout = work / "oci"
    with _phase(phases, "oci_layout"):
        _tar_layout(tree, layout, work / "layer.tar")
    large = [(p.relative_to(tree), p.stat().st_size)
             for p in sorted(tree.glob("filler/**/large*.bin"))]  # fmt: skip
    _, rsa_pub = _rsa(work)
    with registry(work / "registry") as reg:
        lazy_ref = f"docker://{reg.host}/bench/lazy:v1"
        oci_ref = f"docker://{reg.host}/bench/ocicrypt:v1"
        with _phase(phases, "push"):
            sh(
                *CLI,
                "push",
                "--no-tls-verify",
                "-q",
                str(image),
                lazy_ref.removeprefix("docker://"),
            )
        with _phase(phases, "skopeo_encrypt_push"):
            sh("skopeo", "copy", "-q", "--dest-tls-verify=false", "--encryption-key",
               f"jwe:{rsa_pub}", f"oci:{layout}:latest", oci_ref)  # fmt: skip
        shutil.rmtree(layout)
        out["layer_blob_bytes"] = _layer_blob_bytes(reg.storage)
        ways = _Ways(work, lazy_ref, oci_ref)
        for name, part in (
            ("job_reads", ways.job_reads),
            ("sequential", lambda: ways.sequential(large)),
        ):
            try:  # the figure's other parts are kept if one fails
                out[name] = part()
            except Exception as err:
                out[name] = {"error": str(err)[-2000:]}
            _say(f"{name} {out[name]}")
        shutil.rmtree(tree)
        for link in ("local", "shaped"):
            with _shaped(link == "shaped"):
                out[f"{link}_link"] = _link(reg.host, reg.storage)
                _say(f"{link} link {out[f'{link}_link']}")
                out[link] = ways.first_output()
            _say(f"{link} {out[link]}")
    out["phases_s"] = phases
    shutil.rmtree(work, ignore_errors=True)
    return out


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    begin = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - begin
    _say(f"{name} {phases[name]:.1f} s")


def _say(text: str) -> None:
    """Progress, for whoever waits on a long run."""
    print(f"bench: lazy: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def real_tree(root: Path, total: int) -> dict[str, int]:
    """Python 3.11 (binary, the libraries it and its extension modules link, its standard library
    without the static libpython), the job's data files, and filler up to `total` bytes."""
    root.mkdir(parents=True)
    libs: set[str] = set()
    for binary in (PYTHON, *map(str, Path(PYLIB, "lib-dynload").glob("*.so"))):
        for line in sh("ldd", binary).splitlines():
            words = line.split()
            path = words[2] if "=>" in words and len(words) > 2 else words[0]
            if path.startswith("/"):
                libs.add(path)
    for name in ("lib", "lib64", "bin"):  # usrmerge's links, as this machine has them
        if Path("/" + name).is_symlink():
            (root / "usr" / name).mkdir(parents=True, exist_ok=True)
            (root / name).symlink_to(os.readlink("/" + name))
    for path in (PYTHON, *sorted(libs)):
        dest = root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), dest)
    shutil.copytree(PYLIB, root / PYLIB.lstrip("/"), symlinks=True,
                    ignore=shutil.ignore_patterns("config-3*", "test"))  # fmt: skip
    for d in ("tmp", "proc", "sys", "dev", "etc"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    python_bytes = _bytes(root)
    rng = random.Random(14)
    pool = rng.randbytes(POOL)

    def cut(size: int) -> bytes:
        start = rng.randrange(POOL - size + 1) if size < POOL else 0
        return (pool * (size // POOL + 1))[:size] if size > POOL else pool[start : start + size]

    (root / "data/job").mkdir(parents=True)
    for i in range(JOB_FILES):
        (root / f"data/job/data{i}.bin").write_bytes(cut(JOB_FILE))
    written = _bytes(root)
    filler = root / "filler"
    large_budget = written + int(max(0, total - written) * 0.7)
    i = files = 0
    while written < large_budget:
        size = min(rng.randint(4 * MiB, 16 * MiB), large_budget - written)
        sub = filler / f"d{i % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"large{i:05}.bin").write_bytes(cut(size))
        written, files, i = written + size, files + 1, i + 1
    while written < total:
        size = min(rng.randint(1024, 32 * 1024), total - written)
        sub = filler / f"d{i % 8}" / f"s{(i // 8) % 64:02}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"small{i:06}.dat").write_bytes(cut(size))
        written, files, i = written + size, files + 1, i + 1
    return {"bytes": written, "python_bytes": python_bytes, "job_data_bytes": JOB_FILES * JOB_FILE,
            "filler_files": files}  # fmt: skip


def _bytes(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _tar_layout(tree: Path, layout: Path, tar: Path) -> None:
    """An OCI layout of `tree` as one uncompressed tar layer (the filler does not compress; gzip
    in the emulated VM would cost minutes and shrink only Python's share)."""
    sh("tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-C", str(tree),
       "-cf", str(tar), ".")  # fmt: skip
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar",
             "digest": f"sha256:{h.hexdigest()}", "size": tar.stat().st_size}  # fmt: skip
    tar.rename(blobs / h.hexdigest())
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": [PYTHON]},
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}  # fmt: skip
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _put(
            blobs, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
        ),
        "layers": [layer],
    }
    desc = _put(blobs, json.dumps(manifest).encode(), manifest["mediaType"])
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def _put(blobs: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _rsa(work: Path) -> tuple[Path, Path]:
    private, public = work / "rsa.pem", work / "rsa.pub"
    sh("openssl", "genrsa", "-out", str(private), "2048")
    private.chmod(0o600)
    sh("openssl", "rsa", "-in", str(private), "-pubout", "-out", str(public))
    return private, public


def _link(host: str, storage: Path) -> dict[str, Any]:
    """What the link gives: the largest blob fetched by curl, its rate and its first byte's wait
    (a connection and a request: two round trips)."""
    try:
        blob = max(storage.glob("docker/registry/v2/blobs/sha256/*/*/data"),
                   key=lambda p: p.stat().st_size)  # fmt: skip
        url = f"http://{host}/v2/bench/lazy/blobs/sha256:{blob.parent.name}"
        form = "%{size_download} %{speed_download} %{time_starttransfer}"
        got = sh("curl", "-sf", "-o", "/dev/null", "-w", form, url).split()
        return {"curl_bytes": int(got[0]), "curl_mib_s": float(got[1]) / MiB,
                "curl_first_byte_s": float(got[2])}  # fmt: skip
    except Exception as err:
        return {"error": str(err)[-500:]}


def _layer_blob_bytes(storage: Path) -> dict[str, int]:
    """Every blob in the registry's storage by size, largest first (the layers)."""
    blobs = sorted(storage.glob("docker/registry/v2/blobs/sha256/*/*/data"),
                   key=lambda p: -p.stat().st_size)  # fmt: skip
    return {p.parent.name[:12]: p.stat().st_size for p in blobs[:4]}


@contextlib.contextmanager
def _shaped(on: bool) -> Iterator[None]:
    """netem on the guest's loopback while inside (nothing when `on` is false)."""
    if not on:
        yield
        return
    sh("modprobe", "sch_netem")
    sh("tc", "qdisc", "replace", "dev", "lo", "root", "netem", *SHAPE)
    try:
        yield
    finally:
        sh("tc", "qdisc", "del", "dev", "lo", "root")


def _cached() -> int:
    """Bytes in the node's block cache: what lazy starts fetched of the layer blobs."""
    top = block_cache_dir() / "sha256"
    if not top.is_dir():
        return 0
    return sum(p.stat().st_size for p in top.glob("*/*") if not p.name.startswith("."))


def _empty_cache() -> None:
    shutil.rmtree(block_cache_dir(), ignore_errors=True)


def _cold() -> None:
    drop_caches()
    warm_caches(python=True)
    for argv in WARM:
        subprocess.run(argv, capture_output=True, check=False)


def _sh(*argv: str, env: dict[str, str] | None = None) -> str:
    """common.sh with an environment; a failure shows the program's stderr."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def _first_line(
    argv: list[str], begin: float, env: dict[str, str] | None = None
) -> tuple[float, str]:
    """Run `argv`; seconds from `begin` to its first line of output, and the line. It must end
    well."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    took = time.perf_counter() - begin
    rest, err = proc.communicate()
    if proc.returncode != 0 or not line.startswith("ready"):
        raise RuntimeError(f"{' '.join(argv[:6])}... exited {proc.returncode}: {line}{rest}{err}")
    return took, line.strip()


class _Ways:
    """The three ways to the job's first output, against one registry."""

    def __init__(
        self, work: Path, lazy_ref: str, oci_ref: str, env: dict[str, str] | None = None
    ) -> None:
        self.work, self.lazy_ref, self.oci_ref, self.env = work, lazy_ref, oci_ref, env
        self.private = work / "rsa.pem"
        self.job = [PYTHON, "-c", JOB]
        self.run = [*CLI, "run", "--keep", "-k", str(KEY)]

    def lazy(self) -> tuple[float, str]:
        return _first_line([*self.run, "--tls-verify=false", self.lazy_ref, *self.job],
                           time.perf_counter(), self.env)  # fmt: skip

    def pull_run(self) -> tuple[float, str]:
        pulled = self.work / "pulled"
        shutil.rmtree(pulled, ignore_errors=True)
        begin = time.perf_counter()
        sh(*CLI, "pull", "-q", "--tls-verify=false", self.lazy_ref, str(pulled))
        took = _first_line([*self.run, str(pulled), *self.job], begin)
        shutil.rmtree(pulled)
        return took

    def ocicrypt(self) -> tuple[float, str]:
        copied, root = self.work / "copied", self.work / "root"
        for d in (copied, root):
            shutil.rmtree(d, ignore_errors=True)
        begin = time.perf_counter()
        sh("skopeo", "copy", "-q", "--src-tls-verify=false", "--decryption-key",
           str(self.private), self.oci_ref, f"dir:{copied}")  # fmt: skip
        root.mkdir()
        manifest = json.loads((copied / "manifest.json").read_text())
        for layer in manifest["layers"]:
            sh("tar", "-C", str(root), "-xf", str(copied / layer["digest"].split(":")[1]))
        took = _first_line(["chroot", str(root), *self.job], begin)
        shutil.rmtree(copied)
        shutil.rmtree(root)
        return took

    def first_output(self) -> dict[str, Any]:
        """settings.runs of each way, interleaved; the lazy start's fetched bytes; a second lazy
        start's (cache kept)."""
        times: dict[str, list[float]] = {w: [] for w in WAYS}
        fetched, second, second_fetched, lines = [], [], [], set()
        for _ in range(settings.runs):
            for way in WAYS:
                _empty_cache()
                _cold()
                took, line = getattr(self, way)()
                _say(f"{way} {took:.1f} s")
                times[way].append(took)
                lines.add(line)
                if way == "lazy":
                    fetched.append(_cached())
                    _cold()  # the page cache dropped, the block cache kept
                    took, line = self.lazy()
                    second.append(took)
                    second_fetched.append(_cached() - fetched[-1])
        out: dict[str, Any] = {w: summary(t) for w, t in times.items()}
        out["lazy_second"] = summary(second)
        out["lazy_fetched_bytes"] = fetched
        out["lazy_second_fetched_bytes"] = second_fetched
        out["outputs"] = sorted(lines)
        lazy = out["lazy"]["median_s"]
        out["pull_run_over_lazy"] = out["pull_run"]["median_s"] / lazy
        out["ocicrypt_over_lazy"] = out["ocicrypt"]["median_s"] / lazy
        return out

    @contextlib.contextmanager
    def _started(self, ref: str, name: str) -> Iterator[Path]:
        rootfs = Path(_sh(*CLI, "start", "--keep", "--tls-verify=false", "--name", name, "-k",
                          str(KEY), ref, env=self.env).strip())  # fmt: skip
        try:
            yield rootfs
        finally:
            _sh(*CLI, "stop", name, env=self.env)

    def job_reads(self) -> dict[str, Any]:
        """One lazy start (cache empty), the job run in its root by chroot: the bytes the kernel
        read from the NBD devices (what the job's reads needed, the file system's and
        dm-verity's read-ahead included) and the bytes fetched into the cache; with the time of
        each step (`start` to a mounted root, the job to its end), and the same steps on a
        pulled copy (`pull`, `start`, the job), where a run's time goes."""
        _empty_cache()
        _cold()
        # Counted from here: a device's counters are kept across detach and attach, so nbd0
        # reused after an earlier section holds that section's reads too (figure 14's second
        # run, 64 then 512 MiB in one boot, counted 160 MiB "at start" so).
        base = _nbd_read_bytes()
        begin = time.perf_counter()
        with self._started(self.lazy_ref, "lazyjob") as rootfs:
            start_s = time.perf_counter() - begin
            before = _nbd_read_bytes() - base
            after_start = _cached()
            begin = time.perf_counter()
            sh("chroot", str(rootfs), *self.job)
            job_s = time.perf_counter() - begin
            read = _nbd_read_bytes() - base
            fetched = _cached()
        out: dict[str, Any] = {
            "device_read_bytes": read, "device_read_at_start_bytes": before,
            "fetched_at_start_bytes": after_start, "fetched_bytes": fetched,
            "lazy_start_s": start_s, "lazy_job_s": job_s,
        }  # fmt: skip
        pulled = self.work / "pulled"
        shutil.rmtree(pulled, ignore_errors=True)
        _cold()
        begin = time.perf_counter()
        sh(*CLI, "pull", "-q", "--tls-verify=false", self.lazy_ref, str(pulled))
        out["pull_s"] = time.perf_counter() - begin
        _cold()
        begin = time.perf_counter()
        with self._started(str(pulled), "lazyjob") as rootfs:
            out["pulled_start_s"] = time.perf_counter() - begin
            begin = time.perf_counter()
            sh("chroot", str(rootfs), *self.job)
            out["pulled_job_s"] = time.perf_counter() - begin
        shutil.rmtree(pulled)
        return out

    def sequential(self, files: list[tuple[Path, int]]) -> dict[str, Any]:
        """The filler's large files (up to SEQUENTIAL_MAX bytes) read in order, 1 MiB at a time,
        on the local registry: through the lazy device with the block cache empty, again with
        it full (page cache dropped), and from a pulled copy (`start` of it)."""
        chosen, total = [], 0
        for f, size in files:
            if total >= SEQUENTIAL_MAX:
                break
            chosen.append(f)
            total += size
        out: dict[str, Any] = {}
        pulled = self.work / "pulled"
        shutil.rmtree(pulled, ignore_errors=True)
        sh(*CLI, "pull", "-q", "--tls-verify=false", self.lazy_ref, str(pulled))
        _empty_cache()
        for what, ref in (("lazy_cold", self.lazy_ref), ("lazy_warm", self.lazy_ref),
                          ("pulled", str(pulled))):  # fmt: skip
            with self._started(ref, "lazyseq") as rootfs:
                drop_caches()
                begin = time.perf_counter()
                total = sum(_read_all(rootfs / f) for f in chosen)
                took = time.perf_counter() - begin
            out[what] = {"s": took, "mib_s": total / MiB / took}
        out["bytes"] = total
        out["cold_share"] = out["lazy_cold"]["mib_s"] / out["pulled"]["mib_s"]
        out["warm_share"] = out["lazy_warm"]["mib_s"] / out["pulled"]["mib_s"]
        shutil.rmtree(pulled)
        return out

    def sequential_cold(self, files: list[tuple[Path, int]], cap: int) -> dict[str, Any]:
        """The first files up to `cap` bytes read in order through the lazy device, block cache
        empty."""
        chosen, total = [], 0
        for f, size in files:
            if total >= cap:
                break
            chosen.append(f)
            total += size
        _empty_cache()
        with self._started(self.lazy_ref, "lazyseq") as rootfs:
            drop_caches()
            begin = time.perf_counter()
            total = sum(_read_all(rootfs / f) for f in chosen)
            took = time.perf_counter() - begin
        return {"s": took, "mib_s": total / MiB / took, "bytes": total}


CHUNKS = (256 << 10, 1 << 20, 4 << 20)
CHUNK_IMAGE_MIB = 128  # enough filler for a sequential read of 32 MiB
CHUNK_HOOK = """import os
if os.environ.get("CRYPTLAYER_BENCH_CHUNK"):
    import cryptlayer.distribution.blockcache as blockcache
    blockcache.CHUNK = int(os.environ["CRYPTLAYER_BENCH_CHUNK"])
"""


def chunk_sizes(size_mib: int) -> dict[str, Any]:
    """The block cache's chunk (blockcache.CHUNK) at 256 KiB, 1 MiB and 4 MiB, on the shaped link:
    time to the job's first output, the bytes fetched, and a sequential read (block cache empty,
    32 MiB) there and on the local registry. The CLI and its server are given the chunk size by
    a sitecustomize module on PYTHONPATH (a benchmark's hook; the product has no such knob)."""
    sys.path.insert(0, str(TESTS))
    from registryfixtures import registry

    work = WORK / "lazychunk"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree, image, hook = work / "tree", work / "img", work / "hook"
    out: dict[str, Any] = {"size_mib": size_mib, "content": real_tree(tree, size_mib * MiB)}
    out["build_s"] = build([tree], image)
    _say(f"chunks: build {out['build_s']:.1f} s")
    large = [(p.relative_to(tree), p.stat().st_size)
             for p in sorted(tree.glob("filler/**/large*.bin"))]  # fmt: skip
    shutil.rmtree(tree)
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CHUNK_HOOK)
    with registry(work / "registry") as reg:
        ref = f"docker://{reg.host}/bench/lazy:v1"
        sh(*CLI, "push", "--no-tls-verify", "-q", str(image), ref.removeprefix("docker://"))
        for chunk in CHUNKS:
            env = {**os.environ, "PYTHONPATH": str(hook), "CRYPTLAYER_BENCH_CHUNK": str(chunk)}
            ways = _Ways(work, ref, "", env)
            per: dict[str, Any] = {"sequential_local": ways.sequential_cold(large, 32 * MiB)}
            with _shaped(True):
                times, fetched = [], []
                for _ in range(settings.runs):
                    _empty_cache()
                    _cold()
                    times.append(ways.lazy()[0])
                    fetched.append(_cached())
                per["first_output"] = summary(times)
                per["fetched_bytes"] = fetched
                per["sequential_shaped"] = ways.sequential_cold(large, 32 * MiB)
            out[str(chunk)] = per
            _say(f"chunk {chunk}: {per}")
    _empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    return out


def _read_all(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            n += len(chunk)
    return n


def _nbd_read_bytes() -> int:
    """Bytes read from every NBD device, attached or not, since it was made (sectors of 512
    bytes, /sys/block/nbdN/stat: not reset at detach; take differences)."""
    total = 0
    for stat in Path("/sys/block").glob("nbd*/stat"):
        total += int(stat.read_text().split()[2]) * 512
    return total
