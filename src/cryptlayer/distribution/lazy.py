"""Lazy start's registry side (docs/lazy.md): the image's small files fetched whole before
anything starts, and the server process that serves each layer blob to the kernel's NBD device.

`fetch` is `pull` (transfer.py: the same work directory, checks and trust) into a private
directory, except for the layer blobs: of those only the LUKS2 header (the statement's `offset`
bytes) is fetched, through the node's block cache, into a sparse file of the layer's size. So
image/opener.py opens the copy as any image (statement digest, --digest, signatures, sizes, the
MAC and every header against the statement), and the runtime attaches an NBD device where it
would attach a loop device over the file; dm-verity over it checks every block. For a start that
erases (no --keep), the headers never reach the node's disk: fetched past the cache (whose copy
of them is dropped), and the server keeps the chunks holding them in memory only.

`python -m cryptlayer.distribution.lazy` is the server: its standard input is one JSON object
(the registry and its options, credentials included: never argv or env) naming, for each layer,
its blob and the descriptor of a socket it inherited; it serves every socket (no handshake: the
kernel was given the size by netlink) and exits when the last one is closed (the device
detached)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cryptlayer import paths
from cryptlayer.distribution.blobrange import BlobRanges
from cryptlayer.distribution.blockcache import CHUNK, BlockCache, CachedBlob, drop
from cryptlayer.distribution.nbdserver import serve
from cryptlayer.distribution.registry import Registry, parse_reference

if TYPE_CHECKING:
    from cryptlayer.image import manifest as manifest_mod

# The server process (main) imports only what serving needs: the fetch's modules (artifact,
# transfer, the image's manifest, envelope, signatures, keys) are imported where they are used,
# not here; under emulation each module costs 20-100 ms of the lazy start
# (tests/unit/test_lazy_imports.py pins it).

MAX_CONFIG = 1 << 20  # the server's standard input


@dataclass(frozen=True)
class Remote:
    """Where an image's layers are read from, as the server process is told (JSON-able)."""

    ref: str
    tls_verify: bool = True
    cert_dir: str | None = None
    authfile: str | None = None
    login: tuple[str, str] | None = None

    def registry(self) -> Registry:
        return Registry(
            parse_reference(self.ref),
            tls_verify=self.tls_verify,
            cert_dir=Path(self.cert_dir) if self.cert_dir else None,
            login=self.login,
            authfile=Path(self.authfile) if self.authfile else None,
        )


def _cache(limit: int | None = None) -> BlockCache:
    """The node's block cache, bounded by `limit` or config.toml's block-cache-size (the server is
    given the bound: it does not import the configuration's modules, tomllib and datetime)."""
    if limit is None:
        from cryptlayer.config import block_cache_size

        limit = block_cache_size()
    return BlockCache(paths.block_cache_dir(), limit)


class _HeadersOnly:
    """pull's Store, except that a layer blob is its header and a hole: the statement names each
    layer's size and header size (`offset`); the header comes through the block cache, or, for
    an image to be erased, straight from the registry after the cache's copy of it is dropped
    (nothing that opens the image is written to the node's disk: docs/lazy.md)."""

    def __init__(self, registry: Registry, erase: bool = False) -> None:
        self.registry = registry
        self.erase = erase
        self.layers: dict[str, int] = {}  # layer blob digest -> header bytes to fetch
        self.digests: dict[str, str] = {}  # file name -> blob digest

    def __str__(self) -> str:
        return str(self.registry)

    def get_manifest(self) -> tuple[bytes, str]:
        from cryptlayer.distribution import artifact

        data, found = self.registry.get_manifest()
        _statement, others = artifact.parse(data, str(self.registry))
        self.digests = {b.name: b.digest for b in others}
        self.layers = {b.digest: 0 for b in others if b.media_type == artifact.LAYER_TYPE}
        return data, found

    def pull_blob(self, digest: str, size: int, out: BinaryIO,
                  progress: Callable[[int], None]) -> None:  # fmt: skip
        if digest not in self.layers:
            self.registry.pull_blob(digest, size, out, progress)
            return
        header = min(size, self.layers[digest])
        out.seek(0)
        out.truncate(0)
        if header and self.erase:
            drop(_cache(), digest, 0, header)
            ranges = BlobRanges(self.registry, digest, size)
            for at in range(0, header, CHUNK):  # (a range is at most blobrange.MAX_RANGE)
                out.write(ranges.read(at, min(CHUNK, header - at)))
        elif header:
            blob = CachedBlob(_cache(), BlobRanges(self.registry, digest, size))
            try:  # a chunk at a time: `offset` (up to 1 GiB) may be an unsigned statement's
                for start in range(0, header, CHUNK):
                    out.write(blob.pread(start, min(CHUNK, header - start)))
            finally:
                blob.close()
        out.truncate(size)  # the rest is a hole: read through the NBD device, never from here
        progress(size)

    def prepare(self) -> None:
        raise NotImplementedError

    def push_blob(self, *_: Any) -> bool:
        raise NotImplementedError

    def put_manifest(self, *_: Any) -> None:
        raise NotImplementedError


