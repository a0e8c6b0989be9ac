"""OCI layouts, OCI archives and docker archives built into encrypted images and run with crun."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import Cli
from ocifixtures import (
    CAP,
    CONFIG,
    MIDDLE,
    TOP,
    Entry,
    docker_archive_files,
    image_files,
    layer_tar,
    write_dir,
    write_tar,
)

from cryptlayer.errors import ExitCode

# What a container sees of MIDDLE + TOP, as podman shows it.
EXPECTED = {"srv", "etc/keep", "opt", "opt/new", "usr", "usr/bin", "usr/bin/ping", "usr/bin/ping2",
            "usr/bin/p", "run", "run/fifo", "home/app/owned"}  # fmt: skip


@pytest.fixture(scope="module")
def base_tar(busybox_tree: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(busybox_tree.iterdir()):
            tar.add(child, arcname=child.name)
    return buf.getvalue()


def tree(root: Path, base: set[str]) -> set[str]:
    """Every path under root, relative, minus those of the base layer."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(str(Path(dirpath, name).relative_to(root)))
    return found - base


def base_paths(busybox_tree: Path) -> set[str]:
    return tree(busybox_tree, set())


def check_tree(rootfs: Path, busybox_tree: Path) -> None:
    assert tree(rootfs, base_paths(busybox_tree)) == EXPECTED
    ping = rootfs / "usr/bin/ping"
    assert ping.stat().st_mode & 0o7777 == 0o4755
    assert os.getxattr(ping, "security.capability") == CAP
    assert (rootfs / "usr/bin/ping2").stat().st_ino == ping.stat().st_ino
    assert os.readlink(rootfs / "usr/bin/p") == "ping"
    assert stat.S_ISFIFO(os.lstat(rootfs / "run/fifo").st_mode)
    assert (rootfs / "etc/keep").read_text() == "keep\n"
    owned = os.lstat(rootfs / "home/app/owned")
    assert (owned.st_uid, owned.st_gid, owned.st_mtime) == (1000, 1000, 1_700_000_000)


def test_three_layer_oci_layout(cli: Cli, images: Path, key_file: Path, tmp_path: Path,
                                base_tar: bytes, busybox_tree: Path) -> None:  # fmt: skip
    layout = write_dir(tmp_path / "layout", image_files(
        [(base_tar, "gzip"), (MIDDLE, "none"), (TOP, "gzip")], CONFIG, tag="v1"))  # fmt: skip
    image = images / "oci"
    cli.ok("build", "--key-file", str(key_file), "--output", str(image), f"oci:{layout}:v1")
    info = json.loads(cli.ok("inspect", "--json", str(image)))
    assert len(info["layers"]) == 3
    assert info["config"]["exposed_ports"] == ["8080/tcp"]
    assert info["config"]["labels"] == [["org.example", "yes"]]

    rootfs = Path(
        cli.ok("start", "--keep", "--key-file", str(key_file), "--name", "oci", str(image)).strip()
    )
    try:
        check_tree(rootfs, busybox_tree)
    finally:
        cli.ok("stop", "oci")
    out = cli.ok("run", "--key-file", str(key_file), str(image))  # the image's own command
    assert out == "from-config\n/srv\n1000\n"


def test_inspect_shows_diff_ids(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path, base_tar: bytes
) -> None:
    files = image_files([(base_tar, "none"), (MIDDLE, "gzip")], CONFIG)
    config = next(json.loads(d) for d in files.values() if b'"diff_ids"' in d)
    image = images / "ins"
    cli.ok(
        "build",
        "--key-file",
        str(key_file),
        "--output",
        str(image),
        f"oci:{write_dir(tmp_path / 'l', files)}",
    )
    info = json.loads(cli.ok("inspect", "--json", str(image)))
    assert [layer["digest"] for layer in info["layers"]] == config["rootfs"]["diff_ids"]
    assert info["config"]["cmd"] == CONFIG["Cmd"]
    assert info["config"]["user"] == "app"


