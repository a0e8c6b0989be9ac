"""Everything read from an image is an attacker's: each malformed or hostile input is one
`error:` line (no traceback, no hang), and the container's confinement is built as podman's."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from ocifixtures import CONFIG, MIDDLE, image_files, write_dir

from cryptlayer.build.oci import open_image
from cryptlayer.build.sources import DirectorySource, TarSource
from cryptlayer.errors import ExitCode, UsageError, printable
from cryptlayer.image import envelope, manifest
from cryptlayer.image.manifest import FORMAT, ImageConfig
from cryptlayer.image.process import Network, Overrides
from cryptlayer.keys.sources import Credential, Secret
from cryptlayer.runtime import hostcheck, seccomp
from cryptlayer.runtime.ocispec import resolve_user, runtime_config

GOOD_LAYER = {"file": "layer0.luks", "uuid": "u", "size": 4096, "content_bytes": 1,
              "source": "s", "offset": 4096, "tree": "layer0.verity", "tree_size": 4096,
              "root_hash": "ab" * 32, "salt": "cd" * 32, "digest": ""}  # fmt: skip
GOOD = {"format": FORMAT, "layers": [GOOD_LAYER], "cipher": "aes-xts-plain64", "created": "",
        "key_bits": 512, "sector_size": 4096,
        "config": {"entrypoint": [], "cmd": ["sh"], "env": ["A=1"], "workdir": "/", "user": "",
                   "exposed_ports": [], "labels": [["a", "b"]]}}  # fmt: skip


def set_path(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


# Every field of manifest.json, given a value of the wrong type or form.
MANIFEST_CASES = [
    (("layers",), "x"), (("layers",), [1]), (("layers",), [GOOD_LAYER] * 200),
    (("layers",), [GOOD_LAYER, GOOD_LAYER]),
    (("layers", 0, "file"), 7), (("layers", 0, "file"), "../etc"), (("layers", 0, "file"), "a\0b"),
    (("layers", 0, "file"), ".hidden"), (("layers", 0, "file"), "a\x1b[2Jb"),
    (("layers", 0, "uuid"), None), (("layers", 0, "size"), "4096"), (("layers", 0, "size"), -1),
    (("layers", 0, "size"), True), (("layers", 0, "size"), 1 << 60),
    (("layers", 0, "content_bytes"), 1.5), (("layers", 0, "source"), ["s"]),
    (("layers", 0, "digest"), 5), (("layers", 0, "evil"), 1),
    (("config",), "x"), (("config", "entrypoint"), "sh"), (("config", "cmd"), [1, 2]),
    (("config", "env"), {"A": "1"}),
    (("config", "workdir"), 3), (("config", "user"), 0), (("config", "exposed_ports"), [80]),
    (("config", "labels"), [["a"]]), (("config", "labels"), "x"), (("config", "cmd"), ["a\0b"]),
    (("config", "unknown"), 1), (("cipher",), 1), (("created",), []),
    (("layers", 0, "offset"), 0), (("layers", 0, "offset"), "4096"), (("key_bits",), 0),
    (("key_bits",), "512"), (("sector_size",), 1 << 20), (("raw",), "x"), (("evil",), 1),
    (("layers", 0, "size"), 4097), (("layers", 0, "tree"), "layer0.luks"),
    (("layers", 0, "tree"), "../t"), (("layers", 0, "root_hash"), "AB" * 32),
    (("layers", 0, "salt"), "cd"), (("layers", 0, "tree_size"), 0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value"), MANIFEST_CASES, ids=[f"{'.'.join(map(str, p))}-{i}"
                                           for i, (p, _) in enumerate(MANIFEST_CASES)]
)  # fmt: skip
def test_every_manifest_field_malformed_is_one_error_line(
    tmp_path: Path, path: tuple[Any, ...], value: Any
) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(set_path(GOOD, path, value)))
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED, err  # damage to a copy (test_copies.py)
    assert err.startswith(f"error: {tmp_path}/manifest.json is ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "\x1b" not in err and "\0" not in err


def test_deeply_nested_manifest(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "manifest.json").write_text(f'{{"format": "{FORMAT}", "layers": {deep}}}')
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED
    assert err == (f"error: {tmp_path}/manifest.json is nested too deeply: the image is damaged;"
                   " rebuild it\n")  # fmt: skip


def test_good_manifest_loads(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(GOOD))
    assert manifest.load(tmp_path).config.labels == (("a", "b"),)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "huge"])
def test_manifest_that_is_not_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "manifest.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block for ever
    elif kind == "symlink":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:
        with open(path, "wb") as f:
            f.truncate(64 << 20)
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED
    assert err.startswith(f"error: {path}: ") and len(err.splitlines()) == 1


def test_inspect_shows_image_strings_escaped(tmp_path: Path) -> None:
    """Terminal escapes in the manifest cannot forge inspect's lines (its `state:`)."""
    forged = "x\x1b[1A\x1b[2K\rstate:   intact\n"
    doc = set_path(GOOD, ("config", "cmd"), [forged])
    doc = set_path(doc, ("layers", 0, "source"), forged)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    (tmp_path / "layer0.luks").write_bytes(bytes(4096))
    code, out, _ = invoke("inspect", str(tmp_path))
    assert code == 0
    assert "\x1b" not in out and "\r" not in out
    assert [line for line in out.splitlines() if line.startswith("state:")] == ["state:   damaged"]
    assert "x\\x1b[1A\\x1b[2K\\rstate:   intact\\n" in out


