"""Lazy layers (docs/lazy.md): each layer blob of an image fetched for a lazy start is a kernel
NBD device whose reads a server process of ours answers from the registry (through the node's
block cache); layers.py puts dm-verity and dm-crypt over the device where it would use a loop
device over the layer file.

The server process is started here, by command (the runtime does not import the distribution
package: `LazyLayers` says what to run and what to tell it), with one end of a socketpair per
layer; the other end goes to the kernel (tools/nbd.py). Each is a step of the image's opening:
FETCHED (the directory of fetched files, removed whole), SERVER (pid and start time: never a
reused pid), NBD (the device index), so a teardown, `stop` or a release after a crash undoes
them in reverse: devices detached, then the server killed, then the directory removed. The
server also ends by itself when its last device is detached, and when its parent dies before
the devices were attached (its socket ends are closed then).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from cryptlayer.errors import CryptlayerError
from cryptlayer.runtime.journal import Journal, Kind, acquire
from cryptlayer.tools import nbd

SERVER_LOG = "server.log"  # beside the fetched image: the server's complaints (reads that failed)
DETACH_WAIT = 10.0  # seconds for the kernel to let go of a device after NBD_CMD_DISCONNECT


@dataclass(frozen=True)
class LazyLayers:
    """An image fetched for a lazy start (distribution/lazy.py), and how to serve its layers."""

    work: Path  # the private directory holding the fetched image; removed at teardown
    blobs: list[tuple[str, int]]  # each layer's blob digest and size, bottom first
    command: list[str]  # the server process's argv
    config: Callable[[list[int]], bytes]  # its standard input, given its sockets' descriptors


def start_time(pid: int) -> str:
    """Process `pid`'s start time (field 22 of /proc/PID/stat), "" if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def _spawn(lazy: LazyLayers, ends: list[socket.socket]) -> str:
    fds = [s.fileno() for s in ends]
    log = os.open(lazy.work / SERVER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                  0o600)  # fmt: skip
    try:
        process = subprocess.Popen(
            lazy.command, stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=fds,
            start_new_session=True,  # a Ctrl-C at the terminal is the CLI's, not the server's
        )  # fmt: skip
    finally:
        os.close(log)
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(lazy.config(fds))
    return f"{process.pid}:{start_time(process.pid)}"


def serve(stack: ExitStack, opening: Journal, lazy: LazyLayers) -> list[socket.socket]:
    """Start the server for every layer of `lazy`; returns the kernel's ends of its sockets, for
    the caller to close once each is attached (the kernel holds its own reference then)."""
    acquire(stack, opening, Kind.FETCHED, str(lazy.work), lambda: None)
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    for _ in lazy.blobs:
        kernel_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.append(kernel_end)
        theirs.append(server_end)
    try:
        acquire(stack, opening, Kind.SERVER, str(lazy.work), lambda: _spawn(lazy, theirs))
    finally:
        for sock in theirs:
            sock.close()
    return ours


def attach(stack: ExitStack, opening: Journal, sock: socket.socket, size: int, name: str) -> str:
    """An NBD device over `sock` (served by the server), as a step of `opening`; its node."""
    return acquire(stack, opening, Kind.NBD, name,
                   lambda: nbd.device(nbd.connect(sock.fileno(), size, name)))  # fmt: skip


def detach(device: str) -> None:
    """Detach NBD `device` and wait until the kernel has let go of it."""
    index = int(device.removeprefix("/dev/nbd"))
    nbd.disconnect(index)
    deadline = time.monotonic() + DETACH_WAIT
    while nbd.connected(index):
        if time.monotonic() > deadline:
            raise CryptlayerError(f"{device} is still attached after NBD_CMD_DISCONNECT",
                                  "see dmesg; then run `cryptlayer gc`")  # fmt: skip
        time.sleep(0.05)


def kill_server(identity: str) -> None:
    """SIGKILL the server `identity` ("PID:START") if that very process still runs, and reap it
    if it is our child."""
    pid_text, _, started = identity.partition(":")
    if not pid_text.isdigit():
        return
    pid = int(pid_text)
    if not started or start_time(pid) != started:
        return  # gone, or the pid is another process's by now
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + DETACH_WAIT
    while start_time(pid) == started and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not ours (a `stop` after `start`, an engine's delete)
            if _state(pid) == "Z":
                return  # dead; its parent (init, an engine's subreaper) reaps it
        time.sleep(0.05)


def _state(pid: int) -> str:
    """Process `pid`'s state letter (field 3 of /proc/PID/stat), "" if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]
