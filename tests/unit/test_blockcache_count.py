"""The block cache's count of its bytes (blockcache.py), which decides when to evict: a chunk
stored by another thread while a scan is under way is counted, so one server alone never leaves
more than the limit cached (docs/lazy.md: only other servers' chunks may exceed it between
scans)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cryptlayer.distribution import blockcache
from cryptlayer.distribution.blockcache import CHUNK, BlockCache

DIGEST = "sha256:" + "ab" * 32


def _on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "sha256").glob("*/*")
               if not p.name.startswith(blockcache.TEMP_PREFIX))  # fmt: skip


def test_a_chunk_stored_during_a_scan_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    cache = BlockCache(root, 100 * CHUNK)
    scan = cache._evict

    def scan_while_another_stores(down_to: int | None) -> int:
        total = scan(down_to)  # the scan has counted what is there; then, before its count is
        other = threading.Thread(target=cache.put, args=(DIGEST, 99, bytes(CHUNK)))  # kept,
        other.start()  # another thread's fetch stores a chunk
        other.join()
        return total

    monkeypatch.setattr(cache, "_evict", scan_while_another_stores)
    for index in range(blockcache.RESCAN_EVERY):  # the last of these rescans
        cache.put(DIGEST, index, bytes(CHUNK))
    assert _on_disk(root) == (blockcache.RESCAN_EVERY + 1) * CHUNK
    assert cache.used >= _on_disk(root)  # never less: the bound is kept by this count


def test_the_count_lets_no_server_exceed_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk stored during the rescan after RESCAN_EVERY chunks, then chunks up to the limit:
    what is cached stays within it."""
    root = tmp_path / "cache"
    limit = 100 * CHUNK
    cache = BlockCache(root, limit)
    scan = cache._evict
    extra = iter(range(1000, 2000))

    def scan_while_another_stores(down_to: int | None) -> int:
        total = scan(down_to)
        if threading.current_thread() is threading.main_thread():  # not the other's own scan
            other = threading.Thread(target=cache.put, args=(DIGEST, next(extra), bytes(CHUNK)))
            other.start()
            other.join()
        return total

    monkeypatch.setattr(cache, "_evict", scan_while_another_stores)
    for index in range(100):
        cache.put(DIGEST, index, bytes(CHUNK))
        assert _on_disk(root) <= limit, f"after chunk {index}: {_on_disk(root)} bytes cached"