def test_printable() -> None:
    assert printable("a\x1b[31mb\0\n\tc") == "a\\x1b[31mb\\x00\\n\\tc"
    assert printable("ünïcödé ok") == "ünïcödé ok"


def _keys(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": envelope.FORMAT, "entries": entries}


KEY_ENTRY = {"type": "key", "id": "key:1", "wrapped": base64.b64encode(bytes(40)).decode(),
             "salt": base64.b64encode(bytes(16)).decode()}  # fmt: skip
PASS_ENTRY = {"type": "passphrase", "id": "passphrase:1", "kdf": "argon2id", "lanes": 4,
              "iterations": 4, "memory_kib": 8192, "salt": base64.b64encode(bytes(16)).decode(),
              "wrapped": base64.b64encode(bytes(40)).decode()}  # fmt: skip
KEYS_CASES = [
    [], "x", [1], [{**KEY_ENTRY, "type": "evil"}], [{**KEY_ENTRY, "wrapped": "%%%"}],
    [{**KEY_ENTRY, "salt": "not base64!"}], [{**KEY_ENTRY, "salt": 5}], [{**KEY_ENTRY, "id": 1}],
    [{k: v for k, v in KEY_ENTRY.items() if k != "salt"}], [{**PASS_ENTRY, "iterations": "4"}],
    [{**PASS_ENTRY, "memory_kib": None}], [{**PASS_ENTRY, "kdf": "pbkdf2"}],
    [{**PASS_ENTRY, "lanes": True}], [KEY_ENTRY] * 300,
]  # fmt: skip


@pytest.mark.parametrize("entries", KEYS_CASES, ids=[f"keys-{i}" for i in range(len(KEYS_CASES))])
def test_every_keys_field_malformed_is_a_usage_error(tmp_path: Path, entries: Any) -> None:
    (tmp_path / "keys.json").write_text(json.dumps(_keys(entries)))
    with pytest.raises(UsageError, match=r"keys\.json is malformed"):
        envelope.load(tmp_path)


@pytest.mark.parametrize(
    "cost",
    [{"memory_kib": 4 << 20}, {"iterations": 1000, "memory_kib": 1 << 20},
     {"iterations": 0}, {"lanes": 64}, {"memory_kib": 1}],
)  # fmt: skip
def test_argon2id_cost_is_bounded_before_any_work(tmp_path: Path, cost: dict[str, int]) -> None:
    """keys.json may not demand 4 GiB x 1000 iterations (measured: it would run for hours)."""
    (tmp_path / "keys.json").write_text(json.dumps(_keys([{**PASS_ENTRY, **cost}])))
    entries = envelope.load(tmp_path).entries
    credential = Credential(passphrase=Secret(bytearray(b"guess")))
    with pytest.raises(UsageError, match="asks for an Argon2id cost out of bounds"):
        envelope.unlock(tmp_path, entries, credential)


def test_number_of_passphrase_entries_tried_is_bounded(tmp_path: Path) -> None:
    many = [{**PASS_ENTRY, "id": f"passphrase:{i}"} for i in range(20)]
    (tmp_path / "keys.json").write_text(json.dumps(_keys(many)))
    credential = Credential(passphrase=Secret(bytearray(b"guess")))
    with pytest.raises(UsageError, match="has 20 passphrase entries, more than 8"):
        envelope.unlock(tmp_path, envelope.load(tmp_path).entries, credential)


def test_calibration_stays_within_the_bounds_it_enforces() -> None:
    iterations, memory = envelope.calibrate(50)
    assert iterations * memory <= envelope.MAX_WORK_KIB
    assert iterations <= envelope.MAX_ITERATIONS


def test_unexpected_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(_image: Path) -> None:
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr("cryptlayer.image.inspect.inspect_image", boom)
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.FAILURE
    assert err == ("error: unexpected RuntimeError: something nobody foresaw: run again with"
                   " --debug for the traceback, and report it\n")  # fmt: skip


def test_oci_blob_symlinked_out_of_the_layout_is_refused(tmp_path: Path) -> None:
    layout = write_dir(tmp_path / "lay", image_files([(MIDDLE, "none")], CONFIG))
    index = json.loads((layout / "index.json").read_text())
    blob = layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    blob.unlink()
    blob.symlink_to("/etc/passwd")
    refused = pytest.raises(UsageError, match="is a symbolic link; refusing to read it")
    with refused, open_image(f"oci:{layout}"):
        pass
    blob.unlink()
    os.mkfifo(blob)  # would block for ever
    with pytest.raises(UsageError, match="is not a regular file"), open_image(f"oci:{layout}"):
        pass


def test_oci_config_of_wrong_types_is_refused(tmp_path: Path) -> None:
    layout = write_dir(tmp_path / "lay", image_files([(MIDDLE, "none")], {"Cmd": [1, 2]}))
    with pytest.raises(UsageError, match="malformed image metadata"), open_image(f"oci:{layout}"):
        pass


def test_device_nodes_are_refused_but_whiteouts_kept(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    os.mknod(tree / "whiteout", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    DirectorySource(tree).measure()  # an overlay whiteout is fine
    os.mknod(tree / "mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))
    with pytest.raises(UsageError, match=r"tree/mem is a character device node \(1:1\)"):
        DirectorySource(tree).measure()
    tar_path = tmp_path / "layer.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("srv/sda")  # (under /dev it would be left out: test_devices.py)
        info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        tar.addfile(info)
    with pytest.raises(UsageError, match=r"layer.tar:srv/sda is a block device node \(8:0\)"):
        TarSource(tar_path).measure()


def test_passwd_fifo_and_symlink_out(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    os.mkfifo(tmp_path / "etc/passwd")
    with pytest.raises(UsageError, match="the container's /etc/passwd is not a regular file"):
        resolve_user(tmp_path, "app")
    (tmp_path / "etc/passwd").unlink()
    (tmp_path / "etc/passwd").symlink_to("../../../../../etc/passwd")  # root's own, outside
    with pytest.raises(UsageError, match="not in the container's /etc/passwd"):
        resolve_user(tmp_path, "root")
    (tmp_path / "etc/passwd").unlink()
    (tmp_path / "etc/real").write_text("app:x:7:8::/:/bin/sh\n")
    (tmp_path / "etc/passwd").symlink_to("/etc/real")  # absolute, resolved inside the root
    assert resolve_user(tmp_path, "app") == (7, 8)
    with pytest.raises(UsageError, match="not in the container's /etc/passwd"):
        resolve_user(tmp_path, "²")  # str.isdigit() says yes; int() would take it as 2


def test_runtime_config_is_confined(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/sh").write_bytes(b"")
    (tmp_path / "bin/sh").chmod(0o755)
    doc = runtime_config(tmp_path, "n", ImageConfig(cmd=("sh",)), Overrides())
    process, linux = doc["process"], doc["linux"]
    assert process["noNewPrivileges"] is True
    assert {"type": "RLIMIT_CORE", "hard": 0, "soft": 0} in process["rlimits"]
    assert {"type": "network"} in linux["namespaces"]
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    allowed = {(d["type"], d["major"], d.get("minor")) for d in linux["resources"]["devices"][1:]}
    assert ("c", 1, 3) in allowed and ("b", 7, 0) not in allowed and len(allowed) == 9
    assert linux["resources"]["pids"] == {"limit": 2048}
    assert "/proc/keys" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    assert all(m["destination"] not in ("/etc/hosts", "/etc/resolv.conf") for m in doc["mounts"])
    host = runtime_config(tmp_path, "n", ImageConfig(cmd=("sh",)), Overrides(network=Network.HOST))
    assert {"type": "network"} not in host["linux"]["namespaces"]


def test_seccomp_is_podmans_profile_without_the_keyring() -> None:
    profile = seccomp.load_profile()
    rules = seccomp.oci_seccomp(profile, ["CAP_CHOWN"], machine="x86_64")
    assert rules["defaultAction"] == profile["defaultAction"]
    assert rules["architectures"][0] == "SCMP_ARCH_X86_64"
    allowed = {n for r in rules["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    assert {"read", "write", "execve", "arch_prctl"} <= allowed
    assert not allowed & {"keyctl", "add_key", "request_key", "bpf", "init_module"}
    assert {"names": ["keyctl", "add_key", "request_key"], "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1} in rules["syscalls"]  # fmt: skip
    admin = seccomp.oci_seccomp(profile, ["CAP_SYS_ADMIN"], machine="x86_64")
    assert "bpf" in {n for r in admin["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
                     for n in r["names"]}  # fmt: skip


def _fake_host(tmp_path: Path, swaps: str, core: str) -> tuple[Path, Path]:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n" + swaps)
    (proc / "sys/kernel/core_pattern").write_text(core)
    for name, uuid, slave in (("dm-0", "CRYPT-PLAIN-x", None), ("dm-1", "LVM-y", "dm-0"),
                              ("loop0", None, None), ("zram0", None, None)):  # fmt: skip
        block = sys / "devices/virtual/block" / name
        (block / "slaves").mkdir(parents=True)
        if uuid:
            (block / "dm").mkdir()
            (block / "dm/uuid").write_text(uuid + "\n")
        if slave:
            (block / "slaves" / slave).symlink_to(sys / "devices/virtual/block" / slave)
        (sys / "class/block").mkdir(parents=True, exist_ok=True)
        (sys / "class/block" / name).symlink_to(block)
    (sys / "devices/virtual/block/zram0/backing_dev").write_text("/dev/sdb1\n")
    return proc, sys


def test_hostcheck_finds_what_may_write_plaintext(tmp_path: Path) -> None:
    swaps = ("/dev/dm-1 partition 1 0 -2\n/dev/loop0 partition 1 0 -3\n"
             "/dev/zram0 partition 1 0 100\n")  # fmt: skip
    proc, sys = _fake_host(tmp_path, swaps, "/var/crash/core.%p\n")
    assert hostcheck.problems(proc, sys) == [
        hostcheck.Problem("swap", "swap /dev/loop0 is not on dm-crypt"),
        hostcheck.Problem("zram-writeback", "zram swap /dev/zram0 writes idle pages to /dev/sdb1"),
        hostcheck.Problem(
            "core-pattern", "core_pattern '/var/crash/core.%p' writes core dumps to files"
        ),
    ]
    proc, sys = _fake_host(tmp_path / "ok", "/dev/dm-1 partition 1 0 -2\n", "|/bin/false\n")
    assert hostcheck.problems(proc, sys) == []  # LVM on dm-crypt; a pipe handler


def test_start_checks_the_host_before_opening_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        hostcheck,
        "problems",
        lambda: [hostcheck.Problem("swap", "swap /dev/sdb2 is not on dm-crypt")],
    )
    key = tmp_path / "k"
    invoke("keygen", str(key))
    code, _, err = invoke("start", "--strict", "--name", "c", "-k", str(key), str(tmp_path))
    assert code == ExitCode.USAGE
    assert err == ("error: this host may write decrypted memory to disk: swap /dev/sdb2 is not on"
                   " dm-crypt: encrypt swap (or swapoff), pipe core dumps to a handler that drops"
                   " them, or leave out --strict (docs/threat-model.md)\n")  # fmt: skip


def test_tar_members_with_hostile_names_stay_inside(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a\x1b[2Jb/../../../etc/x")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 1
        tar.addfile(info)
    (tmp_path / "l.tar").write_bytes(buf.getvalue())
    with pytest.raises(UsageError) as err:
        TarSource(tmp_path / "l.tar").measure()
    assert "\x1b" not in str(err.value)