def test_squash(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path, base_tar: bytes, busybox_tree: Path
) -> None:
    layout = write_dir(tmp_path / "layout", image_files(
        [(base_tar, "none"), (MIDDLE, "zstd"), (TOP, "gzip")], CONFIG))  # fmt: skip
    image = images / "squashed"
    cli.ok(
        "build", "--squash", "--key-file", str(key_file), "--output", str(image), f"oci:{layout}"
    )
    assert len(json.loads(cli.ok("inspect", "--json", str(image)))["layers"]) == 1
    rootfs = Path(cli.ok("start", "--key-file", str(key_file), "--name", "sq", str(image)).strip())
    try:
        check_tree(rootfs, busybox_tree)
        assert not (rootfs / "etc/gone").exists()
    finally:
        cli.ok("stop", "sq")


def test_archives_and_zstd(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path, base_tar: bytes
) -> None:
    oci_archive = write_tar(
        tmp_path / "o.tar", image_files([(base_tar, "zstd"), (MIDDLE, "zstd")], CONFIG)
    )
    docker = write_tar(tmp_path / "d.tar", docker_archive_files([base_tar, MIDDLE], CONFIG))
    for name, ref in (("oa", f"oci-archive:{oci_archive}"), ("da", f"docker-archive:{docker}")):
        cli.ok("build", "--key-file", str(key_file), "--output", str(images / name), ref)
        out = cli.ok(
            "run", "--key-file", str(key_file), "-u", "0", str(images / name), "--", "cat /etc/keep"
        )
        assert out == "keep\n"  # Entrypoint sh -c kept; the command replaced Cmd, as podman does


def test_corrupted_blob_leaves_nothing(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path
) -> None:
    files = image_files([(MIDDLE, "gzip")], CONFIG)
    blob = next(n for n, d in files.items() if d.startswith(b"\x1f\x8b"))
    files[blob] = files[blob][:-4] + b"!!!!"
    layout = write_dir(tmp_path / "bad", files)
    code, _, err = cli(
        "build", "--key-file", str(key_file), "--output", str(images / "x"), f"oci:{layout}"
    )
    assert code == ExitCode.USAGE
    assert err.startswith(f"error: {layout}/{blob} does not match its digest sha256:")
    assert err.endswith("the image is corrupted; fetch it again\n")
    assert list(images.iterdir()) == []


# What debootstrap puts in /dev (and so every OCI layer made from its tree: umoci, `podman
# import`, `docker export`), with the kernel's own numbers.
DEV_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
             "tty": (5, 0), "console": (5, 1), "ptmx": (5, 2)}  # fmt: skip
PROBE_DEV = "echo gone > /dev/null && head -c 3 /dev/zero | wc -c && echo ran"


