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
READAHEAD_MAX = 8  # chunks fetched ahead of a sequential reader, the window growing up to it
# Read-ahead asks for consecutive chunks in one range request, once half the window is due (up
# to READAHEAD_MAX chunks: 8 MiB): each request costs the registry and us a fixed few
# milliseconds on the host's CPU (~50x that emulated), as much as fetching 1-2 MiB (bench/
# lazyhost.py). It fetches the same chunks as one request each would: only fewer requests.
IN_ORDER = 512 << 10  # a read this close to where the last one ended counts as sequential
FETCHERS = 4  # read-ahead requests in flight at once, per blob
LOW_WATER = 0.9  # eviction goes down to this share of the limit, so that it runs seldom
RESCAN_EVERY = 64  # chunks stored between two looks at what other processes stored
TOUCH_EVERY = 60.0  # seconds: a chunk's use time (its mtime) is updated at most this often
STALE_TEMP = paths.CACHE_TEMP_STALE  # a temporary chunk file this old: its writer died
TEMP_PREFIX = paths.CACHE_TEMP_PREFIX
PRIVATE_KEPT = 16  # private chunks (an erased image's header: CachedBlob) kept in memory

Piece = bytes | memoryview  # a chunk as fetched: one request's bytes, or a slice of a run's


class Source(Protocol):
    """What a chunk is fetched from: blobrange.BlobRanges, or a test's."""

    digest: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


def chunk_length(size: int, index: int) -> int:
    """How long chunk `index` of a blob of `size` bytes is (the last one may be short)."""
    return max(0, min(CHUNK, size - index * CHUNK))


def _drop(path: Path) -> None:
    """Remove what is under a chunk's name that is not the chunk (a directory too)."""
    try:
        path.unlink(missing_ok=True)
    except IsADirectoryError:
        import shutil  # (seldom: the lazy server does not import it, with bz2 and lzma, to start)

        shutil.rmtree(path, ignore_errors=True)


