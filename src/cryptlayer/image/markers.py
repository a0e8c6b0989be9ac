"""The placeholder image's default process, as engines copy it into a container's config.json:
how `cryptlayer-runtime` knows the user gave no command of their own and runs the encrypted
image's (docs/engines.md, "The default process"). No file by these names exists anywhere."""

ENTRYPOINT = "/.cryptlayer/entrypoint"  # process.args[0]
WORKDIR = "/.cryptlayer/workdir"  # process.cwd
PATH = "/.cryptlayer/path"
PATH_ENV = f"PATH={PATH}"  # an entry of process.env
