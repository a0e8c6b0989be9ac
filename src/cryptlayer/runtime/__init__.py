"""runtime: running a container from an opened image.

The defaults a container gets unless told otherwise live here, importing nothing, so that the
command line shows them in --help without loading the runtime."""

DEFAULT_SCRATCH = 1 << 30  # the scratch's size in bytes; sparse: costs only what it holds
DEFAULT_STOP_TIMEOUT = 10.0  # seconds from a forwarded signal to SIGKILL, as podman's
