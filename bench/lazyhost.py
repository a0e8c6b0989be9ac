"""Figure 14's sequential read on the host (no device-mapper, no kernel NBD): a blob in Debian's
docker-registry on 127.0.0.1, served by nbdserver over a socketpair through blockcache and
blobrange as the lazy server serves it, read by a Python NBD client the way the kernel reads a
file in order (128 KiB requests, a few in flight), cold cache; against reading the same bytes
from a file. Usage: lazyhost.py [--mib 128] [--depth 4] [--request 131072] [--random N]
(--random: N 4 KiB reads at random places instead, to count what they fetch)."""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

from common import registry_blob

from cryptlayer.distribution import blockcache, nbdserver
from cryptlayer.distribution.blobrange import BlobRanges


def _children_cpu() -> float:
    """CPU seconds of this process's children so far (the registry: it serves every range)."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[-1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def client(sock: socket.socket, requests: list[tuple[int, int]], depth: int) -> int:
    """Send `requests` keeping `depth` in flight; the bytes read."""
    sent = threading.Semaphore(depth)
    done = 0
    lengths: dict[int, int] = {}

    def receive() -> None:
        nonlocal done
        for _ in requests:
            head = b""
            while len(head) < 16:
                head += sock.recv(16 - len(head))
            _magic, error, cookie = struct.unpack(">IIQ", head)
            assert error == 0, error
            left = lengths.pop(cookie)
            while left:
                got = sock.recv_into(buffer, min(left, len(buffer)))
                left -= got
                done += got
            sent.release()

    buffer = bytearray(1 << 20)
    reader = threading.Thread(target=receive)
    reader.start()
    for cookie, (offset, length) in enumerate(requests):
        sent.acquire()
        lengths[cookie] = length
        sock.sendall(struct.pack(">IHHQQI", nbdserver.REQUEST_MAGIC, 0, nbdserver.CMD_READ,
                                 cookie, offset, length))  # fmt: skip
    reader.join()
    sock.sendall(struct.pack(">IHHQQI", nbdserver.REQUEST_MAGIC, 0, nbdserver.CMD_DISC, 0, 0, 0))
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--request", type=int, default=128 << 10)
    parser.add_argument("--random", type=int, default=0)
    args = parser.parse_args()
    with registry_blob(args.mib << 20) as (tmp, reg, _, digest, data):
        blob = tmp / "blob"
        size = len(data)
        if args.random:
            rng = random.Random(1)
            requests = [(rng.randrange(size // 4096) * 4096, 4096) for _ in range(args.random)]
        else:
            requests = [(o, min(args.request, size - o)) for o in range(0, size, args.request)]
        # The file, read the same way (page cache warm: the registry's copy is warm too).
        began = time.monotonic()
        with open(blob, "rb", buffering=0) as f:
            for offset, length in requests:
                os.pread(f.fileno(), length, offset)
        file_s = time.monotonic() - began
        cache = blockcache.BlockCache(tmp / "cache", 4 * size + (64 << 20))
        ranges = BlobRanges(reg, digest, size)
        cached = blockcache.CachedBlob(cache, ranges)
        ours, theirs = socket.socketpair()
        server = threading.Thread(target=nbdserver.serve, args=(theirs, cached),
                                  kwargs={"handshake": False})  # fmt: skip
        server.start()
        began, cpu, theirs_cpu = time.monotonic(), time.process_time(), _children_cpu()
        read = client(ours, requests, args.depth)
        lazy_s, cpu = time.monotonic() - began, time.process_time() - cpu
        theirs_cpu = _children_cpu() - theirs_cpu
        server.join()
        cached.close()
        fetched = sum(p.stat().st_size for p in (tmp / "cache").rglob("0*") if p.is_file())
        mib = read / (1 << 20)
        each = 4096 if args.random else args.request
        print(f"{args.mib} MiB blob, {len(requests)} reads of {each} B, depth {args.depth}:")
        print(f"  lazy cold {lazy_s:.2f} s ({mib / lazy_s:.1f} MiB/s; CPU here {cpu:.2f} s,"
              f" the registry's {theirs_cpu:.2f} s),"
              f" the file {file_s:.3f} s ({mib / file_s:.0f} MiB/s)")  # fmt: skip
        print(f"  fetched {fetched / (1 << 20):.1f} MiB in {ranges.requests} requests"
              f" for {mib:.1f} MiB read")  # fmt: skip


if __name__ == "__main__":
    main()
