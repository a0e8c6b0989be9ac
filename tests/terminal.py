"""A real pseudo-terminal for the tests that type a passphrase (both tiers)."""

from __future__ import annotations

import os
import pty
import select
import time


def in_pty(argv: list[str], answers: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run argv on a pseudo-terminal, typing each answer after each prompt; (status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execv(argv[0], argv)
    seen, pending = b"", list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child has gone
                    break
                if not chunk:
                    break
                seen += chunk
            if pending and seen.rstrip().endswith(b":"):
                time.sleep(0.2)  # echo goes off just after the prompt is written
                os.write(fd, pending.pop(0).encode() + b"\n")
                seen += b"|"
        else:
            os.kill(pid, 9)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")
