"""Pure logic: keys, the OCI config, sizes, sources."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest

from cryptlayer.build import sources
from cryptlayer.build.sources import DirectorySource, TarSource, parse_path
from cryptlayer.errors import (
    CannotInvokeError,
    CommandError,
    CommandNotFoundError,
    ExitCode,
    UsageError,
)
from cryptlayer.image.manifest import ImageConfig
from cryptlayer.image.process import Overrides, merge_env, process_args
from cryptlayer.keys.sources import Secret, read_key, read_key_command
from cryptlayer.runtime.ocispec import check_command, resolve_user, runtime_config


def test_secret_never_shows_itself() -> None:
    secret = Secret(bytearray(b"hunter2-hunter2"))
    assert "hunter2" not in repr(secret) + str(secret) + f"{secret}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(secret)


def test_secret_wipe_overwrites_buffer() -> None:
    buf = bytearray(b"k" * 32)
    secret = Secret(buf)
    secret.wipe()
    assert buf == bytearray(32)
    with pytest.raises(ValueError), secret.view():
        pass


def test_read_key_refuses_big_files(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * 9000)
    big.chmod(0o600)
    with pytest.raises(UsageError, match="larger than 8192 bytes"):
        read_key(str(big))
    (tmp_path / "k").write_bytes(b"\x00\x01" * 16)
    (tmp_path / "k").chmod(0o600)
    with read_key(str(tmp_path / "k")) as key, key.view() as data:
        assert bytes(data) == b"\x00\x01" * 16


def test_process_args_like_podman() -> None:
    cfg = ImageConfig(entrypoint=("/entry",), cmd=("default",))
    assert process_args(cfg, ()) == ["/entry", "default"]
    assert process_args(cfg, ("x", "y")) == ["/entry", "x", "y"]
    assert process_args(ImageConfig(cmd=("a",)), ("b",)) == ["b"]
    with pytest.raises(UsageError, match="no default command"):
        process_args(ImageConfig(), ())


def test_merge_env_later_wins_and_rejects_garbage() -> None:
    assert merge_env(("A=1", "B=2"), ("A=3",)) == ["A=3", "B=2"]
    with pytest.raises(UsageError, match="use KEY=VALUE"):
        merge_env(("NOEQUALS",))


def test_resolve_user_in_container_files(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home:/bin/sh\n"
    )
    (tmp_path / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    assert resolve_user(tmp_path, "") == (0, 0)
    assert resolve_user(tmp_path, "app") == (1000, 1001)
    assert resolve_user(tmp_path, "app:staff") == (1000, 50)
    assert resolve_user(tmp_path, "7:8") == (7, 8)
    with pytest.raises(UsageError, match="not in the container's /etc/passwd"):
        resolve_user(tmp_path, "ghost")


def test_resolve_user_ignores_passwd_symlinked_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("evil:x:0:0::/:/bin/sh\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").symlink_to(outside)
    with pytest.raises(UsageError):
        resolve_user(root, "evil")


def test_runtime_config_overrides(tmp_path: Path) -> None:
    cfg = ImageConfig(cmd=("sh",), env=("A=1",), workdir="/srv")
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/id").write_bytes(b"")
    (tmp_path / "usr/bin/id").chmod(0o755)
    doc = runtime_config(tmp_path, "n", cfg, Overrides(("id",), ("A=2",), "/tmp", "5:6"))
    assert doc["process"]["args"] == ["id"]
    assert "A=2" in doc["process"]["env"]
    assert doc["process"]["cwd"] == "/tmp"
    assert doc["process"]["user"] == {"uid": 5, "gid": 6}
    assert doc["root"]["path"] == str(tmp_path)


def test_directory_measure_counts_hardlinks_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 5000)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "d").mkdir()
    m = DirectorySource(tmp_path).measure()
    assert m.content_bytes == 5000
    assert m.inodes == 3  # root dir, d, the file (once)


def _listing(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        link = os.readlink(path) if path.is_symlink() else None
        times = None if path.is_symlink() else st.st_mtime_ns
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, times, data, link)
    return out


def _sample_tree(root: Path) -> None:
    for i in range(5):
        sub = root / f"top{i}" / "deep"
        sub.mkdir(parents=True)
        (sub / "f").write_bytes(bytes([i]) * (1000 * (i + 1)))
        (root / f"top{i}" / "link").symlink_to("deep/f")
        os.chmod(sub, 0o750)
        os.chown(sub / "f", 1000 + i, 2000 + i)
        os.utime(sub, ns=(1, 10**18 + i))
    (root / "file").write_bytes(b"top-level file")
    os.chmod(root, 0o705)
    os.utime(root, ns=(1, 10**18))


@pytest.mark.parametrize("copiers", [1, 3])
def test_directory_populate_copies_everything(
    tmp_path: Path, copiers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "COPIERS", copiers)
    monkeypatch.setattr(sources, "COPIERS_FROM", 0)  # a small tree, copied in shares all the same
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _sample_tree(src)
    dst.mkdir()
    DirectorySource(src).populate(dst)
    assert _listing(dst) == _listing(src)
    assert len(sources._shares(DirectorySource(src)._tree.sizes, copiers)) == copiers


def test_directory_populate_keeps_hard_links_inside_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "COPIERS", 3)
    monkeypatch.setattr(sources, "COPIERS_FROM", 0)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _sample_tree(src)
    os.link(src / "top0" / "deep" / "f", src / "top4" / "same")  # a link across two top entries
    dst.mkdir()
    DirectorySource(src).populate(dst)
    assert (dst / "top0" / "deep" / "f").stat().st_ino == (dst / "top4" / "same").stat().st_ino
    assert _listing(dst) == _listing(src)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def test_tar_measure(tmp_path: Path) -> None:
    path = _tar(tmp_path / "l.tar", [(_member("f"), b"abc"), (_member("d", tarfile.DIRTYPE), None)])
    m = TarSource(path).measure()
    assert m.content_bytes == 3
    assert m.inodes == 3


HOSTILE = {
    "absolute path": lambda out: [(_member(f"{out}/victim"), b"overwritten")],
    "dot-dot": lambda out: [(_member("../" * 12 + f"{out.lstrip('/')}/victim"), b"overwritten")],
    "symlink then write through it": lambda out: [
        (_member("link", tarfile.SYMTYPE, out), None), (_member("link/victim"), b"overwritten")],
    "relative symlink climbing out": lambda out: [
        (_member("up", tarfile.SYMTYPE, "../" * 12), None),
        (_member(f"up/{out.lstrip('/')}/victim"), b"overwritten")],
    "hard link to a host file": lambda out: [
        (_member("hard", tarfile.LNKTYPE, f"{out}/victim"), None)],
    "directory turned into a symlink": lambda out: [
        (_member("d", tarfile.DIRTYPE), None), (_member("d", tarfile.SYMTYPE, out), None),
        (_member("d/victim"), b"overwritten")],
}  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_is_confined(tmp_path: Path, case: str) -> None:
    """No member can create, change or read anything outside the layer being built."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    layer = tmp_path / "layer"
    layer.mkdir()
    path = _tar(tmp_path / "evil.tar", HOSTILE[case](str(outside)))
    try:
        TarSource(path).populate(layer)
    except UsageError as err:  # refused (e.g. a hard link to a file the layer lacks)
        assert "cannot extract" in str(err)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_text() == "untouched"
    assert (outside / "victim").stat().st_nlink == 1  # not linked into the layer
    for p in layer.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert p.read_text() != "untouched", f"{p} reads the host's file"


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    key.chmod(0o640)
    with pytest.raises(UsageError) as err:
        read_key(str(key))
    assert str(err.value) == f"key file {key} is accessible by others (mode 0640): chmod 600 {key}"


