"""The node's cache of lazily read layer blobs (docs/lazy.md): ciphertext only, by blob digest,
in chunks of CHUNK bytes; shared by every container and server that reads the same blob, kept
across starts, bounded (the least recently used chunks go first, down to a byte limit from
config.toml), and safe against crashes: a chunk is written to a temporary file, synced, and
renamed to its name, so a chunk under its name is whole, and one of another length than its
place in the blob gives is dropped and fetched again.

Nothing here checks a chunk's content: its hash is not known in advance (the manifest has the
blob's digest, the statement the verity root; neither names a chunk's). dm-verity above the
block device checks every 4 KiB block the kernel reads against the signed root hash, so a chunk
changed in the registry, on the way or in this directory reads as an I/O error, never as
different data; what is cached is ciphertext, so it tells no one what the layer holds."""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Protocol

from cryptlayer import oci, paths
from cryptlayer.errors import UsageError

# 1 MiB: a registry's round trip (20 ms on the shaped link) is ~20% of the time to send
# 1 MiB at 100 Mbit/s (84 ms), so a chunk's fetch is mostly transfer, not waiting; 64 KiB would
# be 80% waiting, and 4 MiB would fetch up to 4 MiB for one 4 KiB block of a small file read at
# random. It is also wire.CHUNK, the unit a pull streams in. Measured in the benchmark.
CHUNK = 1 << 20
READAHEAD_MAX = 8  # chunks fetched ahead of a sequential reader, the window doubling up to it
FETCHERS = 4  # read-ahead requests in flight at once, per blob
LOW_WATER = 0.9  # eviction goes down to this share of the limit, so that it runs seldom
RESCAN_EVERY = 64  # chunks stored between two looks at what other processes stored
TOUCH_EVERY = 60.0  # seconds: a chunk's use time (its mtime) is updated at most this often
STALE_TEMP = paths.CACHE_TEMP_STALE  # a temporary chunk file this old: its writer died
TEMP_PREFIX = paths.CACHE_TEMP_PREFIX


class Source(Protocol):
    """What a chunk is fetched from: blobrange.BlobRanges, or a test's."""

    digest: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


def chunk_length(size: int, index: int) -> int:
    """How long chunk `index` of a blob of `size` bytes is (the last one may be short)."""
    return max(0, min(CHUNK, size - index * CHUNK))


