"""The whole way through a real registry: build -> push -> skopeo copy to another repository ->
pull into a fresh directory -> run -> shred; the registry's storage holds no plaintext."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import MARKER_LOWER, Cli, slots
from registryfixtures import registry


def test_build_push_copy_pull_run_shred(
    cli: Cli, image: Path, key_file: Path, images: Path, tmp_path: Path
) -> None:
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                        "--dest-tls-verify=false", f"docker://{reg.host}/team/app:v1",
                        f"docker://{reg.host}/mirror/app:v1"], check=True)  # fmt: skip
        pulled = images / "pulled"
        cli.ok("pull", "--no-tls-verify", "-q", f"docker://{reg.host}/mirror/app:v1", str(pulled))
        stored = [p.read_bytes() for p in reg.storage.rglob("data")]
    assert cli.ok("verify", str(pulled)).endswith("layers:  2, each as the statement records it\n")
    assert cli.ok("run", "-k", str(key_file), str(pulled)) == f"{MARKER_LOWER}\n"
    assert slots(pulled) == [0, 0]  # shredded: the pulled copy, not the registry's
    assert stored and not any(MARKER_LOWER.encode() in blob for blob in stored)
