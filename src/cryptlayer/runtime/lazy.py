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

Before the opening names it, the directory is its maker's: `work_dir` makes it under the host
lock and holds an flock on it for as long as the maker lives, so `gc` (under the host lock too)
removes one that no journal names only once that lock is free (`remove_if_abandoned`). Its
SOURCE file says which reference and blobs it was fetched from: what a tampered-layer error
names, and whose chunks a verity failure drops from the node's block cache (`after_corruption`;
the cache's layout is paths.py's, so this needs nothing of distribution/).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from cryptlayer import paths
from cryptlayer.errors import CryptlayerError, printable
from cryptlayer.fsutil import read_untrusted, try_lock, write_atomic
from cryptlayer.runtime.journal import Journal, Kind, acquire
from cryptlayer.tools import nbd

SERVER_LOG = "server.log"  # beside the fetched image: the server's complaints (reads that failed)
SOURCE = "source.json"  # beside the fetched image: its reference, and each layer's blob digest
MAX_SOURCE = 64 << 10  # its size at most (a reference and up to 128 digests)
DETACH_WAIT = 10.0  # seconds for the kernel to let go of a device after NBD_CMD_DISCONNECT
BACKEND_PREFIX = "cryptlayer:"  # an NBD device's backend identifier: cryptlayer:OPENING:INDEX


@dataclass(frozen=True)
class LazyLayers:
    """An image fetched for a lazy start (distribution/lazy.py), and how to serve its layers."""

    work: Path  # the private directory holding the fetched image; removed at teardown
    blobs: list[tuple[str, int]]  # each layer's blob digest and size, bottom first
    command: list[str]  # the server process's argv
    config: Callable[[list[int]], bytes]  # its standard input, given its sockets' descriptors
    ref: str = ""  # what it was fetched from (docker://...): what errors name, not `work`
    # A server started already (while the image was fetched, its start overlapping the fetch):
    # given its sockets' descriptors and its log's, hands them to it; its pid, or None if it
    # is gone (then `command` is started, as without one).
    handoff: Callable[[list[int], int], int | None] | None = None
    # Stops that server if it was never handed its sockets (the start failed before its
    # opening); nothing once it was.
    discard: Callable[[], None] | None = None


def backend_name(opening_id: str, index: int) -> str:
    """The backend identifier of layer `index`'s NBD device (/sys/block/nbdN/backend)."""
    return f"{BACKEND_PREFIX}{opening_id}:{index}"


def fetch_parent() -> Path:
    """/run/cryptlayer/.lazy, resolved (the openings name the directories below it so)."""
    return paths.run_root().resolve() / paths.lazy_run_dir().name


@contextmanager
def work_dir() -> Iterator[Path]:
    """A new private directory below fetch_parent() to fetch an image into, locked (flock) until
    the context ends. It is made under the host lock, which `gc` holds while it looks: so gc
    never sees it unlocked while its maker lives, and removes it once the maker died before an
    opening named it (a journal's FETCHED step)."""
    import secrets

    from cryptlayer.runtime import state

    with state.locked():  # (which makes the run root, private)
        parent = fetch_parent()
        parent.mkdir(mode=0o700, exist_ok=True)
        work = parent / secrets.token_hex(8)
        work.mkdir(mode=0o700)
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else can hold it yet
    try:
        yield work
    finally:
        os.close(fd)


def remove_if_abandoned(work: Path) -> bool:
    """Remove fetched directory `work` (one no journal names; called under the host lock) unless
    the process that made it holds its lock still: it is fetching, or will name it in an opening
    when it gets the host lock. Whether it was removed."""
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone, or not a directory of ours
    try:
        if not try_lock(fd):
            return False
        try:
            shutil.rmtree(work)
        except OSError as err:
            raise CryptlayerError(f"cannot remove {work}: {err.strerror}") from None
        return True
    finally:
        os.close(fd)


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
        pid = lazy.handoff(fds, log) if lazy.handoff is not None else None
        if pid is not None:
            return f"{pid}:{start_time(pid)}"
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
    acquire(stack, opening, Kind.FETCHED, str(lazy.work), lambda: _write_source(lazy))
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


def _write_source(lazy: LazyLayers) -> None:
    data = {"ref": lazy.ref, "blobs": [digest for digest, _size in lazy.blobs]}
    write_atomic(lazy.work / SOURCE, json.dumps(data).encode(), 0o600, durable=False)


@dataclass(frozen=True)
class Source:
    """What a lazy opening's image was fetched from."""

    ref: str  # docker://HOST/REPO[:TAG|@DIGEST] ("" if not known)
    blobs: list[str]  # each layer's blob digest, bottom first


def source_of(opening: Journal) -> Source | None:
    """Where the image of `opening` was fetched from (its FETCHED step's SOURCE file); None for
    an image that is not lazy, or a file that is missing or not as _write_source writes it."""
    from cryptlayer import oci  # (a teardown without corruption needs none of this)

    for step in opening.steps:
        if step.kind is not Kind.FETCHED:
            continue
        try:
            data = json.loads(read_untrusted(str(Path(step.ref) / SOURCE), MAX_SOURCE))
        except (OSError, ValueError, CryptlayerError):  # (not a regular file, or too long)
            return None
        if not isinstance(data, dict):
            return None
        ref, blobs = data.get("ref"), data.get("blobs")
        if not isinstance(ref, str) or not isinstance(blobs, list):
            return None
        if not all(isinstance(b, str) and oci.is_digest(b) for b in blobs):
            return None  # each names a directory of the cache: never anything else
        return Source(printable(ref), blobs)
    return None


def after_corruption(opening: Journal, bad: Iterable[int]) -> str | None:
    """Layers `bad` of `opening` failed dm-verity's check: if they are lazy, drop their blobs'
    chunks from the node's block cache (so the next start fetches them again, and verity checks
    them again) and return the reference the image was fetched from, for the error to name;
    None for an image that is not lazy.

    All of a blob's chunks go, not only the one the failing read covered: verity's status says
    that a block of the mapping failed, not which (the block is named only in the kernel's log),
    a blob changed in the registry may differ in more places than were read, and chunks carry
    no hash of their own to tell a good one from a bad one. The cost is fetching again what the
    next start reads of that one blob."""
    source = source_of(opening)
    if source is None:
        return None
    for index in bad:
        if 0 <= index < len(source.blobs):
            drop_cached(source.blobs[index])
    return source.ref or None


def drop_cached(digest: str, root: Path | None = None) -> int:
    """Remove every chunk of blob `digest` from the block cache (`root`, or the node's); how many.
    A writer's temporary file is left: it is renamed whole to its name or not at all, and a
    reader that finds a chunk gone fetches it again."""
    from cryptlayer import oci

    if not oci.is_digest(digest):
        raise ValueError(f"{digest!r} is not a digest")
    try:
        entries = list(os.scandir(paths.cached_blob_dir(digest, root)))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    dropped = 0
    for entry in entries:
        if entry.name.startswith(paths.CACHE_TEMP_PREFIX) or not entry.is_file(
            follow_symlinks=False
        ):
            continue
        with suppress(FileNotFoundError):  # evicted meanwhile
            os.unlink(entry.path)
            dropped += 1
    return dropped