class _Headers(_HeadersOnly):
    """The header sizes are the statement's: read from the work directory's manifest.json as
    soon as pull has it (it fetches the statement first, and layers after the small files)."""

    def __init__(self, registry: Registry, work_parent: Path, erase: bool = False) -> None:
        super().__init__(registry, erase)
        self.work_parent = work_parent

    def pull_blob(self, digest: str, size: int, out: BinaryIO,
                  progress: Callable[[int], None]) -> None:  # fmt: skip
        if digest in self.layers and not self.layers[digest]:
            statement = _statement_beside(self.work_parent)
            for layer in statement.layers:
                if self.digests.get(layer.file) == digest:
                    self.layers[digest] = layer.offset
        super().pull_blob(digest, size, out, progress)


def _statement_beside(parent: Path) -> manifest_mod.Manifest:
    """The statement of the pull under way in `parent` (its one work directory)."""
    from cryptlayer.image import manifest as manifest_mod

    works = [p for p in parent.iterdir() if p.name.startswith(".") and ".pull-" in p.name]
    if len(works) != 1:
        raise RuntimeError(f"expected one pull under way in {parent}, found {len(works)}")
    return manifest_mod.load(works[0])


@dataclass(frozen=True)
class Fetched:
    """An image fetched for a lazy start: its directory, each layer's blob (digest, size), and
    each layer's header size (the statement's `offset`: the bytes an erase keeps off the disk)."""

    image: Path
    blobs: list[tuple[str, int]]
    headers: list[int]


def fetch(remote: Remote, target: Path, *, digest: str | None = None,
          trust: Path | None = None, erase: bool = False) -> Fetched:  # fmt: skip
    """Fetch the image's small files whole and its layers' headers into new directory `target`
    (its parent private: nobody else may create the work directory beside it). With `erase`
    (a start that will erase the node's copy), the headers are not stored in the block cache,
    and what it held of them is dropped."""
    from cryptlayer.distribution import transfer
    from cryptlayer.image import manifest as manifest_mod

    registry = remote.registry()
    store = _Headers(registry, target.parent, erase)
    transfer.pull(store, target, digest=digest, trust=trust)
    loaded = manifest_mod.load(target)
    return Fetched(target, [(store.digests[layer.file], layer.size) for layer in loaded.layers],
                   [layer.offset for layer in loaded.layers])  # fmt: skip


SERVER_COMMAND = ("-m", "cryptlayer.distribution.lazy")  # after the interpreter


@dataclass(frozen=True)
class ForStart:
    """What a lazy start needs of the fetch, as plain values (the runtime does not import this
    package: the caller makes its runtime.lazy.LazyLayers of them): each layer's blob, the
    server's argv, and its standard input given its sockets' descriptors."""

    blobs: list[tuple[str, int]]
    command: list[str]
    config: Callable[[list[int]], bytes]
    # With `warm`: the server, started before the fetch; given its sockets' descriptors and its
    # log's, hands them over (runtime.lazy.LazyLayers.handoff) and returns its pid.
    handoff: Callable[[list[int], int], int | None] | None = None
    # With `warm`: stops that server if it was never handed its sockets (a start that failed
    # after the fetch, before its opening); nothing once it was.
    discard: Callable[[], None] | None = None