@pytest.fixture(scope="module")
def debootstrap_tree(busybox_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox tree with debootstrap's /dev: its eight nodes, pts/ and shm/."""
    root = tmp_path_factory.mktemp("deboot") / "rootfs"
    shutil.copytree(busybox_tree, root, symlinks=True)
    (root / "dev/pts").mkdir()
    (root / "dev/shm").mkdir()
    for name, (major, minor) in DEV_NODES.items():
        os.mknod(root / "dev" / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
    return root


def umoci_layout(tree: Path, layout: Path) -> Path:
    """An OCI layout of `tree` as umoci makes one: its layer holds /dev's nodes."""
    bundle = layout.parent / "bundle"
    for argv in (["init", "--layout", str(layout)], ["new", "--image", f"{layout}:deb"],
                 ["unpack", "--image", f"{layout}:deb", str(bundle)]):  # fmt: skip
        subprocess.run(["umoci", *argv], check=True, capture_output=True)
    subprocess.run(["cp", "-a", "--", f"{tree}/.", f"{bundle}/rootfs/"], check=True)
    subprocess.run(["umoci", "repack", "--image", f"{layout}:deb", str(bundle)], check=True,
                   capture_output=True)  # fmt: skip
    return layout


def test_debootstrap_dev_nodes_build_and_run(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path, debootstrap_tree: Path
) -> None:
    """Issue 21 A1: the nodes under /dev are left out with one line; the image runs."""
    layout = umoci_layout(debootstrap_tree, tmp_path / "layout")
    (blob,) = [p for p in (layout / "blobs/sha256").iterdir() if tarfile.is_tarfile(p)]
    with tarfile.open(blob) as layer:
        assert {m.name.removeprefix("./") for m in layer if m.ischr()} == {
            f"dev/{name}" for name in DEV_NODES
        }  # the layer carries them, as umoci's of a real debootstrap tree does
    for name, source, shown in (("dir", str(debootstrap_tree), debootstrap_tree),
                                ("umoci", f"oci:{layout}:deb", blob)):  # fmt: skip
        image = images / name
        code, _, err = cli("build", "-k", str(key_file), "-o", str(image), source)
        assert code == 0, err
        assert err == (f"left out 8 device nodes under /dev of {shown} (the container gets /dev"
                       " from the runtime)\n")  # fmt: skip
        out = cli.ok("run", "--keep", "-k", str(key_file), str(image), "--", "sh", "-c", PROBE_DEV)
        assert out == "3\nran\n"
    rootfs = Path(cli.ok("start", "--keep", "-k", str(key_file), "--name", "deb",
                         str(images / "umoci")).strip())  # fmt: skip
    try:
        assert sorted(p.name for p in (rootfs / "dev").iterdir()) == ["pts", "shm"]
    finally:
        cli.ok("stop", "deb")


def test_device_node_elsewhere_is_refused_unless_dropped(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path, debootstrap_tree: Path
) -> None:
    tree = tmp_path / "tree"
    subprocess.run(["cp", "-a", "--", str(debootstrap_tree), str(tree)], check=True)  # (copytree
    # would read each device node as a file: /dev/console blocks for ever)
    os.mknod(tree / "etc/evil", stat.S_IFCHR | 0o666, os.makedev(1, 1))  # /dev/mem
    code, _, err = cli("build", "-k", str(key_file), "-o", str(images / "evil"), str(tree))
    assert code == ExitCode.USAGE
    assert err == (f"error: {tree}/etc/evil is a character device node (1:1): an image may carry"
                   " device nodes only in /dev, which build leaves out (the container gets /dev"
                   " from the runtime); remove it, or pass --drop-devices to leave it out\n")  # fmt: skip
    assert list(images.iterdir()) == []
    code, _, err = cli("build", "--drop-devices", "-k", str(key_file), "-o",
                       str(images / "evil"), str(tree))  # fmt: skip
    assert code == 0, err
    assert err.splitlines() == [
        f"left out 8 device nodes under /dev of {tree} (the container gets /dev from the runtime)",
        f"left out {tree}/etc/evil (character device 1:1): --drop-devices",
    ]
    out = cli.ok("run", "-k", str(key_file), str(images / "evil"), "--", "sh", "-c",
                 "test -e /etc/evil || echo absent")  # fmt: skip
    assert out == "absent\n"


def _flip_encrypted_layer(layout: Path) -> None:
    """One byte of the last layer's ciphertext changed, and the manifest and index made to name
    the changed blob (an OCI layout carries no signature): only ocicrypt's HMAC can tell."""
    import hashlib

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs/sha256" / digest).write_bytes(data)
        return f"sha256:{digest}"

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(
        (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text()
    )
    desc = manifest["layers"][-1]
    blob = bytearray((layout / "blobs/sha256" / desc["digest"][7:]).read_bytes())
    blob[len(blob) // 2] ^= 1
    desc["digest"] = put(bytes(blob))
    data = json.dumps(manifest).encode()
    index["manifests"][0].update(digest=put(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def test_ocicrypt_image_from_skopeo(
    cli: Cli, images: Path, key_file: Path, tmp_path: Path, base_tar: bytes
) -> None:
    """An image Debian's skopeo encrypted (ocicrypt, jwe:) built with --decryption-key and run
    with the config it came with; a wrong key and a changed ciphertext refused, nothing left."""
    marker = b"ocicrypt-plaintext-marker-5c1f\n"
    secret = layer_tar([Entry("file", "etc/secret", marker)])
    plain = write_dir(tmp_path / "plain", image_files(
        [(base_tar, "gzip"), (MIDDLE, "gzip"), (TOP, "none"), (secret, "gzip")], CONFIG))  # fmt: skip
    for name in ("priv", "other"):
        subprocess.run(["openssl", "genrsa", "-out", str(tmp_path / f"{name}.pem"), "2048"],
                       check=True, capture_output=True)  # fmt: skip
        (tmp_path / f"{name}.pem").chmod(0o600)
    subprocess.run(["openssl", "rsa", "-in", str(tmp_path / "priv.pem"), "-pubout",
                    "-out", str(tmp_path / "pub.pem")], check=True, capture_output=True)  # fmt: skip
    enc = tmp_path / "enc"
    subprocess.run(["skopeo", "copy", "-q", "--encryption-key", f"jwe:{tmp_path / 'pub.pem'}",
                    f"oci:{plain}:latest", f"oci:{enc}:latest"], check=True)  # fmt: skip

    code, _, err = cli("build", "-k", str(key_file), "--decryption-key", str(tmp_path / "other.pem"),
                       "-o", str(images / "wrong"), f"oci:{enc}")  # fmt: skip
    assert code == ExitCode.KEY
    assert "no --decryption-key unwraps its layer key" in err
    assert list(images.iterdir()) == []

    image = images / "dec"
    cli.ok("build", "-k", str(key_file), "--decryption-key", str(tmp_path / "priv.pem"),
           "-o", str(image), f"oci:{enc}")  # fmt: skip
    for path in image.rglob("*"):  # what build wrote holds no plaintext of the layers
        assert not path.is_file() or marker not in path.read_bytes(), path
    out = cli.ok("run", "--keep", "-k", str(key_file), "-u", "0", str(image), "--",
                 "cat /etc/keep /etc/secret")  # fmt: skip
    assert out.encode() == b"keep\n" + marker
    assert cli.ok("run", "-k", str(key_file), str(image)) == "from-config\n/srv\n1000\n"

    tampered = Path(shutil.copytree(enc, tmp_path / "tampered"))
    _flip_encrypted_layer(tampered)
    code, _, err = cli("build", "-k", str(key_file), "--decryption-key", str(tmp_path / "priv.pem"),
                       "-o", str(images / "bad"), f"oci:{tampered}")  # fmt: skip
    assert code == ExitCode.TAMPERED, err
    assert "its HMAC does not match" in err and err.count("\n") == 1
    assert sorted(p.name for p in images.iterdir()) == ["dec"]


def _rewrap_for_provider(layout: Path, private: Path, provider: Path, kek: Path) -> None:
    """Make skopeo's JWE image the one an ocicrypt with key providers writes for provider `kms`:
    each layer's private options unwrapped from its JWE, wrapped again through the test provider
    (ocicrypt's keywrap request) under org.opencontainers.image.enc.keys.provider.kms, the JWE
    annotation dropped; the ciphertext unchanged."""
    import base64
    import hashlib
    import sys

    from jwcrypto import jwe, jwk  # type: ignore[import-untyped]

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs/sha256" / digest).write_bytes(data)
        return f"sha256:{digest}"

    b64 = base64.b64encode
    key = jwk.JWK.from_pem(private.read_bytes())
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(
        (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text()
    )
    for desc in manifest["layers"]:
        annotations = desc["annotations"]
        message = jwe.JWE()
        message.deserialize(
            base64.b64decode(annotations.pop("org.opencontainers.image.enc.keys.jwe")).decode()
        )
        message.decrypt(key)
        request = {
            "op": "keywrap",
            "keywrapparams": {"ec": {"Parameters": {"kms": [b64(b"Enabled").decode()]},
                                     "DecryptConfig": {"Parameters": None}},
                              "optsdata": b64(message.payload).decode()},
            "keyunwrapparams": {"dc": None, "annotation": None},
        }  # fmt: skip
        answer = subprocess.run(
            [sys.executable, str(provider), "cmd", "--name", "kms", "--kek", str(kek)],
            input=json.dumps(request).encode(), capture_output=True, check=True,
        ).stdout  # fmt: skip
        wrapped = base64.b64decode(json.loads(answer)["keywrapresults"]["annotation"])
        annotations["org.opencontainers.image.enc.keys.provider.kms"] = b64(wrapped).decode()
    data = json.dumps(manifest).encode()
    index["manifests"][0].update(digest=put(data), size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def test_ocicrypt_image_from_a_key_provider(
    cli: Cli,
    images: Path,
    key_file: Path,
    tmp_path: Path,
    base_tar: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ocicrypt image whose layer keys a key provider wrapped (made from skopeo's JWE image,
    the ciphertext unchanged) built with --decryption-key provider:kms and run; a provider that
    refuses is named in one error, nothing left."""
    import sys

    provider = Path(__file__).resolve().parents[1] / "providers" / "provider.py"
    kek = tmp_path / "kek"
    kek.write_bytes(os.urandom(32))
    marker = b"ocicrypt-provider-marker-7a2e\n"
    secret = layer_tar([Entry("file", "etc/secret", marker)])
    plain = write_dir(tmp_path / "plain", image_files(
        [(base_tar, "gzip"), (MIDDLE, "gzip"), (TOP, "none"), (secret, "gzip")], CONFIG))  # fmt: skip
    subprocess.run(["openssl", "genrsa", "-out", str(tmp_path / "priv.pem"), "2048"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["openssl", "rsa", "-in", str(tmp_path / "priv.pem"), "-pubout",
                    "-out", str(tmp_path / "pub.pem")], check=True, capture_output=True)  # fmt: skip
    enc = tmp_path / "enc"
    subprocess.run(["skopeo", "copy", "-q", "--encryption-key", f"jwe:{tmp_path / 'pub.pem'}",
                    f"oci:{plain}:latest", f"oci:{enc}:latest"], check=True)  # fmt: skip
    _rewrap_for_provider(enc, tmp_path / "priv.pem", provider, kek)

    def configure(mode: str) -> None:
        args = [str(provider), "cmd", "--name", "kms", "--kek", str(kek), "--mode", mode]
        config = tmp_path / f"keyprovider-{mode}.conf"
        config.write_text(json.dumps(
            {"key-providers": {"kms": {"cmd": {"path": sys.executable, "args": args}}}}))  # fmt: skip
        config.chmod(0o600)
        monkeypatch.setenv("OCICRYPT_KEYPROVIDER_CONFIG", str(config))

    configure("fail")
    code, _, err = cli("build", "-k", str(key_file), "--decryption-key", "provider:kms",
                       "-o", str(images / "refused"), f"oci:{enc}")  # fmt: skip
    assert code == ExitCode.FAILURE, err
    assert "key provider kms" in err and "the KBS refused" in err and err.count("\n") == 1
    assert list(images.iterdir()) == []

    configure("normal")
    image = images / "byprovider"
    cli.ok("build", "-k", str(key_file), "--decryption-key", "provider:kms",
           "-o", str(image), f"oci:{enc}")  # fmt: skip
    for path in image.rglob("*"):  # what build wrote holds no plaintext of the layers
        assert not path.is_file() or marker not in path.read_bytes(), path
    out = cli.ok("run", "--keep", "-k", str(key_file), "-u", "0", str(image), "--",
                 "cat /etc/keep /etc/secret")  # fmt: skip
    assert out.encode() == b"keep\n" + marker
    assert cli.ok("run", "-k", str(key_file), str(image)) == "from-config\n/srv\n1000\n"
