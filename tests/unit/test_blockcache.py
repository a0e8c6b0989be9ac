"""The node's block cache (distribution/blockcache.py): chunks by blob digest, kept across
starts, bounded (least recently used first), never serving a half-written chunk; read-ahead for
sequential reads; and its bound in config.toml."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path

import pytest

from cryptlayer import config
from cryptlayer.distribution import blockcache
from cryptlayer.distribution.blockcache import CHUNK, BlockCache, CachedBlob
from cryptlayer.errors import UsageError

DATA = os.urandom(5 * CHUNK + 777)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class Counting:
    """A blob source that counts what it is asked for."""

    def __init__(self, data: bytes = DATA, digest: str = DIGEST) -> None:
        self.data, self.digest, self.size = data, digest, len(data)
        self.reads: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.reads.append((offset, length))
        return self.data[offset : offset + length]


def cached_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "sha256").rglob("*") if p.is_file())


def test_reads_are_exact_and_a_second_start_fetches_nothing(tmp_path: Path) -> None:
    source = Counting()
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    for offset, length in [(0, 1), (3, 4096), (CHUNK - 1, 2), (2 * CHUNK + 5, 2 * CHUNK),
                           (len(DATA) - 10, 10), (0, len(DATA))]:  # fmt: skip
        assert blob.pread(offset, length) == DATA[offset : offset + length]
    blob.close()
    assert all(length <= CHUNK and offset % CHUNK == 0 for offset, length in source.reads)
    assert len(source.reads) == 6  # each chunk once
    # Another server, another process's cache object, the same directory: nothing fetched.
    again = Counting()
    second = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), again)
    assert second.pread(0, len(DATA)) == DATA
    assert again.reads == []


def test_the_bound_holds_and_the_least_recently_used_go_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockcache, "LOW_WATER", 1.0)
    cache = BlockCache(tmp_path / "c", 3 * CHUNK)
    source = Counting()
    blob = CachedBlob(cache, source)
    for index in (0, 2, 4):  # never the chunk after the last one read: no read-ahead
        blob.pread(index * CHUNK, 10)
    blob.pread(0, 10)  # 0 used again: 2 is now the least recently used
    assert len(source.reads) == 3
    blob.pread(3 * CHUNK, 10)  # a fourth chunk: one must go
    assert cached_bytes(tmp_path / "c") <= 3 * CHUNK
    assert sorted(p.name for p in (tmp_path / "c/sha256").glob("*/0*")) == [
        "00000000", "00000003", "00000004"]  # fmt: skip
    source.reads.clear()
    blob.pread(0, 10)
    blob.pread(4 * CHUNK, 10)
    assert source.reads == []
    blob.pread(2 * CHUNK, 10)
    assert source.reads == [(2 * CHUNK, CHUNK)]
    assert cached_bytes(tmp_path / "c") <= 3 * CHUNK
    blob.close()


def test_the_bound_holds_across_blobs_and_cache_objects(tmp_path: Path) -> None:
    limit = 4 * CHUNK
    for n in range(3):
        data = os.urandom(3 * CHUNK)
        source = Counting(data, "sha256:" + hashlib.sha256(data).hexdigest())
        blob = CachedBlob(BlockCache(tmp_path / "c", limit), source)
        assert blob.pread(0, len(data)) == data
        blob.close()
        assert cached_bytes(tmp_path / "c") <= limit, n


def test_a_half_written_chunk_is_never_served(tmp_path: Path) -> None:
    """A crash while a chunk was written leaves its temporary file (never read), or, on a file
    system that kept the rename but not the data, a short file under its name (dropped)."""
    cache = BlockCache(tmp_path / "c", 64 * CHUNK)
    where = cache.path(DIGEST, 0).parent
    where.mkdir(parents=True)
    (where / f"{blockcache.TEMP_PREFIX}00000000-1-1").write_bytes(DATA[:1000])
    (where / "00000001").write_bytes(DATA[CHUNK : CHUNK + 4096])  # short: torn by a power cut
    source = Counting()
    blob = CachedBlob(cache, source)
    assert blob.pread(CHUNK + 10, 100) == DATA[CHUNK + 10 : CHUNK + 110]
    assert blob.pread(10, 100) == DATA[10:110]  # not sequential: nothing read ahead
    blob.close()
    assert source.reads == [(CHUNK, CHUNK), (0, CHUNK)]
    assert (where / "00000001").stat().st_size == CHUNK


def test_a_dead_writers_temporary_file_is_removed_a_live_ones_kept(tmp_path: Path) -> None:
    where = tmp_path / "c/sha256" / DIGEST.removeprefix("sha256:")
    where.mkdir(parents=True)
    os.chmod(tmp_path / "c", 0o700)
    old, fresh = where / ".tmp-00000000-1-1", where / ".tmp-00000001-2-2"
    old.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    os.utime(old, (1, 1))
    BlockCache(tmp_path / "c", 64 * CHUNK)  # opening scans
    assert not old.exists() and fresh.exists()


def test_a_failed_write_leaves_no_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BlockCache(tmp_path / "c", 64 * CHUNK)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        cache.put(DIGEST, 0, DATA[:CHUNK])
    assert list(cache.path(DIGEST, 0).parent.iterdir()) == []
    assert cache.get(DIGEST, 0, CHUNK) is None


def settle(blob: CachedBlob) -> None:
    """Wait for the read-ahead in flight."""
    for future in list(blob.inflight.values()):
        future.exception()


def test_sequential_reads_fetch_ahead(tmp_path: Path) -> None:
    source = Counting()
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    blob.pread(0, 4096)
    blob.pread(4096, 4096)  # read on, but less than a chunk in a row: nothing fetched ahead
    settle(blob)
    assert sorted(source.reads) == [(0, CHUNK)]
    blob.pread(8192, CHUNK - 8192)  # a chunk's worth in a row: the next one is fetched ahead
    settle(blob)
    assert sorted(source.reads) == [(0, CHUNK), (CHUNK, CHUNK)]
    source.reads.clear()
    assert blob.pread(CHUNK, CHUNK) == DATA[CHUNK : 2 * CHUNK]  # read ahead: from the cache
    settle(blob)
    assert sorted(source.reads) == [(2 * CHUNK, 2 * CHUNK)]  # one request for the two
    source.reads.clear()  # the window grew: 1, then 2 chunks (as many as were read in a row)
    assert blob.pread(2 * CHUNK, len(DATA) - 2 * CHUNK) == DATA[2 * CHUNK :]
    blob.close()
    assert sorted(source.reads) == [(4 * CHUNK, CHUNK), (5 * CHUNK, 777)]  # never past the end


def test_small_reads_about_a_chunk_fetch_nothing_ahead(tmp_path: Path) -> None:
    """A mount's metadata and small files: many small reads, each near the last, in a few
    chunks. Before, two reads in one chunk counted as sequential and grew the window: mounting
    fetched 13 MB for 1.6 MB read (figure 14)."""
    source = Counting()
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    for offset in (0, 4096, 8192, 20480, 4096, 65536, 69632, 2 * CHUNK + 4096, 2 * CHUNK + 8192):
        blob.pread(offset, 4096)
    settle(blob)
    blob.close()
    assert sorted(source.reads) == [(0, CHUNK), (2 * CHUNK, CHUNK)]


def test_a_cached_read_reads_only_its_range(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Before, every request read its whole 1 MiB chunk from the cache (~300 us for 4 KiB)."""
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), Counting())
    blob.pread(0, 10)
    read: list[int] = []
    real = os.pread

    def spy(fd: int, n: int, at: int) -> bytes:
        read.append(n)
        return real(fd, n, at)

    monkeypatch.setattr(os, "pread", spy)
    assert blob.pread(12345, 4096) == DATA[12345 : 12345 + 4096]
    assert blob.pread(CHUNK - 100, 200) == DATA[CHUNK - 100 : CHUNK + 100]  # and chunk 1 fetched
    blob.close()
    assert read and max(read) <= 4096, read