MAX_FDS = 1 + 1024  # its log and a socket per layer (the kernel passes 253 a message: a send
# of more fails, and a server is started cold, as without a warm one)


class _Warm:
    """The server process started before the fetch, so that its start (an interpreter and ~275
    modules, most of them requests': seconds under emulation) and its first look at the registry
    happen while the fetch runs, not after it (figure 14). Its standard input is a socketpair's
    end (SOCK_SEQPACKET): the remote's configuration now, the blobs and their sockets (and the
    log) at the handoff, by SCM_RIGHTS; it exits when our end closes unused (a failed fetch, a
    start that stopped before it served)."""

    def __init__(self, remote: Remote) -> None:
        import subprocess

        from cryptlayer.config import block_cache_size

        limit = block_cache_size()  # (a bad setting fails here, before there is a process)
        self.handed = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                [sys.executable, *SERVER_COMMAND], stdin=theirs.fileno(), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,  # (as runtime/lazy.py's)
            )  # fmt: skip
        self.sock = ours
        with suppress(OSError):  # it died: found at the handoff
            ours.send(json.dumps({"cache_limit": limit} | _remote(remote)).encode())

    def handoff(self, config: bytes, fds: list[int], log: int) -> int | None:
        """Hand it its configuration, sockets and log; its pid, or None if it is gone (it
        failed to start: the caller starts a server as without one)."""
        try:
            with self.sock:
                socket.send_fds(self.sock, [config], [log, *fds])
        except OSError:
            self.close()
            return None
        self.handed = True
        return int(self.process.pid)

    def close(self) -> None:
        """Stop it, unused (its sockets never handed over); once they were, it is the opening's
        to stop (a SERVER step), not ours."""
        if self.handed:
            return
        self.sock.close()
        self.process.kill()
        self.process.wait()


def fetch_for_start(remote: Remote, target: Path, *, digest: str | None = None,
                    trust: Path | None = None, erase: bool = False,
                    warm: bool = False) -> ForStart:  # fmt: skip
    """`fetch`, and how to start the server for what was fetched (run/start's `docker://`, and
    cryptlayer-runtime's at create); `erase`: a start that erases the node's copy (the headers
    never stored in the block cache, by the fetch nor by the server). With `warm`, the server is
    started first, its start overlapping the fetch, and ForStart.handoff hands it its sockets."""
    import functools

    started = _Warm(remote) if warm else None
    try:
        fetched = fetch(remote, target, digest=digest, trust=trust, erase=erase)
    except BaseException:
        if started is not None:
            started.close()
        raise
    private = fetched.headers if erase else None
    handoff = None
    if started is not None:
        warm_server = started

        def handoff(fds: list[int], log: int) -> int | None:
            indices = list(range(len(fds)))  # the n-th socket sent, as the server numbers them
            config = server_config(remote, fetched.blobs, indices, private=private)
            return warm_server.handoff(config, fds, log)

    return ForStart(fetched.blobs, [sys.executable, *SERVER_COMMAND],
                    functools.partial(server_config, remote, fetched.blobs, private=private),
                    handoff, started.close if started is not None else None)  # fmt: skip


def _remote(remote: Remote) -> dict[str, Any]:
    return {"ref": remote.ref, "tls_verify": remote.tls_verify, "cert_dir": remote.cert_dir,
            "authfile": remote.authfile, "login": remote.login}  # fmt: skip


def server_config(remote: Remote, blobs: list[tuple[str, int]], fds: list[int],
                  private: list[int] | None = None) -> bytes:  # fmt: skip
    """The server's standard input; `private`: for each blob, the bytes from its start (its
    header, for an image to be erased) whose chunks the server must never store in the cache."""
    from cryptlayer.config import block_cache_size

    private = private or [0] * len(blobs)
    return json.dumps({"cache_limit": block_cache_size()} | _remote(remote) | {
        "blobs": [{"digest": d, "size": s, "fd": fd} | ({"private": p} if p else {})
                  for (d, s), fd, p in zip(blobs, fds, private, strict=True)],
    }).encode()  # fmt: skip