class BlockCache:
    """The cache directory `root` (made private if absent), bounded to `limit` bytes."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.lock = threading.Lock()
        self.touched: dict[Path, float] = {}
        self.stored = 0
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise UsageError(f"block cache {root} is not a private directory of ours",
                             "remove it; cryptlayer makes it (mode 0700)")  # fmt: skip
        self.used = self._evict(self.limit)

    def path(self, digest: str, index: int) -> Path:
        if not oci.is_digest(digest):  # a path component: never anything else
            raise ValueError(f"{digest!r} is not a digest")
        return paths.cached_blob_dir(digest, self.root) / f"{index:08x}"

    def get(self, digest: str, index: int, length: int) -> bytes | None:
        """Chunk `index` of blob `digest` if the cache has it whole (`length` bytes), else None
        (one of another length, such as a file system's after a power cut, is removed)."""
        path = self.path(digest, index)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            data = os.pread(fd, length + 1, 0) if stat.S_ISREG(st.st_mode) else b""
        finally:
            os.close(fd)
        if len(data) != length:
            path.unlink(missing_ok=True)
            return None
        now = time.time()
        if now - self.touched.get(path, 0.0) > TOUCH_EVERY:
            self.touched[path] = now
            with suppress(FileNotFoundError):  # evicted meanwhile: what was read is whole
                os.utime(path, (now, now), follow_symlinks=False)
        return data

    def put(self, digest: str, index: int, data: bytes) -> None:
        """Store chunk `index` of blob `digest`: written beside its name, synced, renamed, so that
        no crash leaves part of it under its name; then the bound is kept."""
        path = self.path(digest, index)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.parent / f"{TEMP_PREFIX}{index:08x}-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)  # fmt: skip
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # Synced before the rename: after a power cut a chunk is whole or absent (or, on a
            # file system that keeps the name but not the data, short: dropped by get()).
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        # Its use time from the clock time.time() reads, as get() sets it: the file system's own
        # stamp comes from a coarser clock, so two chunks written within one tick would tie
        # (and the least recently used could not be told), or sort before a touched one.
        now = time.time()
        os.utime(fd, (now, now))
        os.close(fd)
        os.rename(tmp, path)
        with self.lock:
            self.used += len(data)
            self.stored += 1
            due = self.used > self.limit or self.stored % RESCAN_EVERY == 0
        if due:
            used = self._evict(int(self.limit * LOW_WATER) if self.used > self.limit else None)
            with self.lock:
                self.used = used

    def _evict(self, down_to: int | None) -> int:
        """Scan the cache (under its lock, shared by every process using it): remove temporary
        files of writers that died and, if more than `down_to` bytes are cached, the least
        recently used chunks until no more are; the bytes left."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            chunks: list[tuple[float, int, Path]] = []
            now = time.time()
            top = paths.cached_blobs_dir(self.root)
            for blob in top.iterdir() if top.is_dir() else ():
                try:
                    entries = list(os.scandir(blob))
                except NotADirectoryError:
                    continue
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # evicted or renamed by another process meanwhile
                        continue
                    if entry.name.startswith(TEMP_PREFIX):
                        if now - st.st_mtime > STALE_TEMP:
                            Path(entry.path).unlink(missing_ok=True)
                    elif stat.S_ISREG(st.st_mode):
                        chunks.append((st.st_mtime, st.st_size, Path(entry.path)))
            total = sum(size for _, size, _ in chunks)
            if down_to is not None and total > down_to:
                for _, size, path in sorted(chunks, key=lambda c: c[0]):
                    path.unlink(missing_ok=True)
                    self.touched.pop(path, None)
                    total -= size
                    if total <= down_to:
                        break
            return total
        finally:
            os.close(fd)


class CachedBlob:
    """One blob read through the cache: what the NBD server serves. A chunk missing from the cache
    is fetched by the reader's own thread (or awaited, if a read-ahead fetches it already);
    sequential reads start fetches of the chunks after them, the window doubling up to
    READAHEAD_MAX."""

    def __init__(self, cache: BlockCache, source: Source) -> None:
        self.cache = cache
        self.source = source
        self.digest = source.digest
        self.size = source.size
        self.lock = threading.Lock()
        self.inflight: dict[int, Future[bytes]] = {}
        self.pool = ThreadPoolExecutor(max_workers=FETCHERS, thread_name_prefix="readahead")
        self.next = -1  # the chunk a sequential reader reads next
        self.window = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of the blob (RegistryError if they cannot be had)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} of a blob of {self.size} bytes")
        if length == 0:
            return b""
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        with self.lock:
            sequential = first in (self.next - 1, self.next)
            self.window = min(max(1, self.window * 2), READAHEAD_MAX) if sequential else 0
            self.next = last + 1
            ahead = range(last + 1, min(last + 1 + self.window, -(-self.size // CHUNK)))
        parts = [self.chunk(i) for i in range(first, last + 1)]
        for index in ahead:
            self.prefetch(index)
        data = b"".join(parts)
        start = offset - first * CHUNK
        return data[start : start + length]

    def chunk(self, index: int) -> bytes:
        length = chunk_length(self.size, index)
        found = self.cache.get(self.digest, index, length)
        if found is not None:
            return found
        with self.lock:
            future = self.inflight.get(index)
            mine = future is None
            if future is None:
                future = self.inflight[index] = Future()
        if not mine:
            return future.result()
        self._load(index, future)
        return future.result()

    def prefetch(self, index: int) -> None:
        with self.lock:
            if index in self.inflight:
                return
            future: Future[bytes] = Future()
            self.inflight[index] = future
        try:
            self.pool.submit(self._load, index, future)
        except RuntimeError:  # closed
            self._settle(index, future, lambda: b"")

    def _load(self, index: int, future: Future[bytes]) -> None:
        def fetch() -> bytes:
            length = chunk_length(self.size, index)
            data = self.cache.get(self.digest, index, length)
            if data is None:
                data = self.source.read(index * CHUNK, length)
                self.cache.put(self.digest, index, data)
            return data

        self._settle(index, future, fetch)

    def _settle(self, index: int, future: Future[bytes], fetch: Callable[[], bytes]) -> None:
        try:
            future.set_result(fetch())
        except BaseException as err:
            future.set_exception(err)
        finally:
            with self.lock:
                self.inflight.pop(index, None)
