"""A software TPM (swtpm) and a software token (SoftHSM 2) for the identities kept in hardware.

Each is a context manager that leaves nothing behind: swtpm is our own child on 127.0.0.1
ports, terminated and waited for on exit; SoftHSM's tokens live in the directory given.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SO_PIN, USER_PIN = "12345678", "2468"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _free_ports() -> int:
    """A free port whose successor is free too (the swtpm TCTI's control port is port + 1)."""
    for _ in range(50):
        port = _free_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port + 1)) != 0 and port < 65535:
                try:
                    s2 = socket.socket()
                    s2.bind(("127.0.0.1", port + 1))
                    s2.close()
                    return port
                except OSError:
                    continue
    raise AssertionError("no two free ports in a row")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def swtpm(state: Path) -> Iterator[str]:
    """A fresh TPM 2.0 (state in `state`); yields its TCTI for TPM2TOOLS_TCTI."""
    state.mkdir(parents=True, exist_ok=True)
    server = _free_ports()
    ctrl = server + 1
    argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--server", f"type=tcp,port={server},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear"]  # fmt: skip
    log = open(state / "swtpm.log", "wb")  # noqa: SIM115  (closed below, after swtpm ends)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        for _ in range(100):
            if _listening(server):
                break
            assert proc.poll() is None, (state / "swtpm.log").read_text()
            time.sleep(0.05)
        else:
            raise AssertionError("swtpm did not start listening")
        yield f"swtpm:host=127.0.0.1,port={server}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def tpm2(tcti: str, *argv: str) -> str:
    """A tpm2-tools command against `tcti` (the test's own, e.g. tpm2_pcrextend)."""
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return done.stdout


@dataclass(frozen=True)
class Token:
    """A SoftHSM token: its label, and the URI of a key in it (without the key's attributes)."""

    label: str
    conf: Path

    def uri(self, obj: str, query: str = "") -> str:
        extra = f"&{query}" if query else ""
        return f"pkcs11:token={self.label};object={obj}?module-path={SOFTHSM_MODULE}{extra}"


def softhsm_conf(base: Path) -> Path:
    """A SoftHSM configuration whose tokens live under `base` (point SOFTHSM2_CONF at it)."""
    tokens = base / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    return conf


def softhsm_token(conf: Path, label: str) -> Token:
    """A new initialized token in the configuration `conf`."""
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--so-pin", SO_PIN, "--pin", USER_PIN],
        env=env, capture_output=True, check=True,
    )  # fmt: skip
    return Token(label, conf)


def softhsm_import(token: Token, private_pem: Path, label: str, key_id: str) -> None:
    """Put a PKCS#8 private key into the token as `label` (SoftHSM's own tool)."""
    env = {**os.environ, "SOFTHSM2_CONF": str(token.conf)}
    subprocess.run(
        ["softhsm2-util", "--import", str(private_pem), "--token", token.label,
         "--label", label, "--id", key_id, "--pin", USER_PIN],
        env=env, capture_output=True, check=True,
    )  # fmt: skip