def test_key_command_output_is_the_key(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"\x00\xff" * 16)
    with read_key_command(f"cat {key}") as secret, secret.view() as data:
        assert bytes(data) == b"\x00\xff" * 16
    with pytest.raises(CommandError, match="false failed with exit status 1"):
        read_key_command("false")
    with pytest.raises(UsageError, match="is empty"):
        read_key_command("true")


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_parse_path_sniffs_compressed_pax_tars(tmp_path: Path, how: str) -> None:
    """Only the head is read: a zstd filter is stopped, not drained (the file is 8 MiB)."""
    import subprocess

    plain = tmp_path / "l.tar"
    big = tarfile.TarInfo("big")
    big.pax_headers = {"comment": "x" * 100}  # a PAX header first, as most real tars have
    _tar(plain, [(big, os.urandom(8 << 20))])
    path = plain
    if how == "gzip":
        path = tmp_path / "l.tar.gz"
        subprocess.run(["gzip", "-1", "-k", "-c", str(plain)], stdout=path.open("wb"), check=True)
    elif how == "zstd":
        path = tmp_path / "l.tar.zst"
        subprocess.run(["zstd", "-q", "-1", str(plain), "-o", str(path)], check=True)
    assert isinstance(parse_path(str(path)), TarSource)
    (tmp_path / "not.tar").write_bytes(os.urandom(4096))
    with pytest.raises(UsageError, match="neither a directory nor a tar archive"):
        parse_path(str(tmp_path / "not.tar"))


def _fake_sysfs(root: Path, device: str, rotational: str) -> Path:
    queue = root / "dev/block" / device / "queue"
    queue.mkdir(parents=True)
    (queue / "rotational").write_text(f"{rotational}\n")
    return root


