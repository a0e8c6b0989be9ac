"""image: an image on disk and everything read from it.

The defaults of an image's making that the command line shows live here, importing nothing, so
that --help needs no cryptography loaded."""

DEFAULT_ITER_TIME_MS = 2000  # a new passphrase's Argon2id time, in ms (cryptsetup's --iter-time)
