"""Figure 13: converting an ocicrypt image (issue 24's target: at least 80% of the throughput of
building from the same layers unencrypted, in the same run).

One plain OCI image of four gzip layers with realistic content (files of random bytes and
text-like files, which gzip -1 shrinks about 2:1; large and small files), then Debian's skopeo
encrypts it (`skopeo copy --encryption-key jwe:PUB.pem`, an RSA key) as a user would. Then,
alternating, settings.runs builds of each: `cryptlayer build oci:PLAIN` and `cryptlayer build
--decryption-key PRIVATE.pem oci:ENCRYPTED`, in-process (build_image, as the CLI calls it), caches
dropped before each. Throughput is the layers' content (the files' bytes) per second, as figure 3
counts it. Then the encrypted build's extra work on its own, in the same boot: every blob read
once through the decrypting stream (AES-256-CTR, HMAC-SHA256, the blob digest) against read and
hashed as the plain path checks it, warm caches (a build decrypts each blob twice: measure and
populate); under emulation AES and SHA-256 are software, so that is what the VM's ratio is
mostly made of (bench/host.py's ocicrypt_stream gives the real CPU's).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from common import MiB, drop_caches, sh, summary

from cryptlayer.build import oci, ocicrypt
from cryptlayer.build.builder import build_image
from cryptlayer.image import envelope
from cryptlayer.keys.sources import Secret
from sections.base import KEY, WORK, image_bytes, settings

LAYERS = 4
POOL = 8 * MiB
# text-like content: words of this file's vocabulary and numbers, as in scripts and config
WORDS = [f"w{n}" for n in range(200)] + [str(n) for n in range(1000)] + ["\n", "=", "(", ")"]


def convert_throughput(total_mib: int) -> dict[str, Any]:
    """The figure: medians of settings.runs builds each way, MiB/s of each and their ratio; the
    stream's own cost beside it."""
    work = WORK / "ocicrypt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    content = plain_image(work / "plain", work / "trees", total_mib * MiB)
    private = work / "rsa.pem"
    sh("openssl", "genrsa", "-out", str(private), "2048")
    private.chmod(0o600)
    sh("openssl", "rsa", "-in", str(private), "-pubout", "-out", str(work / "rsa.pub"))
    began = time.perf_counter()
    sh("skopeo", "copy", "-q", "--encryption-key", f"jwe:{work / 'rsa.pub'}",
       f"oci:{work / 'plain'}:latest", f"oci:{work / 'enc'}:latest")  # fmt: skip
    encrypt_s = time.perf_counter() - began
    keys = ocicrypt.load_keys([str(private)])
    out_dir = work / "images"
    out_dir.mkdir()
    plain_s: list[float] = []
    enc_s: list[float] = []
    sizes: dict[str, int] = {}
    for run in range(settings.runs):
        for name, source, decryption, times in (
            ("plain", f"oci:{work / 'plain'}:latest", (), plain_s),
            ("encrypted", f"oci:{work / 'enc'}:latest", keys, enc_s),
        ):
            image = out_dir / f"{name}{run}"
            times.append(_build(source, image, decryption))
            sizes[name] = image_bytes(image)
            shutil.rmtree(image)
    mib = content["bytes"] / MiB
    plain, enc = summary(plain_s), summary(enc_s)
    plain["mib_s"], enc["mib_s"] = mib / plain["median_s"], mib / enc["median_s"]
    out: dict[str, Any] = {
        "content": content,
        "layers": LAYERS,
        "blob_bytes": _blob_bytes(work / "plain"),
        "skopeo_encrypt_s": encrypt_s,
        "skopeo_version": sh("skopeo", "--version").strip(),
        "plain_build": plain,
        "encrypted_build": enc,
        "ratio": enc["mib_s"] / plain["mib_s"],
        "target": 0.8,
        "image_bytes": sizes,
        "stream": stream_cost(work / "plain", work / "enc", keys),
    }
    shutil.rmtree(work, ignore_errors=True)
    return out


def _build(source: str, out: Path, decryption: tuple[ocicrypt.DecryptionKey, ...]) -> float:
    principals = envelope.Principals(keys=[Secret(bytearray(KEY.read_bytes()))])
    drop_caches()  # the source is read from the disk, as a build's would be
    start = time.perf_counter()
    with principals:
        build_image([source], out, principals, decryption=decryption)
    return time.perf_counter() - start