def test_a_stream_that_stops_has_at_most_as_much_again_fetched_ahead(tmp_path: Path) -> None:
    """A file read whole, then reads elsewhere: read-ahead never runs further past its end than
    the file's length. Before, the window doubled per chunk read in a row (1, 3, 7, 8): a 4 MiB
    file fetched 12 chunks (figure 14's 2.34x fetched/read at 512 MiB)."""
    data = os.urandom(40 * CHUNK)
    source = Counting(data, "sha256:" + hashlib.sha256(data).hexdigest())
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    step = 128 << 10
    for offset in range(0, 4 * CHUNK, step):
        blob.pread(offset, step)
    settle(blob)
    blob.close()
    assert sum(length for _, length in source.reads) <= 8 * CHUNK, sorted(source.reads)


def test_random_reads_fetch_nothing_ahead(tmp_path: Path) -> None:
    source = Counting()
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    for index in (3, 0, 4, 1):
        blob.pread(index * CHUNK + 5, 10)
    blob.close()
    assert sorted(source.reads) == [(i * CHUNK, CHUNK) for i in (0, 1, 3, 4)]


def test_a_failed_fetch_reaches_the_reader_and_is_tried_again(tmp_path: Path) -> None:
    source = Counting()
    fail = [True]
    real = source.read

    def flaky(offset: int, length: int) -> bytes:
        if fail[0]:
            raise ConnectionError("registry down")
        return real(offset, length)

    source.read = flaky  # type: ignore[method-assign]
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    with pytest.raises(ConnectionError):
        blob.pread(0, 10)
    fail[0] = False
    assert blob.pread(0, 10) == DATA[:10]
    blob.close()


