"""What a lazy start leaves when it dies, and what `gc` does about it (docs/lazy.md, "gc"); and a
verity failure of a lazy layer: the error names the docker:// reference, and that blob's chunks
leave the node's block cache so the next start fetches them again.

No devices here: gc's decisions are watched with the NBD driver's sysfs replaced by a dict and
dm-verity's status by a function; the VM tier's tests/vm/test_lazy_gc.py runs them for real."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryptlayer import cli, paths
from cryptlayer.distribution import lazy as fetching
from cryptlayer.distribution.blockcache import CHUNK, BlockCache
from cryptlayer.errors import CryptlayerError, TamperedImageError, UsageError
from cryptlayer.runtime import gc, journal, layers, lazy, state
from cryptlayer.runtime.gc import Report
from cryptlayer.runtime.journal import Kind, Step

REF = "docker://registry.example/team/app:v1"
# cli._image_for_start's arguments for REF: no --digest, --trust, --cert-dir, --authfile, --creds
START = (REF, None, None, "true", None, None, None, False, False)  # (erase last)
BLOB_A = "sha256:" + "a" * 64
BLOB_B = "sha256:" + "b" * 64


@pytest.fixture(autouse=True)
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    monkeypatch.setenv("CRYPTLAYER_RUNDIR", str(tmp_path / "run"))
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(tmp_path / "config.toml"))
    yield tmp_path


def _locked(path: Path) -> bool:
    """Whether another open file description holds an flock on `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# (a) images fetched for a lazy start that no opening names


FETCHER = """
import sys
from cryptlayer.runtime import lazy
with lazy.work_dir() as work:
    (work / "image").mkdir()
    print(work, flush=True)
    sys.stdin.read()
"""


def test_a_fetched_image_is_kept_while_its_maker_lives_and_removed_once_it_died() -> None:
    """The race: gc runs while another process is fetching into a directory no journal names yet
    (it has not taken the host lock to open the layers). gc must leave it; once that process is
    SIGKILLed (before any opening named the directory), gc removes it."""
    fetcher = subprocess.Popen([sys.executable, "-c", FETCHER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert fetcher.stdout is not None
        work = Path(fetcher.stdout.readline().strip())
        assert work.parent == lazy.fetch_parent() and (work / "image").is_dir()
        report = Report()
        gc._collect_fetched(report, claimed=set())
        assert (work / "image").is_dir(), "gc removed the directory a live process fetches into"
        assert report.orphans == [] and report.errors == []
    finally:
        fetcher.send_signal(signal.SIGKILL)
        fetcher.wait()
    gc._collect_fetched(report, claimed=set())
    assert not work.exists()
    assert report.orphans == [f"fetched image {work}"]


def test_the_directory_is_made_under_the_host_lock_and_locked_before_that_is_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gc looks under the host lock; the maker creates the directory and takes its lock under it
    too, so there is no moment at which gc sees a live maker's directory unlocked."""
    made: list[bool] = []
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.parent == lazy.fetch_parent():
            made.append(_locked(paths.state_root() / "lock"))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with lazy.work_dir() as work:
        assert made == [True], "the directory was made without the host lock"
        assert not _locked(paths.state_root() / "lock")  # released: the fetch runs unlocked
        assert _locked(work)  # ...but the directory is held
        report = Report()
        gc._collect_fetched(report, claimed=set())
        assert work.is_dir() and report.orphans == []
    assert not _locked(work)


def test_a_fetched_image_an_opening_names_is_the_journals_to_release() -> None:
    with lazy.work_dir() as work:
        pass  # its maker is done: a started container's directory, named by the opening
    report = Report()
    gc._collect_fetched(report, claimed={str(work)})
    assert work.is_dir() and report.orphans == []
    gc._collect_fetched(report, claimed=set())
    assert not work.exists() and report.orphans == [f"fetched image {work}"]


def test_gc_leaves_the_lazy_directory_itself_to_the_fetched_images_rule() -> None:
    """The empty-directory sweep (container directories) must not remove a live maker's directory
    while it is still empty: /run/cryptlayer/lazy is not a container's."""
    with lazy.work_dir() as work:
        gc._collect_empty_dirs(claimed=set())
        assert work.is_dir()


@dataclass(frozen=True)
class _Fetched:
    """What lazy.fetch returns (distribution/lazy.Fetched), for a fetch that is not made."""

    image: Path
    blobs: list[tuple[str, int]]
    headers: list[int]


def _fake_fetch(remote: fetching.Remote, target: Path, **_: object) -> _Fetched:
    target.mkdir()
    return _Fetched(target, [(BLOB_A, 1 << 20)], [4096])


def test_a_kill_between_the_fetch_and_the_opening_leaves_a_directory_gc_removes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The crash point between `lazy.fetch` and the opening's FETCHED step (the first of a lazy
    start): SIGKILLed there, the directory is named by no journal, and gc removes it."""
    monkeypatch.setattr(fetching, "fetch", _fake_fetch)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.environ[journal.CRASH_AT] = "1"
            journal.crash_points = 0
            with cli._image_for_start(*START):
                pass
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    left = list(lazy.fetch_parent().iterdir())
    assert len(left) == 1 and (left[0] / "image").is_dir()
    report = Report()
    gc._collect_fetched(report, claimed=set())
    assert list(lazy.fetch_parent().iterdir()) == []
    assert report.orphans == [f"fetched image {left[0]}"]


# (b) NBD devices attached by a lazy start that no journal names


def test_gc_detaches_only_cryptlayers_nbd_devices_that_no_journal_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attached = {
        0: "cryptlayer:aaa:0",  # an orphan
        1: "cryptlayer:bbb:0",  # named by a journal's NBD step (its ref)
        2: "nbd-client",  # someone else's
        3: "cryptlayer:ccc:1",  # named by a journal by its node (step.device)
        4: "",  # attached without a backend: not ours
        5: "cryptlayerx:ddd:0",  # not our prefix
    }
    detached: list[str] = []
    monkeypatch.setattr(gc.nbd, "attached", lambda: dict(attached))
    monkeypatch.setattr(gc.lazy, "detach", detached.append)
    report = Report()
    gc._collect_nbd(report, claimed={"cryptlayer:bbb:0", "/dev/nbd3"})
    assert detached == ["/dev/nbd0"]
    assert report.orphans == ["NBD device /dev/nbd0 (cryptlayer:aaa:0)"]


def test_an_nbd_device_gc_cannot_detach_is_an_error_it_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(device: str) -> None:
        raise CryptlayerError(f"{device} is still attached after NBD_CMD_DISCONNECT")

    monkeypatch.setattr(gc.nbd, "attached", lambda: {7: "cryptlayer:eee:0"})
    monkeypatch.setattr(gc.lazy, "detach", refuse)
    report = Report()
    gc._collect_nbd(report, claimed=set())
    assert report.orphans == []
    assert report.errors == [
        "NBD device /dev/nbd7 (cryptlayer:eee:0): /dev/nbd7 is still attached after"
        " NBD_CMD_DISCONNECT"
    ]


def test_an_nbd_device_something_still_sits_on_is_reported_not_detached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mapping gc could not remove (in use) over an orphan device: detaching would give its user
    I/O errors; gc says so instead and fails."""
    (tmp_path / "sys/nbd5/holders/dm-3").mkdir(parents=True)
    monkeypatch.setattr(gc, "SYS_BLOCK", tmp_path / "sys")
    monkeypatch.setattr(gc.nbd, "attached", lambda: {5: "cryptlayer:fff:0", 6: "cryptlayer:fff:1"})
    detached: list[str] = []
    monkeypatch.setattr(gc.lazy, "detach", detached.append)
    report = Report()
    gc._collect_nbd(report, claimed=set())
    assert detached == ["/dev/nbd6"]
    assert report.errors == ["NBD device /dev/nbd5 (cryptlayer:fff:0): in use by dm-3"]


def test_the_backend_name_is_what_gc_looks_for() -> None:
    assert lazy.backend_name("0123abc", 2) == "cryptlayer:0123abc:2"
    assert lazy.backend_name("0123abc", 2).startswith(lazy.BACKEND_PREFIX)


# (c) the block cache's temporary files of writers that died


def test_gc_removes_the_cache_temporary_files_of_dead_writers_only() -> None:
    cache = BlockCache(paths.block_cache_dir(), 1 << 30)
    cache.put(BLOB_A, 0, b"c" * CHUNK)
    chunk = cache.path(BLOB_A, 0)
    blob_dir = paths.cached_blob_dir(BLOB_A)
    assert chunk.parent == blob_dir  # the layout gc and the runtime know is the cache's
    dead = blob_dir / f"{paths.CACHE_TEMP_PREFIX}00000001-999999-1"
    young = blob_dir / f"{paths.CACHE_TEMP_PREFIX}00000002-999999-2"
    for temp in (dead, young):
        temp.write_bytes(b"half")
    old = time.time() - paths.CACHE_TEMP_STALE - 60
    os.utime(dead, (old, old))
    os.utime(chunk, (old, old))  # a chunk unused for long is the eviction's, not gc's
    report = Report()
    gc._collect_cache_temps(report)
    assert not dead.exists()
    assert young.exists() and chunk.exists()
    assert report.orphans == [f"cache temporary file {dead}"]
    assert (paths.block_cache_dir() / ".lock").exists()  # a lock file is no leftover: flock


# A verity failure of a lazy layer


def _cache_with(*blobs: str) -> BlockCache:
    cache = BlockCache(paths.block_cache_dir(), 1 << 30)
    for digest in blobs:
        for index in range(3):
            cache.put(digest, index, bytes([index]) * CHUNK)
    return cache


def _opened_lazily(stack: ExitStack, work: Path) -> state.Opening:
    """The opening of an image fetched into `work`, with its FETCHED and SERVER steps taken as
    layers.join takes them (the server a process that reads its configuration and waits)."""
    paths.openings_dir().mkdir(parents=True, mode=0o700)
    opening = state.Opening(str(work / "image"))
    opening.save()
    server = [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(60)"]
    layers_ = lazy.LazyLayers(work, [(BLOB_A, 3 * CHUNK), (BLOB_B, 3 * CHUNK)], server,
                              lambda fds: b"{}", REF)  # fmt: skip
    for end in lazy.serve(stack, opening, layers_):
        end.close()
    return opening


def test_a_verity_failure_names_the_reference_and_drops_that_blobs_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = _cache_with(BLOB_A, BLOB_B)
    temp = paths.cached_blob_dir(BLOB_B) / f"{paths.CACHE_TEMP_PREFIX}00000009-1-1"
    temp.write_bytes(b"a writer at work")
    with lazy.work_dir() as work, ExitStack() as stack:
        opening = _opened_lazily(stack, work)
        failing = paths.verity_mapping(opening.id, 1)
        monkeypatch.setattr(layers.veritysetup, "corrupted", lambda name: name == failing)
        with pytest.raises(TamperedImageError) as caught:
            layers.require_uncorrupted(opening, opening.image, 2)
        message = str(caught.value)
        assert message.startswith(f"layer 1 of {REF} failed dm-verity's check"), message
        assert str(work) not in message
        # every chunk of layer 1's blob is gone (the next start fetches it again); layer 0's
        # stay, and so does a writer's temporary file (renamed whole, or not at all)
        assert [cache.get(BLOB_B, i, CHUNK) for i in range(3)] == [None] * 3
        assert [cache.get(BLOB_A, i, CHUNK) for i in range(3)] == [bytes([i]) * CHUNK
                                                                   for i in range(3)]  # fmt: skip
        assert sorted(p.name for p in paths.cached_blob_dir(BLOB_B).iterdir()) == [temp.name]
    assert not work.exists()  # the stack released the steps: server killed, directory removed


def test_a_local_images_verity_failure_names_its_path_and_touches_no_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = _cache_with(BLOB_A)
    opening = state.Opening("/images/app", steps=[Step(Kind.DIR, "/run/cryptlayer/.images/x")])
    monkeypatch.setattr(layers.veritysetup, "corrupted", lambda name: True)
    with pytest.raises(TamperedImageError) as caught:
        layers.require_uncorrupted(opening, opening.image, 1)
    assert str(caught.value).startswith("layer 0 of /images/app failed")
    assert cache.get(BLOB_A, 0, CHUNK) is not None


@pytest.mark.parametrize(
    "source",
    [b"", b"not json", b"[]", b'{"ref": 1, "blobs": []}', b'{"ref": "r", "blobs": ["../x"]}'],
)
def test_a_source_file_not_as_written_drops_nothing(source: bytes, tmp_path: Path) -> None:
    """The cache's directories are named by digests: never by a path read from a file that is
    not as lazy.py wrote it."""
    cache = _cache_with(BLOB_A)
    work = tmp_path / "work"
    work.mkdir()
    (work / lazy.SOURCE).write_bytes(source)
    opening = state.Opening(str(work / "image"), steps=[Step(Kind.FETCHED, str(work))])
    assert lazy.source_of(opening) is None
    assert lazy.after_corruption(opening, [0]) is None
    assert cache.get(BLOB_A, 0, CHUNK) is not None


@pytest.mark.parametrize("kind", ["symlink", "fifo", "too long"])
def test_a_source_file_that_is_not_a_small_regular_file_is_not_read(
    kind: str, tmp_path: Path
) -> None:
    """SOURCE is opened without following a symlink or blocking on a FIFO, and read up to
    MAX_SOURCE bytes (fsutil.read_untrusted): a link to a valid file names nothing either
    (before, each was read: the FIFO hung)."""
    good = json.dumps({"ref": "docker://r/a:v1", "blobs": [BLOB_A]}).encode()
    work = tmp_path / "work"
    work.mkdir()
    if kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(good)
        (work / lazy.SOURCE).symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(work / lazy.SOURCE)
    else:
        (work / lazy.SOURCE).write_bytes(good + b" " * lazy.MAX_SOURCE)
    opening = state.Opening(str(work / "image"), steps=[Step(Kind.FETCHED, str(work))])
    assert lazy.source_of(opening) is None


def test_drop_cached_refuses_what_is_not_a_digest() -> None:
    with pytest.raises(ValueError):
        lazy.drop_cached("sha256:../../etc")
    assert lazy.drop_cached(BLOB_A) == 0  # nothing cached: nothing to drop


# The error line of a lazy start names the reference


def test_errors_of_a_lazy_start_name_the_reference_not_the_copy_in_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetching, "fetch", _fake_fetch)
    with (
        pytest.raises(UsageError) as caught,
        cli._image_for_start(*START) as (path, got),
    ):
        assert got is not None and got.ref == REF and path.parent == got.work
        raise UsageError(f"the image key in keys.json does not open {path}/layer0.luks",
                         f"copy {path} again")  # fmt: skip
    assert str(caught.value) == (
        f"the image key in keys.json does not open {REF}/layer0.luks: copy {REF} again"
    )
    assert list(lazy.fetch_parent().iterdir()) == []  # no opening holds it: removed
