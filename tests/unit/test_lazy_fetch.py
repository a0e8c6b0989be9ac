"""Lazy start's fetch (distribution/lazy.py) against Debian's docker-registry: the small files
and trees whole, each layer as its header and a hole, so that image/opener.py opens the copy as
any image; the server process's configuration. The NBD device itself is the VM tier's."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke
from luksfixtures import fake_image
from registryfixtures import RunningRegistry

from cryptlayer.distribution import lazy
from cryptlayer.errors import TamperedImageError
from cryptlayer.image.manifest import load
from cryptlayer.image.opener import Policy, open_image

SIZE = 6 << 20


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CRYPTLAYER_ROOT", str(tmp_path / "state"))
    return tmp_path / "state"


def _pushed(registry: RunningRegistry, tmp_path: Path, repo: str) -> tuple[Path, str]:
    image = fake_image(tmp_path / "img", size=SIZE)
    ref = f"docker://{registry.host}/{repo}:v1"
    code, _, err = invoke("push", "--no-tls-verify", str(image), ref)
    assert code == 0, err
    return image, ref


def test_fetch_takes_the_small_files_whole_and_only_the_headers_of_layers(
    plain: RunningRegistry, tmp_path: Path, state: Path
) -> None:
    image, ref = _pushed(plain, tmp_path, "lazy/fetch")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    fetched = lazy.fetch(lazy.Remote(ref, tls_verify=False), work / "image")
    copy = fetched.image
    layer = load(image).layers[0]
    for name in ("manifest.json", "keys.json", layer.tree):
        assert (copy / name).read_bytes() == (image / name).read_bytes(), name
    original, lazy_copy = (image / layer.file).read_bytes(), (copy / layer.file).read_bytes()
    assert len(lazy_copy) == len(original) == layer.size == SIZE
    assert lazy_copy[: layer.offset] == original[: layer.offset]  # the header, from the registry
    assert lazy_copy[layer.offset :] == bytes(layer.size - layer.offset)  # and a hole
    assert os.stat(copy / layer.file).st_blocks * 512 < 2 << 20
    chunks = list((state / "blockcache/sha256").glob("*/0*"))
    assert [c.name for c in chunks] == ["00000000"]  # one chunk fetched: the header's
    blob = fetched.blobs[0]
    assert blob[1] == layer.size and chunks[0].parent.name == blob[0].removeprefix("sha256:")
    with open_image(copy, Policy()) as opened:  # every check of a local image
        opened.headers()
        assert opened.manifest.digest == load(image).digest


def test_fetch_keeps_pull_s_checks(plain: RunningRegistry, tmp_path: Path) -> None:
    _, ref = _pushed(plain, tmp_path, "lazy/pinned")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    with pytest.raises(TamperedImageError, match="not the pinned"):
        lazy.fetch(lazy.Remote(ref, tls_verify=False), work / "image",
                   digest="sha256:" + "0" * 64)  # fmt: skip
    assert not (work / "image").exists()


def test_the_server_is_told_its_registry_blobs_and_sockets_on_stdin() -> None:
    remote = lazy.Remote("docker://r.example/a:v1", False, None, None, ("alice", "secret"))
    config = json.loads(lazy.server_config(remote, [("sha256:" + "a" * 64, 8192)], [7]))
    assert config["login"] == ["alice", "secret"]  # on a pipe: never argv or env
    assert config["blobs"] == [{"digest": "sha256:" + "a" * 64, "size": 8192, "fd": 7}]
    assert (config["ref"], config["tls_verify"]) == ("docker://r.example/a:v1", False)


@pytest.mark.parametrize("warm", [False, True])
def test_the_server_process_serves_the_blob_as_the_kernel_asks_it(
    plain: RunningRegistry, tmp_path: Path, state: Path, warm: bool
) -> None:
    """The server process as runtime/lazy.py starts it (config on a pipe, the socket inherited,
    no handshake; or `warm`: started before the fetch, handed its socket and log after it),
    asked what the kernel asks: several reads in flight, across chunks, unaligned to them, then
    the socket closed (the device detached): it exits by itself."""
    import random
    import struct
    import sys
    import time

    from cryptlayer.distribution import nbdserver
    from cryptlayer.runtime import lazy as runtime_lazy

    image, ref = _pushed(plain, tmp_path, "lazy/serve")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    remote = lazy.Remote(ref, tls_verify=False)
    fetched = lazy.fetch_for_start(remote, work / "image", warm=warm)
    assert (fetched.handoff is not None) == warm
    blob = (image / load(image).layers[0].file).read_bytes()
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    layers = runtime_lazy.LazyLayers(
        work, fetched.blobs, [sys.executable, "-m", "cryptlayer.distribution.lazy"],
        lambda fds: lazy.server_config(remote, fetched.blobs, fds), handoff=fetched.handoff,
    )  # fmt: skip
    identity = runtime_lazy._spawn(layers, [server])
    server.close()
    assert runtime_lazy.start_time(int(identity.split(":")[0])) == identity.split(":")[1]
    pid, log = int(identity.split(":")[0]), runtime_lazy.SERVER_LOG
    try:
        rng = random.Random(5)
        asked = {}
        for cookie in range(24):
            length = rng.choice([4096, 65536, 131072, 1 << 20])
            offset = rng.randrange(0, len(blob) - length, 4096)
            asked[cookie] = (offset, length)
            kernel.sendall(struct.pack(">IHHQQI", nbdserver.REQUEST_MAGIC, 0,
                                       nbdserver.CMD_READ, cookie, offset, length))  # fmt: skip
        for _ in asked:
            magic, error, cookie = struct.unpack(">IIQ", _recv(kernel, 16))
            assert (magic, error) == (nbdserver.SIMPLE_REPLY_MAGIC, 0), (work / log).read_text()
            offset, length = asked[cookie]
            assert _recv(kernel, length) == blob[offset : offset + length], cookie
        kernel.close()
        deadline = time.monotonic() + 30
        while runtime_lazy.start_time(pid) and time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
            time.sleep(0.05)
        assert runtime_lazy.start_time(pid) == ""  # gone, with its device
        assert "every device detached" in (work / log).read_text()
    finally:
        runtime_lazy.kill_server(identity)


def test_a_warm_server_goes_when_the_fetch_fails_or_it_is_let_go_unused(
    plain: RunningRegistry, tmp_path: Path, warm_servers: list[Any]
) -> None:
    """The warm server (started before the fetch) never outlives a start that does not use it:
    killed and reaped when the fetch fails; exits by itself when its parent lets go of it."""
    started = warm_servers
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    remote = lazy.Remote(f"docker://{plain.host}/lazy/absent:v1", tls_verify=False)
    with pytest.raises(Exception, match="absent"):
        lazy.fetch_for_start(remote, work / "image", warm=True)
    assert len(started) == 1 and started[0].returncode is not None
    unused = lazy._Warm(remote)
    unused.sock.close()  # its parent let go of it (the ForStart dropped)
    assert unused.process.wait(timeout=30) == 0
    dead = lazy._Warm(remote)  # one that died before its handoff: None, a server is started
    dead.process.kill()
    dead.process.wait()
    log = os.open(os.devnull, os.O_WRONLY)
    try:
        assert dead.handoff(b"{}", [], log) is None
    finally:
        os.close(log)


def test_a_warm_server_let_go_of_does_not_wait_for_a_registry_that_never_answers(
    tmp_path: Path,
) -> None:
    """Its parent killed (or failed) while the warm server looks at a registry that accepts and
    never answers: it ends with its standard input, not after the request's deadline (before: it
    pinged first and read the handoff after, minutes later, reparented and unjournaled)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        warm = lazy._Warm(lazy.Remote(f"docker://{host}/lazy/app:v1", tls_verify=False))
        try:
            listener.settimeout(60)
            held, _ = listener.accept()  # it is looking at the registry now
            with held:
                warm.sock.close()  # its parent let go of it
                assert warm.process.wait(timeout=30) == 0
        finally:
            warm.close()


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data
