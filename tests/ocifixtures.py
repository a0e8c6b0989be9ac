"""Write OCI image layouts, OCI archives and docker archives from Python, for the tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Entry:
    """One member of a layer tar."""

    kind: str  # file, dir, symlink, hardlink, whiteout, opaque, fifo, char
    name: str
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    device: tuple[int, int] = (0, 0)


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed layer tar (PAX, so xattrs survive)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            name = e.name
            if e.kind == "whiteout":
                parent, _, base = name.rpartition("/")
                name = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
            elif e.kind == "opaque":
                name = f"{name}/.wh..wh..opq"
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, 1_700_000_000
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE, "whiteout": tarfile.REGTYPE,
                         "opaque": tarfile.REGTYPE, "fifo": tarfile.FIFOTYPE,
                         "char": tarfile.CHRTYPE}[e.kind]  # fmt: skip
            info.linkname = e.target
            info.devmajor, info.devminor = e.device
            if e.xattrs:
                info.pax_headers = {
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in e.xattrs.items()
                }
            data = e.data if e.kind == "file" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return subprocess.run(
            ["zstd", "-q", "-c"], input=data, capture_output=True, check=True
        ).stdout
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MEDIA = {"none": "application/vnd.oci.image.layer.v1.tar",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}  # fmt: skip


def image_files(
    layers: list[tuple[bytes, str]], config: dict[str, Any], tag: str = "latest"
) -> dict[str, bytes]:
    """The files of an OCI layout: layers as (uncompressed tar, compression)."""
    files: dict[str, bytes] = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode()}
    descs, diff_ids = [], []
    for tar, how in layers:
        blob = compress(tar, how)
        files[f"blobs/sha256/{sha(blob)[7:]}"] = blob
        descs.append({"mediaType": MEDIA[how], "digest": sha(blob), "size": len(blob)})
        diff_ids.append(sha(tar))
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()  # fmt: skip
    files[f"blobs/sha256/{sha(cfg)[7:]}"] = cfg
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
        "layers": descs,
    }).encode()  # fmt: skip
    files[f"blobs/sha256/{sha(manifest)[7:]}"] = manifest
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]}).encode()  # fmt: skip
    return files


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def docker_archive_files(layers: list[bytes], config: dict[str, Any]) -> dict[str, bytes]:
    """What `docker save` writes: <id>/layer.tar, <config digest>.json, manifest.json."""
    files: dict[str, bytes] = {}
    paths = []
    for i, tar in enumerate(layers):
        paths.append(f"layer{i}/layer.tar")
        files[paths[-1]] = tar
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                      "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]}}).encode()  # fmt: skip
    files[f"{sha(cfg)[7:]}.json"] = cfg
    files["manifest.json"] = json.dumps(
        [{"Config": f"{sha(cfg)[7:]}.json", "RepoTags": ["test:latest"], "Layers": paths}]
    ).encode()
    return files


# A test image used by both tiers: TOP deletes a file and makes a directory opaque, and brings
# setuid, a file capability, links, a fifo, a device node and a non-root owner.
CONFIG = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ['echo "$GREETING"; pwd; id -u'],
          "Env": ["GREETING=from-config"], "WorkingDir": "/srv", "User": "app",
          "ExposedPorts": {"8080/tcp": {}}, "Labels": {"org.example": "yes"}}  # fmt: skip
CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service=ep
MIDDLE = layer_tar([
    Entry("dir", "srv", mode=0o755), Entry("file", "etc/keep", b"keep\n"),
    Entry("file", "etc/gone", b"gone\n"), Entry("dir", "opt", mode=0o755),
    Entry("file", "opt/old", b"old\n"),
])  # fmt: skip
TOP = layer_tar([
    Entry("whiteout", "etc/gone"), Entry("dir", "opt", mode=0o755), Entry("opaque", "opt"),
    Entry("file", "opt/new", b"new\n"),
    Entry("file", "usr/bin/ping", b"\x7fELF", mode=0o4755, xattrs={"security.capability": CAP}),
    Entry("hardlink", "usr/bin/ping2", target="usr/bin/ping", mode=0o4755),
    Entry("symlink", "usr/bin/p", target="ping"), Entry("fifo", "run/fifo", mode=0o600),
    Entry("file", "home/app/owned", b"mine", uid=1000, gid=1000),
])  # fmt: skip
