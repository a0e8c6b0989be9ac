"""A file's identity (device, inode) has one shape, fsutil.FileId, wherever it is kept: an image's
open layer files, a container's record, an image's opening, a loop step of a journal; journals
written before (lists, and "DEV:INO" for a loop step) are still read (issue 22 item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cryptlayer.fsutil import FileId
from cryptlayer.runtime import state
from cryptlayer.runtime.journal import Kind, Step


def test_file_id_of_a_file_and_as_json(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    st = os.stat(tmp_path / "f")
    ident = FileId.of(st)
    assert ident == FileId(st.st_dev, st.st_ino) and ident.to_json() == [st.st_dev, st.st_ino]
    assert json.loads(json.dumps(ident)) == ident.to_json()
    assert (
        FileId.from_json(ident.to_json()) == FileId.from_json(f"{ident.dev}:{ident.ino}") == ident
    )
    for bad in [[1], [1, 2, 3], "1", {"dev": 1}, None, [True, 2]]:
        with pytest.raises((ValueError, TypeError)):
            FileId.from_json(bad)


def test_journals_keep_one_shape_and_read_the_old_one(tmp_path: Path) -> None:
    """A record and an opening written as JSON and read back hold FileIds; the JSON of a record
    written before (a loop step's backing as "DEV:INO") reads as the same."""
    record = state.Record("c", str(tmp_path), True, state.Mode.START, 0,
                          steps=[Step(Kind.LOOP, "/x", "/dev/loop7", FileId(2049, 12)),
                                 Step(Kind.DIR, "/y")],
                          layer_ids=[FileId(2049, 12), FileId(2049, 13)])  # fmt: skip
    written = json.loads(json.dumps(state._document(record)))
    assert written["layer_ids"] == [[2049, 12], [2049, 13]]
    assert written["steps"][0]["backing"] == [2049, 12]
    assert state._from_json(written) == record
    old = json.loads(json.dumps(state._document(record)))
    old["steps"][0]["backing"], old["steps"][1]["backing"] = "2049:12", ""
    again = state._from_json(old)
    assert again.steps[0].backing == FileId(2049, 12) and again.steps[1].backing is None
    assert again.layer_ids == [FileId(2049, 12), FileId(2049, 13)]
    opening = state.Opening(str(tmp_path), layers=[FileId(1, 2)])
    raw = json.loads(json.dumps(state._document(opening)))
    assert raw["layers"] == [[1, 2]] and state._opening_from_json(raw) == opening