def plain_image(layout: Path, trees: Path, total: int) -> dict[str, int]:
    """An OCI layout of LAYERS gzip layers, `total` bytes of file content in all: per layer, 70%
    in large files (1-8 MiB), 30% in small ones (1-32 KiB); each file, at random, either random
    bytes or text-like (words and numbers drawn at random, which gzip -1 shrinks about 2:1)."""
    rng = random.Random(13)
    # Pools the files are cut from at random offsets: making every byte anew took minutes under
    # emulation. gzip sees no repeat (its window is 32 KiB), so each file compresses as new.
    noise = rng.randbytes(POOL)
    text = " ".join(rng.choices(WORDS, k=POOL // 4)).encode()[:POOL]
    written = files = 0
    diff_ids, descs = [], []
    (layout / "blobs/sha256").mkdir(parents=True)
    per_layer = total // LAYERS
    for n in range(LAYERS):
        root = trees / f"layer{n}"
        large_budget, budget = written + per_layer * 7 // 10, written + per_layer
        i = 0
        while written < budget:
            large = written < large_budget
            size = min(rng.randint(1 * MiB, 8 * MiB) if large else rng.randint(1024, 32 * 1024),
                       (large_budget if large else budget) - written)  # fmt: skip
            sub = root / f"usr/lib/d{i % 16:02}"
            sub.mkdir(parents=True, exist_ok=True)
            kind, pool = ("bin", noise) if rng.random() < 0.5 else ("txt", text)
            start = rng.randrange(POOL - size + 1)
            (sub / f"f{i:05}.{kind}").write_bytes(pool[start : start + size])
            written, files, i = written + size, files + 1, i + 1
        tar = trees / f"layer{n}.tar"
        sh("tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-C", str(root),
           "-cf", str(tar), ".")  # fmt: skip
        diff_ids.append(_sha256_file(tar))
        gz = trees / f"layer{n}.tar.gz"
        with open(gz, "wb") as f:
            # -1, not Go's default 6: a third of the time under emulation, and a larger blob
            # (more to decrypt) costs the encrypted side, not the plain one
            subprocess.run(["gzip", "-1", "-n", "-c", str(tar)], stdout=f, check=True)
        descs.append(_put(layout, gz.read_bytes(), "application/vnd.oci.image.layer.v1.tar+gzip"))
        shutil.rmtree(root)
        tar.unlink()
        gz.unlink()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _put(
            layout, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
        ),
        "layers": descs,
    }
    desc = _put(layout, json.dumps(manifest).encode(), manifest["mediaType"])
    desc["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return {"bytes": written, "files": files}


def _put(layout: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _blob_bytes(layout: Path) -> int:
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    doc = json.loads((layout / "blobs/sha256" / manifest.split(":")[1]).read_bytes())
    return sum(int(layer["size"]) for layer in doc["layers"])


def stream_cost(plain: Path, enc: Path, keys: tuple[ocicrypt.DecryptionKey, ...]) -> dict[str, Any]:
    """Every layer's blob read to its end, warm caches, settings.runs times each way: as the
    plain path checks it (sha256 of the blob) and through the decrypting stream (AES-CTR, HMAC
    and the digest, oci.verify_blob); also the plain path's other passes, decompressing (gzip)
    and hashing the tar, which both paths share."""
    with oci.open_image(f"oci:{plain}:latest") as p, oci.open_image(f"oci:{enc}:latest", keys) as e:
        plain_layers, enc_layers = p.layers, e.layers
        total = sum(layer.size or 0 for layer in enc_layers)
        for layer in (*plain_layers, *enc_layers):  # into the page cache
            oci.verify_blob(layer)
        times: dict[str, list[float]] = {"plain_check": [], "decrypting_check": [],
                                         "decompress_hash": []}  # fmt: skip
        for _ in range(settings.runs):
            for name, fn in (
                ("plain_check", lambda: [oci.verify_blob(x) for x in plain_layers]),
                ("decrypting_check", lambda: [oci.verify_blob(x) for x in enc_layers]),
                ("decompress_hash", lambda: [_decompress_hash(x) for x in plain_layers]),
            ):
                begin = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - begin)
    out: dict[str, Any] = {"blob_bytes": total}
    for name, t in times.items():
        out[name] = summary(t)
        out[name]["mib_s"] = total / MiB / out[name]["median_s"]
    return out


def _decompress_hash(layer: oci.OciLayer) -> None:
    h = hashlib.sha256()
    with layer.open() as raw, gzip.open(raw) as tar:
        while chunk := tar.read(MiB):
            h.update(chunk)
