"""The run root's own directories (/run/cryptlayer/.images, .oci, .lazy) are never a container's:
each container's directory is run_root()/NAME, so a container named like one of them would
share it (a lazy start of a container named "lazy" failed: "Directory not empty")."""

from __future__ import annotations

import pytest

from cryptlayer import paths
from cryptlayer.errors import UsageError
from cryptlayer.runtime import state


@pytest.mark.parametrize("own", [paths.images_run_dir, paths.runtime_state, paths.lazy_run_dir])
def test_no_container_name_is_a_run_root_directory_of_cryptlayers_own(own: object) -> None:
    assert callable(own)
    path = own()
    assert path.parent == paths.run_root()
    with pytest.raises(UsageError):
        state.check_name(path.name)
