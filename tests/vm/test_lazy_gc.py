"""What a lazy start leaves when it dies before its opening names it, or when its journals are
lost, and what `gc` does about it; a tampered blob in the registry: the error names the
docker:// reference, and the blob's chunks leave the node's block cache, so that the blob
restored in the registry runs again (docs/lazy.md, "gc" and "Unchecked here, checked by the
kernel"). Against Debian's docker-registry, as tests/vm/test_lazy.py."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import MARKER_LOWER, Cli, leftovers
from registryfixtures import registry
from test_crash_points import crash_at
from test_lazy import _blob, _cached, _nothing_lazy_left, _server_logs
from test_tampering import _block_of, _flip

from cryptlayer.errors import ExitCode
from cryptlayer.paths import block_cache_dir, lazy_run_dir, openings_dir, records_dir, run_root
from cryptlayer.tools import nbd

# A lazy run's crash points before its opening's FETCHED step is taken: 1, the fetch done and
# nothing journaled (cli._image_for_start); 2-3 the container's directory; 4 the image; 5-6 the
# opening's directory; 7 the FETCHED step journaled, not yet taken. At 1 to 6 no journal names
# the fetched directory. (--keep throughout: the cache as a keeping start fills it; an erasing
# start keeps its header chunks out of it, docs/lazy.md.)
BEFORE_FETCHED = range(1, 8)


def _fetched_dirs() -> list[Path]:
    lazy_dir = lazy_run_dir()
    return sorted(lazy_dir.iterdir()) if lazy_dir.is_dir() else []


def test_a_kill_before_the_opening_names_the_fetched_image_is_cleaned_up_by_gc(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        args = ("run", "--keep", "--tls-verify=false", "-k", str(key_file), ref)
        for point in BEFORE_FETCHED:
            assert crash_at(point, *args), point
            left = _fetched_dirs()
            assert len(left) == 1 and (left[0] / "image/manifest.json").is_file(), point
            if point == 1:  # the new point: fetched, and nothing journaled yet
                assert not records_dir().is_dir() or list(records_dir().iterdir()) == []
            code, out, err = cli("gc")
            assert code == 0, f"point {point}: gc failed: {err}"
            if point < 7:
                assert f"removed orphan fetched image {left[0]}\n" in out, (point, out)
            assert leftovers() == [], f"point {point}: left after gc: {leftovers()}"
            _nothing_lazy_left()
            assert cli.ok("gc") == "nothing to clean up\n", f"point {point}: a second gc found more"


def test_gc_detaches_the_nbd_devices_of_a_lazy_start_whose_journals_were_lost(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """A started lazy container whose record and opening are gone (nothing names its devices,
    server or directory): gc unmounts, closes the mappings, detaches the NBD devices by their
    backend (cryptlayer:...), and removes the fetched directory; the server ends by itself."""
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        rootfs = Path(cli.ok("start", "--keep", "--tls-verify=false", "--name", "lost", "-k",
                             str(key_file), f"docker://{reg.host}/team/app:v1").strip())  # fmt: skip
        assert (rootfs / "data/hello.txt").read_text() == f"{MARKER_LOWER}\n"
        ours = {i: b for i, b in nbd.attached().items() if b.startswith("cryptlayer:")}
        assert ours, "no NBD device attached with a cryptlayer backend"
        for journals in (records_dir(), openings_dir()):
            for path in journals.iterdir():
                if path.is_file():
                    path.unlink()
        code, out, err = cli("gc")
    assert code == 0, f"gc failed: {err}"
    for index, backend in ours.items():
        assert f"removed orphan NBD device {nbd.device(index)} ({backend})\n" in out, out
    assert "removed orphan fetched image " in out, out
    assert leftovers() == [], f"left after gc: {leftovers()}"
    _nothing_lazy_left()


def test_a_tampered_blob_names_the_reference_and_its_chunks_leave_the_cache(
    cli: Cli, image: Path, key_file: Path, tmp_path: Path
) -> None:
    """A byte changed in the registry's copy of layer 1: the run fails naming the docker://
    reference (not the copy in /run), and every chunk of that blob is gone from the cache (layer
    0's stay), so once the registry serves the blob as published again, the next run succeeds
    (a bad chunk kept in the cache would fail it)."""
    offset = _block_of(image, key_file, 1, "/data/hello.txt") + 100
    layer, bottom = _blob(image / "layer1.luks"), _blob(image / "layer0.luks")
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
    with registry(tmp_path / "registry") as reg:
        cli.ok("push", "--no-tls-verify", "-q", str(image), f"{reg.host}/team/app:v1")
        ref = f"docker://{reg.host}/team/app:v1"
        stored = reg.storage / "docker/registry/v2/blobs/sha256" / layer[:2] / layer / "data"
        _flip(stored, offset)
        code, out, err = cli("run", "--keep", "--tls-verify=false", "-k", str(key_file), ref)
        assert (code, out) == (ExitCode.RUN_FAILED, ""), err
        last = err.splitlines()[-1]
        assert last.startswith(f"error: layer 1 of {ref} failed dm-verity's check"), err
        assert str(run_root()) not in last, last
        assert _cached(layer) == 0, "chunks of the tampered blob are still cached"
        assert _cached(bottom) > 0  # the other layer's chunks are not suspect
        _nothing_lazy_left()
        _flip(stored, offset)  # the blob as published again
        with _server_logs() as logs:
            code, out, err = cli("run", "--keep", "--tls-verify=false", "-k", str(key_file), ref)
        assert (code, out) == (0, f"{MARKER_LOWER}\n"), (err, logs)
        assert _cached(layer) > 0
        _nothing_lazy_left()
    shutil.rmtree(block_cache_dir(), ignore_errors=True)
