"""engine: `cryptlayer-runtime`, the OCI runtime podman, Docker and containerd call
(docs/engines.md).

A second door into the same core as the command line (cli.py): it may use runtime/ (assembly,
teardown) and distribution/ (a registry image pulled at `create`), which never import one
another. Importing nothing here: a passed-through `state` pays for this package's name only."""