def test_the_cache_directory_must_be_private(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir(mode=0o755)
    os.chmod(tmp_path / "c", 0o755)
    with pytest.raises(UsageError, match="not a private directory"):
        BlockCache(tmp_path / "c", 64 * CHUNK)
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="not a private directory"):
        BlockCache(tmp_path / "link", 64 * CHUNK)


@pytest.mark.parametrize("written, size", [
    (None, config.BLOCK_CACHE_SIZE), ("block-cache-size = 134217728", 128 << 20),
    ('block-cache-size = "8G"', 8 << 30), ('block-cache-size = "512MiB"', 512 << 20),
    ('block-cache-size = "1T"', 1 << 40)])  # fmt: skip
def test_block_cache_size_setting(
    written: str | None, size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(tmp_path / "config.toml"))
    if written is not None:
        (tmp_path / "config.toml").write_text(written + "\n")
    assert config.block_cache_size() == size


@pytest.mark.parametrize("written", ['"lots"', "true", "1024", '"-5G"', '"8 G"', "[1]"])
def test_block_cache_size_refused(
    written: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRYPTLAYER_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text(f"block-cache-size = {written}\n")
    with pytest.raises(UsageError, match="block-cache-size"):
        config.block_cache_size()


def test_a_sequential_read_fetches_each_chunk_once_in_few_requests(tmp_path: Path) -> None:
    """Read-ahead asks for runs of chunks in one range request each (before: one request per
    chunk, each costing the registry and the server a few milliseconds of CPU): the same bytes
    fetched, each once, in fewer requests; and a run that fails fails each of its chunks, which
    a later read fetches again."""
    data = os.urandom(40 * CHUNK + 4321)
    source = Counting(data, "sha256:" + hashlib.sha256(data).hexdigest())
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    step = 128 << 10
    for offset in range(0, len(data), step):
        assert blob.pread(offset, min(step, len(data) - offset)) == data[offset : offset + step]
    settle(blob)
    blob.close()
    spans = sorted(source.reads)
    assert sum(length for _, length in spans) == len(data)  # each byte once, none past the end
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))
    assert all(offset % CHUNK == 0 for offset, _ in spans)
    # runs of 4 at the full window, single chunks while it grows (1, 2, 3, ... chunks read in
    # a row); before: 41, one per chunk
    assert len(spans) <= 18, spans
    assert max(length for _, length in spans) <= blockcache.READAHEAD_MAX * CHUNK


def test_a_failed_run_fails_its_chunks_and_they_are_fetched_again(tmp_path: Path) -> None:
    class Failing(Counting):
        fail = True

        def read(self, offset: int, length: int) -> bytes:
            if self.fail and length > CHUNK:
                raise OSError("the registry went away")
            return super().read(offset, length)

    source = Failing()
    blob = CachedBlob(BlockCache(tmp_path / "c", 64 * CHUNK), source)
    blob.pread(0, CHUNK)
    blob.pread(CHUNK, CHUNK)  # read ahead: chunks 2-4 in one request, which fails
    blob.pool.shutdown(wait=True)  # (the run is over)
    assert blob.inflight == {}
    assert (CHUNK, CHUNK) in source.reads and not any(o > CHUNK for o, _ in source.reads)
    source.fail = False
    source.reads.clear()
    assert blob.pread(3 * CHUNK + 5, 10) == DATA[3 * CHUNK + 5 : 3 * CHUNK + 15]
    blob.close()
    assert (3 * CHUNK, CHUNK) in source.reads
