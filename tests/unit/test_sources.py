"""build/sources.py: directories and tar archives as layers (measure, populate, hostile members)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from cryptlayer.build import sources
from cryptlayer.build.sources import DirectorySource, TarSource, parse_path
from cryptlayer.errors import (
    UsageError,
)


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