def test_erase_caveat_names_flash_storage(tmp_path: Path) -> None:
    from cryptlayer.runtime.hostcheck import erase_caveat
    from cryptlayer.tools import mount

    where = mount.containing(tmp_path)
    flash = _fake_sysfs(tmp_path / "flash", where.device, "0")
    disk = _fake_sysfs(tmp_path / "disk", where.device, "1")
    if where.fstype in ("btrfs", "zfs", "bcachefs", "f2fs", "nilfs2"):
        pytest.fail(f"this test needs tmp_path off copy-on-write storage, not {where.fstype}")
    caveat = erase_caveat(tmp_path, sysfs=flash)
    assert caveat is not None and caveat.startswith(
        f"{tmp_path} is on flash storage (device {where.device} is not rotational)"
    )
    assert erase_caveat(tmp_path, sysfs=disk) is None


def test_erase_caveat_names_copy_on_write_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptlayer.runtime import hostcheck
    from cryptlayer.tools import mount

    # No btrfs on this host: the mount table's answer is the one thing faked.
    monkeypatch.setattr(mount, "containing", lambda _p: mount.Mounted(tmp_path, "btrfs", "0:99"))
    caveat = hostcheck.erase_caveat(tmp_path)
    assert caveat is not None and "is on btrfs, which writes changes to new blocks" in caveat


def test_mount_table_finds_the_innermost_mount() -> None:
    from cryptlayer.tools import mount

    assert mount.containing(Path("/proc/self")).fstype == "proc"
    assert mount.containing(Path("/")).target == Path("/")


def test_mount_data_longer_than_the_kernel_takes_is_refused(tmp_path: Path) -> None:
    """mount(2) copies one page of options: a longer lowerdir list is an error: line, not a
    silently cut one (refused before any system call, so no root needed)."""
    from cryptlayer.tools import mount

    lowers = ":".join(f"/run/cryptlayer/.images/{'f' * 64}/layer{i}" for i in range(60))
    with pytest.raises(mount.MountError) as err:
        mount.mount("cryptlayer", tmp_path, "overlay", [f"lowerdir={lowers}", "nodev"])
    assert str(err.value).startswith(f"cannot mount {tmp_path}: its overlay options are ")
    assert err.value.hint == "use an image with fewer layers"


def test_build_overrides_replace_only_what_was_given() -> None:
    """build's --cmd/--env/...: the same Overrides as run's, written into the image's config."""
    base = ImageConfig(entrypoint=("/init",), cmd=("serve",), env=("A=1",), workdir="/srv")
    assert Overrides().image_config(base) == base
    changed = Overrides(command=(), env=("B=2",), user="app").image_config(base)
    assert changed == ImageConfig(entrypoint=("/init",), cmd=(), env=("B=2",), workdir="/srv",
                                  user="app")  # fmt: skip
    shell = ("/bin/sh", "-c")
    assert Overrides(entrypoint=shell).image_config(base).entrypoint == shell


def test_check_command_finds_what_crun_would_run(tmp_path: Path) -> None:
    """crun reports a command missing from the image, or not executable, as its own exit 1,
    which run passed on as if the job had exited 1: refused before the container starts, 127
    and 126 as podman's."""
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    for name, mode in [("tool", 0o755), ("data", 0o644)]:
        (tmp_path / "usr/bin" / name).write_bytes(b"")
        (tmp_path / "usr/bin" / name).chmod(mode)
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv/job").write_bytes(b"")
    (tmp_path / "srv/job").chmod(0o700)
    env = ["PATH=/nowhere:/bin"]
    check_command(tmp_path, "tool", env, "/")  # through the image's own /bin symlink
    check_command(tmp_path, "/usr/bin/tool", env, "/")
    check_command(tmp_path, "./job", env, "/srv")
    with pytest.raises(CommandNotFoundError) as missing:
        check_command(tmp_path, "nosuch", env, "/")
    assert missing.value.exit_code == ExitCode.NOT_FOUND == 127
    assert str(missing.value) == (
        "the container's command 'nosuch' is not in the image (looked up in its PATH):"
        " give a command the image holds: IMAGE COMMAND [ARG...]"
    )
    with pytest.raises(CommandNotFoundError):
        check_command(tmp_path, "tool", ["PATH=/sbin"], "/")  # the container's PATH, not ours
    with pytest.raises(
        CommandNotFoundError, match=re.escape("'/etc/../../x' is not in the image:")
    ):
        check_command(tmp_path, "/etc/../../x", env, "/")
    with pytest.raises(CannotInvokeError, match="'data' cannot be run: it is not executable"):
        check_command(tmp_path, "data", env, "/")
    with pytest.raises(CannotInvokeError, match="'/srv' cannot be run: it is a directory") as err:
        check_command(tmp_path, "/srv", env, "/")
    assert err.value.exit_code == ExitCode.CANNOT_INVOKE == 126