class BlockCache:
    """The cache directory `root` (made private if absent), bounded to `limit` bytes."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.lock = threading.Lock()
        self.touched: dict[Path, float] = {}
        self.stored = 0
        self.added = 0  # bytes this object ever stored: what a scan under way may not have seen
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Its parent ($CRYPTLAYER_ROOT) too: one another user may change could have our
        # directory renamed away after the check below and theirs (or a symlink) put in its place.
        up = os.stat(root.parent)
        if up.st_uid not in (0, os.geteuid()) or (
            up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX
        ):
            raise UsageError(f"block cache {root} is in {root.parent}, which others may change"
                             f" (owner uid {up.st_uid}, mode {stat.S_IMODE(up.st_mode):04o})",
                             "set CRYPTLAYER_ROOT to a directory only root can write")  # fmt: skip
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise UsageError(f"block cache {root} is not a private directory of ours",
                             "remove it; cryptlayer makes it (mode 0700)")  # fmt: skip
        self.used = self._evict(self.limit)

    def path(self, digest: str, index: int) -> Path:
        if not oci.is_digest(digest):  # a path component: never anything else
            raise ValueError(f"{digest!r} is not a digest")
        return paths.cached_blob_dir(digest, self.root) / f"{index:08x}"

    def get(self, digest: str, index: int, length: int, start: int = 0,
            size: int | None = None) -> bytes | None:  # fmt: skip
        """Bytes [start, start + size) (default: all) of chunk `index` of blob `digest` if the
        cache has the chunk whole (`length` bytes), else None (one of another length, such as a
        file system's after a power cut, is removed). Only the range is read: an NBD request of
        4 KiB costs a 4 KiB read, not the chunk's 1 MiB."""
        size = length - start if size is None else size
        path = self.path(digest, index)
        # O_NONBLOCK: a FIFO under a chunk's name is opened at once (and dropped), not waited on
        # for a writer. The cache is not trusted: whatever is there that is not the chunk goes.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:  # a symbolic link (ELOOP), or what else is not a chunk: fetched again
            _drop(path)
            return None
        try:
            st = os.fstat(fd)
            whole = stat.S_ISREG(st.st_mode) and st.st_size == length
            data = os.pread(fd, size, start) if whole else b""
            # Dropped meanwhile (`drop` unlinks a chunk before it overwrites it): what was read
            # may be part zeros. Fetched again instead.
            if os.fstat(fd).st_nlink == 0:
                return None
        finally:
            os.close(fd)
        if not whole or len(data) != size:
            _drop(path)
            return None
        now = time.time()
        if now - self.touched.get(path, 0.0) > TOUCH_EVERY:
            self.touched[path] = now
            with suppress(FileNotFoundError):  # evicted meanwhile: what was read is whole
                os.utime(path, (now, now), follow_symlinks=False)
        return data

    def has(self, digest: str, index: int, length: int) -> bool:
        """Whether the cache has chunk `index` of blob `digest` whole (`length` bytes), as far as
        its name and size tell: what read-ahead skips, without reading it."""
        try:
            st = os.lstat(self.path(digest, index))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == length

    def put(self, digest: str, index: int, data: bytes | memoryview) -> None:
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
            self.added += len(data)
            due = self.used > self.limit or self.stored % RESCAN_EVERY == 0
            mark = self.added
        if due:
            used = self._evict(int(self.limit * LOW_WATER) if self.used > self.limit else None)
            with self.lock:
                # Plus what other threads stored since: the scan may have missed those chunks
                # (counted twice if it saw them: too many only evicts a scan early).
                self.used = used + self.added - mark

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
    sequential reads start fetches of the chunks after them once a chunk's worth has been read in
    a row, as many chunks ahead as have been read in a row, up to READAHEAD_MAX; those start before
    the reader's own fetch, and go out as one range request per run of consecutive chunks, once
    half the window is due."""

    def __init__(self, cache: BlockCache, source: Source, private: int = 0) -> None:
        self.cache = cache
        self.source = source
        self.digest = source.digest
        self.size = source.size
        # Chunks overlapping bytes [0, private) (an erased image's LUKS header: docs/lazy.md)
        # never touch the cache: fetched, and kept in memory only (up to PRIVATE_KEPT of them).
        self.private = -(-private // CHUNK)
        self.kept: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.inflight: dict[int, Future[Piece]] = {}
        self.pool = ThreadPoolExecutor(max_workers=FETCHERS, thread_name_prefix="readahead")
        self.count = -(-self.size // CHUNK)
        self.present: set[int] = set()  # chunks seen in the cache (read-ahead skips them)
        self.end = -1  # where the last read ended (bytes)
        self.streak = 0  # bytes read in a row up to it

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
            # Sequential: it starts where the last read ended (give or take the few requests the
            # kernel has in flight, which threads may answer in another order). The window grows
            # with the bytes read in a row, not with the count of reads: small reads here and
            # there in one chunk (a mount's metadata, small files) fetch nothing ahead.
            sequential = abs(offset - self.end) <= IN_ORDER
            self.streak = self.streak + length if sequential else length
            self.end = max(self.end, offset + length) if sequential else offset + length
            # Never more ahead than has been read in a row: a stream that stops (a file's end)
            # has at most as much again fetched for nothing (doubling the window per chunk, a
            # 4 MiB stream read whole fetched 10 chunks).
            window = min(READAHEAD_MAX, self.streak // CHUNK)
            ahead = range(last + 1, min(last + 1 + window, self.count))
        if ahead:  # first: its requests go out while this read waits on its own chunk
            self._read_ahead(ahead, max(1, window // 2))
        parts = []
        for index in range(first, last + 1):
            at = max(offset, index * CHUNK) - index * CHUNK
            upto = min(offset + length, (index + 1) * CHUNK) - index * CHUNK
            part = self._cached(index, chunk_length(self.size, index), at, upto - at)
            parts.append(self.chunk(index)[at:upto] if part is None else part)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, ahead: range, due: int) -> None:
        """Fetch the chunks of `ahead` that are neither cached nor on their way, once `due` of
        them are (or the blob's last is among them), a run of consecutive ones per request."""
        with self.lock:
            wanted = [i for i in ahead if i not in self.inflight and i not in self.present]
        wanted = [i for i in wanted if i < self.private
                  or not self._has(i)]  # fmt: skip
        if not wanted or (len(wanted) < due and wanted[-1] != self.count - 1):
            return
        runs: list[list[int]] = []
        with self.lock:
            for index in wanted:
                if index in self.inflight:
                    continue
                self.inflight[index] = Future()
                if (runs and runs[-1][-1] == index - 1 and index >= self.private
                        and len(runs[-1]) < READAHEAD_MAX):  # fmt: skip
                    runs[-1].append(index)
                else:
                    runs.append([index])
            futures = [[self.inflight[i] for i in run] for run in runs]
        for run, run_futures in zip(runs, futures, strict=True):
            try:
                self.pool.submit(self._load_run, run, run_futures)
            except RuntimeError:  # closed
                for index, future in zip(run, run_futures, strict=True):
                    self._deliver(index, future, RuntimeError("the server is closing"))

    def _has(self, index: int) -> bool:
        if self.cache.has(self.digest, index, chunk_length(self.size, index)):
            with self.lock:
                self.present.add(index)
            return True
        return False

    def _load_run(self, run: list[int], futures: list[Future[Piece]]) -> None:
        """Fetch chunks `run` (consecutive) in one request, and store each."""
        if len(run) == 1 or run[0] < self.private:
            for index, future in zip(run, futures, strict=True):
                self._load(index, future)
            return
        start = run[0] * CHUNK
        try:
            data = memoryview(self.source.read(start, min(len(run) * CHUNK, self.size - start)))
        except BaseException as err:
            for index, future in zip(run, futures, strict=True):
                self._deliver(index, future, err)
            return
        for k, (index, future) in enumerate(zip(run, futures, strict=True)):
            self._deliver(index, future, data[k * CHUNK : (k + 1) * CHUNK], store=True)

    def chunk(self, index: int) -> Piece:
        length = chunk_length(self.size, index)
        found = self._cached(index, length)
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

    def _cached(self, index: int, length: int, start: int = 0,
                size: int | None = None) -> bytes | None:  # fmt: skip
        if index < self.private:
            with self.lock:
                kept = self.kept.get(index)
            return None if kept is None else kept[start : None if size is None else start + size]
        found = self.cache.get(self.digest, index, length, start, size)
        with self.lock:
            (self.present.add if found is not None else self.present.discard)(index)
        return found

    def _load(self, index: int, future: Future[Piece]) -> None:
        try:
            length = chunk_length(self.size, index)
            data = self._cached(index, length)
            if data is not None:
                self._deliver(index, future, data)
                return
            fetched = self.source.read(index * CHUNK, length)
        except BaseException as err:
            self._deliver(index, future, err)
            return
        self._deliver(index, future, fetched, store=True)

    def _deliver(self, index: int, future: Future[Piece], data: Piece | BaseException,
                 store: bool = False) -> None:  # fmt: skip
        """Hand chunk `index` (or the error that kept it) to whoever awaits it, then, if `store`,
        put it in the cache (or, below `private`, in memory): the reader does not wait for the
        write and its fsync, and the chunk stays in flight until stored, so nobody fetches it
        again meanwhile. A chunk the cache cannot store (a full disk) is served all the same."""
        try:
            if isinstance(data, BaseException):
                future.set_exception(data)
                return
            future.set_result(data)
            if not store:
                return
            if index < self.private:
                with self.lock:
                    if len(self.kept) < PRIVATE_KEPT:
                        self.kept[index] = bytes(data)
                return
            with suppress(OSError):
                self.cache.put(self.digest, index, data)
                with self.lock:
                    self.present.add(index)
        finally:
            with self.lock:
                self.inflight.pop(index, None)


def drop(cache: BlockCache, digest: str, start: int, end: int) -> int:
    """Remove from `cache` every chunk of blob `digest` that overlaps bytes [start, end); returns
    how many were removed. Generic: an erase drops a layer's LUKS header this way (docs/lazy.md).

    Each chunk is moved aside (a chunk stored under its name meanwhile is another one's, and
    kept), unlinked, then overwritten with zeros in place and synced, so that its blocks do not
    go back to the file system's free space with their bytes in them (what such a file system
    keeps anyway, copy-on-write or flash, is hostcheck.erase_caveat's warning). A reader that
    opened it before is not served the zeros: `get` sees it was unlinked and fetches again. A
    temporary file of such a chunk whose writer is gone goes the same way; a live writer's is
    left to it. Under the cache's lock, so that no eviction removes a chunk moved aside."""
    if end <= start:
        return 0
    where = cache.path(digest, 0).parent
    indices = range(max(0, start) // CHUNK, -(-end // CHUNK))
    dropped = 0
    fd = os.open(cache.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            names = os.listdir(where)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        now = time.time()
        for name in names:
            if name.startswith(TEMP_PREFIX):  # .tmp-INDEX-PID-TID, or .tmp-drop-PID-TID
                index_text, _, writer = name.removeprefix(TEMP_PREFIX).partition("-")
                if index_text == "drop":  # a drop cut short (none runs now: we hold the lock)
                    _wipe(where / name)
                    continue
                if _alive(writer.partition("-")[0], where / name, now):
                    continue  # a live writer's: left to it (renamed to a chunk or removed)
            else:
                index_text = name
            if len(index_text) != 8 or not all(c in "0123456789abcdef" for c in index_text):
                continue
            if int(index_text, 16) not in indices:
                continue
            aside = where / f"{TEMP_PREFIX}drop-{os.getpid()}-{threading.get_ident()}"
            try:
                os.rename(where / name, aside)
            except FileNotFoundError:  # evicted, or renamed by its writer, meanwhile
                continue
            size = _wipe(aside)
            if not name.startswith(TEMP_PREFIX):
                dropped += 1
                with cache.lock:
                    cache.used = max(0, cache.used - size)
                cache.touched.pop(where / name, None)
        return dropped
    finally:
        os.close(fd)


def _alive(pid: str, path: Path, now: float) -> bool:
    """Whether the writer of temporary chunk file `path` (process `pid`) may still write it."""
    try:
        if now - os.lstat(path).st_mtime > STALE_TEMP or not pid.isdigit():
            return False
        os.kill(int(pid), 0)
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process: not ours to judge
        return True
    return True


def _wipe(path: Path) -> int:
    """Unlink `path` (a chunk moved aside), then overwrite its bytes with zeros and sync them;
    its size (0 if it is gone already)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        os.unlink(path)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            zeros = bytes(min(st.st_size, CHUNK))
            for offset in range(0, st.st_size, len(zeros) or 1):
                os.pwrite(fd, zeros[: st.st_size - offset], offset)
            os.fsync(fd)
        return st.st_size
    finally:
        os.close(fd)
