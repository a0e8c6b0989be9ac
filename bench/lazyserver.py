"""The lazy server's start on the host (figure 14's second Python process): a blob in Debian's
docker-registry on 127.0.0.1, the server started as runtime/lazy.py starts it (its command, its
configuration on standard input, one end of a socketpair inherited), and the time from its
spawn to the answer of the first 4 KiB read (cold cache); the modules it imported by then (-X
importtime, in its log). Usage: lazyserver.py [--runs 5]; LAZYSERVER_LOG=FILE keeps the last
run's log (its import times)."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from common import registry_blob

from cryptlayer.distribution import lazy, nbdserver


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with registry_blob(8 << 20) as (tmp, _, ref, digest, data):
        keep = os.environ.get("LAZYSERVER_LOG")
        remote = lazy.Remote(ref, tls_verify=False)
        times, modules = [], 0
        for run in range(args.runs):
            cache = tmp / "state"
            if cache.exists():
                subprocess.run(["rm", "-rf", str(cache)], check=True)
            ours, theirs = socket.socketpair()
            config = lazy.server_config(remote, [(digest, len(data))], [theirs.fileno()])
            log = tmp / f"log{run}"
            began = time.monotonic()
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-X", "importtime", *lazy.SERVER_COMMAND],
                    stdin=subprocess.PIPE, stdout=out, stderr=out,
                    pass_fds=[theirs.fileno()],
                )  # fmt: skip
            assert process.stdin is not None
            with process.stdin:
                process.stdin.write(config)
            theirs.close()
            ours.sendall(struct.pack(">IHHQQI", nbdserver.REQUEST_MAGIC, 0,
                                     nbdserver.CMD_READ, 1, 4096, 4096))  # fmt: skip
            got = b""
            while len(got) < 16 + 4096:
                got += ours.recv(16 + 4096 - len(got))
            times.append(time.monotonic() - began)
            assert got[16:] == data[4096:8192]
            ours.close()
            process.wait(timeout=30)
            modules = sum(1 for line in log.read_text().splitlines()
                          if line.startswith("import time:") and "|" in line) - 1  # fmt: skip
        print(f"spawn to the first read's answer: median {statistics.median(times):.3f} s"
              f" (of {args.runs}: {', '.join(f'{t:.3f}' for t in times)}); {modules}"
              " modules imported by the server")  # fmt: skip
        top = sorted(((int(line.split("|")[1]), line.split("|")[2].strip())
                      for line in log.read_text().splitlines()
                      if line.startswith("import time:") and "|" in line
                      and line.split("|")[1].strip().isdigit()), reverse=True)  # fmt: skip
        if keep:
            Path(keep).write_text(log.read_text())
        print("largest (cumulative us):", ", ".join(f"{n} {us}" for us, n in top[:12]))


if __name__ == "__main__":
    main()
