"""image/manifest.py: manifest.json as untrusted input: each malformed or hostile field is one
`error:` line (no traceback, no hang)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from clirunner import invoke

from cryptlayer.errors import ExitCode
from cryptlayer.image import manifest
from cryptlayer.image.manifest import FORMAT

GOOD_LAYER = {"file": "layer0.luks", "uuid": "u", "size": 4096, "content_bytes": 1,
              "source": "s", "offset": 4096, "tree": "layer0.verity", "tree_size": 4096,
              "root_hash": "ab" * 32, "salt": "cd" * 32, "digest": ""}  # fmt: skip
GOOD = {"format": FORMAT, "layers": [GOOD_LAYER], "cipher": "aes-xts-plain64", "created": "",
        "key_bits": 512, "sector_size": 4096,
        "config": {"entrypoint": [], "cmd": ["sh"], "env": ["A=1"], "workdir": "/", "user": "",
                   "exposed_ports": [], "labels": [["a", "b"]]}}  # fmt: skip


def set_path(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


# Every field of manifest.json, given a value of the wrong type or form.
MANIFEST_CASES = [
    (("layers",), "x"), (("layers",), [1]), (("layers",), [GOOD_LAYER] * 200),
    (("layers",), [GOOD_LAYER, GOOD_LAYER]),
    (("layers", 0, "file"), 7), (("layers", 0, "file"), "../etc"), (("layers", 0, "file"), "a\0b"),
    (("layers", 0, "file"), ".hidden"), (("layers", 0, "file"), "a\x1b[2Jb"),
    (("layers", 0, "uuid"), None), (("layers", 0, "size"), "4096"), (("layers", 0, "size"), -1),
    (("layers", 0, "size"), True), (("layers", 0, "size"), 1 << 60),
    (("layers", 0, "content_bytes"), 1.5), (("layers", 0, "source"), ["s"]),
    (("layers", 0, "digest"), 5), (("layers", 0, "evil"), 1),
    (("config",), "x"), (("config", "entrypoint"), "sh"), (("config", "cmd"), [1, 2]),
    (("config", "env"), {"A": "1"}),
    (("config", "workdir"), 3), (("config", "user"), 0), (("config", "exposed_ports"), [80]),
    (("config", "labels"), [["a"]]), (("config", "labels"), "x"), (("config", "cmd"), ["a\0b"]),
    (("config", "unknown"), 1), (("cipher",), 1), (("created",), []),
    (("layers", 0, "offset"), 0), (("layers", 0, "offset"), "4096"), (("key_bits",), 0),
    (("key_bits",), "512"), (("sector_size",), 1 << 20), (("raw",), "x"), (("evil",), 1),
    (("layers", 0, "size"), 4097), (("layers", 0, "tree"), "layer0.luks"),
    (("layers", 0, "tree"), "../t"), (("layers", 0, "root_hash"), "AB" * 32),
    (("layers", 0, "salt"), "cd"), (("layers", 0, "tree_size"), 0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value"), MANIFEST_CASES, ids=[f"{'.'.join(map(str, p))}-{i}"
                                           for i, (p, _) in enumerate(MANIFEST_CASES)]
)  # fmt: skip
def test_every_manifest_field_malformed_is_one_error_line(
    tmp_path: Path, path: tuple[Any, ...], value: Any
) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(set_path(GOOD, path, value)))
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED, err  # damage to a copy (test_verify.py)
    assert err.startswith(f"error: {tmp_path}/manifest.json is ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "\x1b" not in err and "\0" not in err


def test_deeply_nested_manifest(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "manifest.json").write_text(f'{{"format": "{FORMAT}", "layers": {deep}}}')
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED
    assert err == (f"error: {tmp_path}/manifest.json is nested too deeply: the image is damaged;"
                   " rebuild it\n")  # fmt: skip


def test_good_manifest_loads(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(GOOD))
    assert manifest.load(tmp_path).config.labels == (("a", "b"),)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "huge"])
def test_manifest_that_is_not_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "manifest.json"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block for ever
    elif kind == "symlink":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:
        with open(path, "wb") as f:
            f.truncate(64 << 20)
    code, _, err = invoke("inspect", str(tmp_path))
    assert code == ExitCode.TAMPERED
    assert err.startswith(f"error: {path}: ") and len(err.splitlines()) == 1
