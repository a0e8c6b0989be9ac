"""What the lazy server process imports, pinned (figure 14, docs/benchmarks/NOTES.md): it is a
second Python process on the lazy start's path, and under emulation each module costs ~20-100 ms.
It serves blobs (blobrange, blockcache, nbdserver, the registry's client); the fetch's modules
(the image's manifest, envelope and signatures, keys, the pull) and the configuration's (tomllib:
the parent passes the cache's bound) are not on its path."""

from __future__ import annotations

import subprocess
import sys

# Before figure 14's cut: 293 modules from spawn to the first read answered (bench/lazyserver.py);
# 275 after, most of the rest requests and urllib3.
NOT_IN_THE_SERVER = (
    "cryptlayer.distribution.artifact", "cryptlayer.distribution.transfer",
    "cryptlayer.distribution.layout", "cryptlayer.image", "cryptlayer.image.manifest",
    "cryptlayer.image.envelope", "cryptlayer.image.signatures", "cryptlayer.keys",
    "cryptlayer.secret", "cryptlayer.progress", "cryptlayer.config", "tomllib",
)  # fmt: skip

PROBE = """import sys
import cryptlayer.distribution.lazy as lazy
# what main() builds before it serves: the registry's client, a cache, a blob read through it
remote = lazy.Remote("docker://127.0.0.1:9/a/b:c", tls_verify=False)
registry = remote.registry()
cache = lazy.BlockCache(lazy.paths.block_cache_dir(), 1 << 30)
blob = lazy.CachedBlob(cache, lazy.BlobRanges(registry, "sha256:" + "a" * 64, 10))
blob.close()
print(" ".join(sorted(sys.modules)))
"""


def test_the_servers_path_imports_none_of_the_fetchs_modules(tmp_path: object) -> None:
    env = {"CRYPTLAYER_ROOT": f"{tmp_path}/state", "HOME": f"{tmp_path}/home", "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, check=True).stdout.split()  # fmt: skip
    assert "cryptlayer.distribution.blockcache" in out and "requests" in out
    assert sorted(set(NOT_IN_THE_SERVER) & set(out)) == []