def _registry(config: dict[str, Any]) -> tuple[Registry, str]:
    """The registry `config` names, its scheme and credentials found once here as `pull` finds
    them (BlobRanges sends to what is known); and why it was not reached ("" if it was)."""
    login = config["login"]
    remote = Remote(config["ref"], bool(config["tls_verify"]), config["cert_dir"],
                    config["authfile"], tuple(login) if login else None)  # fmt: skip
    registry = remote.registry()
    try:
        registry.ping()
    except Exception as err:  # each read fails (EIO) with its own reason then
        return registry, f"registry not reached: {err}"
    return registry, ""


def _warm_start() -> tuple[dict[str, Any], Registry, str] | None:
    """A warm server's start (_Warm): its modules and the registry's client ready before the
    fetch ends; then its blobs, their sockets and its log handed over. None if its parent let go
    of it unused."""
    import stat

    import requests.adapters  # noqa: F401  (what every read uses: imported while we wait)

    channel = socket.socket(fileno=0)
    first = channel.recv(MAX_CONFIG)
    if not first:
        return None
    config = json.loads(first)
    # The registry is looked at while we wait for the handoff, not before: a registry that never
    # answers must not keep a server whose parent let go of it (killed, or failed) alive for the
    # request's deadline, unjournaled; the end of our standard input ends it at once.
    looked: list[tuple[Registry, str]] = []
    looking = threading.Thread(target=lambda: looked.append(_registry(config)), daemon=True)
    looking.start()
    message, fds, flags, _ = socket.recv_fds(channel, MAX_CONFIG, MAX_FDS)
    channel.close()
    if not message or not fds or flags & socket.MSG_CTRUNC:
        if fds:  # (its log first: say why, rather than leave every read failing unexplained)
            os.write(fds[0], b"cryptlayer lazy server: its sockets were not all handed over\n")
        return None
    looking.join()
    registry, problem = looked[0] if looked else _registry(config)  # (it raised: again, here)
    os.dup2(fds[0], 1)
    os.dup2(fds[0], 2)
    os.close(fds[0])
    sockets = fds[1:]
    config |= json.loads(message)
    for item in config["blobs"]:
        item["fd"] = sockets[int(item["fd"])]
        if not stat.S_ISSOCK(os.fstat(item["fd"]).st_mode):
            raise RuntimeError("a warm server was handed what is not a socket")
    return config, registry, problem


def main() -> None:
    """The server process: serve each inherited socket until the kernel lets go of it."""
    import stat

    if stat.S_ISSOCK(os.fstat(0).st_mode):  # started warm (_Warm): its sockets come later
        started = _warm_start()
        if started is None:  # let go of unused: now, not after the interpreter's finalization,
            os._exit(0)  # which a thread still in the registry's request may crash (SIGSEGV)
        config, registry, problem = started
    else:
        config = json.loads(sys.stdin.buffer.read(MAX_CONFIG))
        registry, problem = _registry(config)
    limit = config.get("cache_limit")
    cache = _cache(int(limit) if limit is not None else None)

    def log(text: str) -> None:
        print(f"cryptlayer lazy server {os.getpid()}: {text}", file=sys.stderr, flush=True)

    if problem:
        log(problem)
    threads = []
    with ExitStack() as stack:
        for item in config["blobs"]:
            blob = CachedBlob(cache, BlobRanges(registry, item["digest"], int(item["size"])),
                              int(item.get("private", 0)))  # fmt: skip
            stack.callback(blob.close)
            sock = socket.socket(fileno=int(item["fd"]))
            thread = threading.Thread(
                target=serve, args=(sock, blob, "", log), kwargs={"handshake": False}
            )
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    log("every device detached; exiting")


if __name__ == "__main__":
    main()
