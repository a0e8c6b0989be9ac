"""Faults of a container made through cryptlayer-runtime (docs/engines.md, "Faults"), on real
dm-crypt with crun, the runtime called as an engine calls it (no engine: each fault is the
runtime's, and an engine adds nothing to it but the calls):

- `create` killed (SIGKILL, a crash point of journal.crash_point) while it assembles, or
  between the assembly and crun's create: the engine's next `delete`, or `gc`, leaves nothing
  and the image erased (its record existed: the shred was owed);
- a container that still runs is left alone by `gc`; once the engine deleted it in crun without
  calling cryptlayer-runtime's `delete`, `gc` tears it down and shreds its image.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Cli, leftovers, slots

from cryptlayer.engine.cli import container_name
from cryptlayer.runtime import journal, state

RUNTIME = str(Path(sys.executable).with_name("cryptlayer-runtime"))
TIMEOUT = 900  # a runtime call starts Python, slowly under emulation


@dataclass
class Node:
    """A bundle naming the image, the node's config, crun's state directory (--root)."""

    env: dict[str, str]
    bundle: Path
    crun_root: Path
    image: Path

    def runtime(self, *args: str, crash_at: int | None = None) -> subprocess.CompletedProcess[str]:
        env = self.env if crash_at is None else self.env | {journal.CRASH_AT: str(crash_at)}
        err = self.bundle / "stderr"
        with err.open("w") as stderr:  # (not a pipe: the container's init inherits it)
            done = subprocess.run([RUNTIME, "--root", str(self.crun_root), *args], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=stderr, timeout=TIMEOUT, text=True)  # fmt: skip
        return subprocess.CompletedProcess(done.args, done.returncode, "", err.read_text())

    def create(self, cid: str, crash_at: int | None = None) -> subprocess.CompletedProcess[str]:
        return self.runtime("create", "--bundle", str(self.bundle), cid, crash_at=crash_at)


@pytest.fixture
def node(tmp_path: Path, images: Path, one_layer: tuple[Path, Path]) -> Node:
    template, key = one_layer
    image = images / "engine-img"
    shutil.copytree(template, image)
    node_key = tmp_path / "node.key"
    shutil.copyfile(key, node_key)
    node_key.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(f'allow-unsigned = true\n[[keys]]\nimage = "{images}/*"\n'
                      f'key-file = "{node_key}"\n')  # fmt: skip
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run(["crun", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["sleep", "600"]
    spec["annotations"] = {"org.cryptlayer.image": str(image)}
    (bundle / "config.json").write_text(json.dumps(spec))
    crun_root = tmp_path / "crun"
    crun_root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != journal.CRASH_AT}
    return Node(env | {"CRYPTLAYER_CONFIG": str(config)}, bundle, crun_root, image)


def start_points(cli: Cli, one_layer: tuple[Path, Path], images: Path) -> int:
    """How many crash points a `start` of the one-layer image passes (the engine's assembly is
    that `start`; journal.crash_points counts them in this process)."""
    template, key = one_layer
    copy = images / "counted"
    shutil.copytree(template, copy)
    os.environ[journal.CRASH_AT] = "0"
    journal.crash_points = 0
    try:
        cli.ok("start", "--name", "counted", "--key-file", str(key), str(copy))
    finally:
        del os.environ[journal.CRASH_AT]
    counted = journal.crash_points
    cli.ok("stop", "counted")
    return counted


def test_create_killed_while_it_assembles(
    cli: Cli, node: Node, one_layer: tuple[Path, Path], images: Path
) -> None:
    """SIGKILL at the first point, in the middle, at the last of the assembly, and after it
    (config.json rewritten, crun's create not begun): each left as it was, then cleaned up by
    the engine's next `delete` of the id (the odd cases) or by `gc` (the even ones)."""
    last = start_points(cli, one_layer, images)
    template = images / "template-copy"
    shutil.copytree(node.image, template)
    original = (node.bundle / "config.json").read_text()
    for case, point in enumerate((1, last // 2, last, last + 1)):
        cid = f"killed{case}"
        shutil.rmtree(node.image)
        shutil.copytree(template, node.image)
        (node.bundle / "config.json").write_text(original)
        killed = node.create(cid, crash_at=point)
        assert killed.returncode == -signal.SIGKILL, f"point {point}: {killed.stderr}"
        left = leftovers()
        assert f"record {container_name(cid)}.json" in left, f"point {point}: {left}"
        assert state.holder_names() == [container_name(cid)]
        if case % 2 == 0:
            deleted = node.runtime("delete", cid)  # crun does not know it: torn down all the same
            assert "cryptlayer-runtime" not in deleted.stderr, deleted.stderr
        else:
            out = cli.ok("gc")
            assert f"cleaned up container {container_name(cid)}\n" in out, out
        assert leftovers() == [], f"point {point}"
        assert state.holder_names() == []
        assert slots(node.image) == [0], f"point {point}: the image can still be opened"
        assert list(node.crun_root.iterdir()) == []
    assert cli.ok("gc") == "nothing to clean up\n"


def test_gc_leaves_a_running_container_and_cleans_one_the_engine_forgot(
    cli: Cli, node: Node
) -> None:
    """A created, started container: gc leaves it alone. Then the engine deletes it in crun
    without calling cryptlayer-runtime's delete (its daemon died, it was switched to runc):
    gc tears it down and shreds the image."""
    created = node.create("live")
    assert created.returncode == 0, created.stderr
    try:
        started = node.runtime("start", "live")
        assert started.returncode == 0, started.stderr
        assert cli.ok("gc") == "nothing to clean up\n"
        assert "record engine-live.json" in leftovers()
        assert slots(node.image) == [0]  # erased at start; the layers still open
    finally:
        subprocess.run(["crun", "--root", str(node.crun_root), "delete", "--force", "live"],
                       check=True, timeout=TIMEOUT)  # fmt: skip
    assert state.holder_names() == ["engine-live"]
    out = cli.ok("gc")
    assert "cleaned up container engine-live\n" in out, out
    assert leftovers() == []
    assert state.holder_names() == []
    assert slots(node.image) == [0]
    assert cli.ok("gc") == "nothing to clean up\n"
