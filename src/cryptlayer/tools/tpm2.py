"""tpm2-tools: the TPM operations keys/tpm2.py needs, one program each.

Which TPM: $TPM2TOOLS_TCTI as tpm2-tools reads it, else the kernel's resource manager
(/dev/tpmrm0). Contexts are files in a directory the caller owns; without a resource manager
(swtpm, /dev/tpm0) nothing flushes what a tool left loaded, so every call flushes the transient
objects afterwards (through /dev/tpmrm0 that finds nothing: each connection has its own).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptlayer.tools.runner import Result, run, run_for_secret

DEFAULT_TCTI = "device:/dev/tpmrm0"
# The parent: an ECC P-256 storage key under the owner hierarchy, made again from the owner's
# seed each time (same template, same key), as the TCG's storage root key template.
PRIMARY = "ecc256:aes128cfb"
CHILD = "rsa2048:null:null"  # decrypt with the null scheme: raw RSA (keys/heldkey.py)
CHILD_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|decrypt"
MAX_OUTPUT = 4096
# Where a tool that insists on an output file writes to its standard output (our pipe). Not
# /dev/stdout, which is whatever the machine's /dev makes of it (in the test VM: the console; a
# missing link would become a regular file); /proc/self/fd/1 is always the process's own.
STDOUT = "/proc/self/fd/1"


def tcti() -> str:
    """The TPM tpm2-tools talks to."""
    return os.environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI


def _env() -> dict[str, str]:
    return {"TPM2TOOLS_TCTI": tcti()}


def _run(argv: list[str]) -> Result:
    try:
        return run(argv, env=_env())
    finally:
        flush_transient()


def flush_transient() -> None:
    """Flush the transient objects left loaded (nothing to do behind a resource manager)."""
    run(["tpm2_flushcontext", "-t"], env=_env(), check=False)


def create_primary(context: Path) -> None:
    """The owner hierarchy's storage parent, its context saved to `context`."""
    _run(["tpm2_createprimary", "-Q", "-C", "o", "-G", PRIMARY, "-g", "sha256", "-c", str(context)])


def pcr_policy(pcrs: str, digest: Path, session: Path) -> None:
    """The policy digest for "these PCRs keep their current values", into `digest`."""
    try:
        _run(["tpm2_startauthsession", "-S", str(session)])
        _run(["tpm2_policypcr", "-Q", "-S", str(session), "-l", pcrs, "-L", str(digest)])
    finally:
        flush(session)


def create_child(parent: Path, public: Path, private: Path, policy: Path | None) -> None:
    """A new RSA decryption key under `parent`: its public and (TPM-wrapped) private blobs.

    With `policy` only that policy authorizes it; without, its empty password does."""
    attributes = CHILD_ATTRIBUTES + ("" if policy else "|userwithauth")
    argv = ["tpm2_create", "-Q", "-C", str(parent), "-G", CHILD, "-a", attributes]
    argv += ["-L", str(policy)] if policy else []
    _run([*argv, "-u", str(public), "-r", str(private)])


def load(parent: Path, public: Path, private: Path, context: Path) -> None:
    """Load the key's blobs under `parent`; its context into `context`."""
    _run(["tpm2_load", "-Q", "-C", str(parent), "-u", str(public), "-r", str(private),
          "-c", str(context)])  # fmt: skip


def public_pem(context: Path) -> str:
    """The loaded key's public key, PEM."""
    return _run(["tpm2_readpublic", "-Q", "-c", str(context), "-f", "pem", "-o", STDOUT]).stdout


def start_pcr_session(session: Path, pcrs: str) -> None:
    """A policy session that has asserted the PCR values `pcrs` (TPM2_PolicyPCR)."""
    _run(["tpm2_startauthsession", "--policy-session", "-S", str(session)])
    _run(["tpm2_policypcr", "-Q", "-S", str(session), "-l", pcrs])


def flush(context: Path) -> None:
    """Flush the session or object saved in `context`, if it is there."""
    if context.exists():
        run(["tpm2_flushcontext", str(context)], env=_env(), check=False)


def rsa_decrypt_raw(key: Path, ciphertext: Path, session: Path | None) -> bytearray:
    """Raw RSA decryption by the loaded key; the result comes back on a pipe, never a file."""
    auth = ["-p", f"session:{session}"] if session else []
    argv = ["tpm2_rsadecrypt", "-c", str(key), *auth, "-s", "null", "-o", STDOUT]
    try:
        return run_for_secret([*argv, str(ciphertext)], MAX_OUTPUT, env=_env())
    finally:
        flush_transient()
