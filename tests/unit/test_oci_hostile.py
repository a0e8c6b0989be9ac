"""build/oci.py: OCI layouts written by someone hostile (test_oci.py: well-formed ones)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ocifixtures import CONFIG, MIDDLE, image_files, write_dir

from cryptlayer.build.oci import open_image
from cryptlayer.errors import UsageError


def test_oci_blob_symlinked_out_of_the_layout_is_refused(tmp_path: Path) -> None:
    layout = write_dir(tmp_path / "lay", image_files([(MIDDLE, "none")], CONFIG))
    index = json.loads((layout / "index.json").read_text())
    blob = layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    blob.unlink()
    blob.symlink_to("/etc/passwd")
    refused = pytest.raises(UsageError, match="is a symbolic link; refusing to read it")
    with refused, open_image(f"oci:{layout}"):
        pass
    blob.unlink()
    os.mkfifo(blob)  # would block for ever
    with pytest.raises(UsageError, match="is not a regular file"), open_image(f"oci:{layout}"):
        pass


def test_oci_config_of_wrong_types_is_refused(tmp_path: Path) -> None:
    layout = write_dir(tmp_path / "lay", image_files([(MIDDLE, "none")], {"Cmd": [1, 2]}))
    with pytest.raises(UsageError, match="malformed image metadata"), open_image(f"oci:{layout}"):
        pass
