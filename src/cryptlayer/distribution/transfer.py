"""`push` and `pull`: an image directory to and from a registry or an OCI layout.

Push: every file opened once (no symlink, no device or FIFO, one link), hashed and sent from
that descriptor; every blob by digest (skipped where the store has it), then the manifest by
digest, then the tag: a half-finished push is never visible under the tag. Pull: the manifest,
the statement (its config blob) and only the files the statement names, each streamed into
`.NAME.pull-DIGEST` beside the target and checked as it streams; that work directory is made
private (0700) by us, and one found there is resumed only if it is ours and private; every file
in it is created O_EXCL|O_NOFOLLOW by descriptor. An interrupted pull resumes there (complete
files are checked again, not fetched again); the directory is renamed into place when complete.
A target that exists is compared with the manifest file by file. Only ciphertext moves."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cryptlayer import oci
from cryptlayer.distribution import artifact
from cryptlayer.distribution.layout import Layout
from cryptlayer.distribution.registry import Registry, parse_reference
from cryptlayer.errors import CryptlayerError, TamperedImageError, UsageError, printable
from cryptlayer.fsutil import (
    DIR_FLAGS,
    MAX_IMAGE_JSON,
    FileId,
    UntrustedFileError,
    make_dir,
    read_untrusted,
    try_lock,
)
from cryptlayer.image import envelope, signatures
from cryptlayer.image import manifest as manifest_mod
from cryptlayer.progress import Progress, Silent


class Store(Protocol):
    def prepare(self) -> None: ...
    def push_blob(self, source: BinaryIO, digest: str, size: int,
                  progress: Callable[[int], None]) -> bool: ...  # fmt: skip
    def put_manifest(self, data: bytes, digest: str) -> None: ...
    def get_manifest(self) -> tuple[bytes, str]: ...
    def pull_blob(self, digest: str, size: int, out: BinaryIO,
                  progress: Callable[[int], None]) -> None: ...  # fmt: skip


def open_store(text: str, *, tls_verify: bool = True, cert_dir: Path | None = None,
               **auth: Any) -> Any:  # fmt: skip
    """A registry (docker://HOST/REPO[:TAG|@DIGEST], docker:// optional) or a layout
    (oci:PATH[:TAG])."""
    if text.startswith("oci:"):
        path, _, tag = text.removeprefix("oci:").partition(":")
        if not path:
            raise UsageError(f"{text!r} names no path", "use oci:PATH[:TAG]")
        if tag and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):  # as skopeo
            raise UsageError(f"{printable(text)}: {printable(tag)} is not a tag (letters, digits,"
                             " _ . -; 128 at most)", "use oci:PATH[:TAG]")  # fmt: skip
        return Layout(Path(path), tag)
    return Registry(parse_reference(text), tls_verify=tls_verify, cert_dir=cert_dir, **auth)


Show = Callable[[str, int], Progress]


def _quiet(_label: str, _total: int) -> Progress:
    return Silent()


@contextmanager
def _bar(show: Show, blob: artifact.Blob, phase: str) -> Iterator[Callable[[int], None]]:
    """A progress display for one blob, and the callback that feeds it bytes done."""
    bar = show(blob.name, blob.size)
    try:
        yield lambda done: bar.update(phase, done)
    finally:
        bar.close()


def push(image: Path, store: Store, show: Show = _quiet) -> tuple[str, int]:
    """Returns the manifest digest and how many blobs were sent."""
    image = image.resolve()
    loaded = manifest_mod.load(image)
    with artifact.blobs_of(image, loaded) as outgoing:
        store.prepare()
        sent = 0
        for blob in [outgoing.statement, *outgoing.others]:
            with _bar(show, blob, "push") as report:
                source = outgoing.source(blob)
                sent += store.push_blob(source, blob.digest, blob.size, report)
        data = artifact.oci_manifest(outgoing.statement, outgoing.others, loaded.created)
    digest = oci.digest_of(data)
    store.put_manifest(data, digest)
    return digest, sent


@dataclass(frozen=True)
class Pulled:
    """What pull did: the image digest, the manifest digest, and whether anything was fetched."""

    image_digest: str
    manifest_digest: str
    fetched: bool


def pull(store: Store, target: Path, *, digest: str | None = None, trust: Path | None = None,
         show: Show = _quiet) -> Pulled:  # fmt: skip
    """Pull into `target`. `digest` pins the image digest (the statement's, as `inspect` shows
    it; a manifest digest is pinned as REF@sha256:...). A target that exists must be this image,
    file by file (then it costs one manifest request), and trusted if `trust` is given."""
    if trust is not None:
        signatures.load_trust(trust)  # a bad trust file is bad input before any fetch
    data, found = store.get_manifest()
    statement, others = artifact.parse(data, str(store))
    if digest is not None and statement.digest != digest:
        raise TamperedImageError(
            f"{store} is image digest {statement.digest}, not the pinned {digest}",
            "it was re-tagged, or this is another image (--digest takes the image digest that"
            " `inspect` shows; pin a manifest digest as REF@sha256:...)",
        )
    if os.path.lexists(target):
        _check_existing(target, statement, others, trust)
        return Pulled(statement.digest, found, False)
    try:
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot pull into {target}: {target.parent} is not a directory"
                         f" ({err.strerror})", "create it first") from None  # fmt: skip
    try:
        work = _WorkDir.open(parent, f".{target.name}.pull-{found.removeprefix('sha256:')[:12]}",
                             target)  # fmt: skip
        with work:
            _fill(store, work, statement, others, trust, show)
            work.prune({statement.name, *(b.name for b in others)})
            work.publish()
            if not work.named_here():
                raise UsageError(
                    f"{work.shown} was renamed or replaced while pulling",
                    f"pull into a directory only you can write (not {target.parent})",
                )
            if os.path.lexists(target) or not _rename_noreplace(parent, work.name, target.name):
                raise UsageError(  # the complete copy stays: say where, and what to do with it
                    f"{target} appeared while pulling; the complete copy is in {work.shown}",
                    f"rename it yourself (mv {work.shown} NEW-DIRECTORY), or remove it"
                    f" (rm -r {work.shown})",
                )
    finally:
        os.close(parent)
    return Pulled(statement.digest, found, True)


def _fill(store: Store, work: _WorkDir, statement: artifact.Blob, others: list[artifact.Blob],
          trust: Path | None, show: Show) -> None:  # fmt: skip
    """Fetch the statement, then the files it names: signatures and keys.json, the trust check
    (before the large files), then the layers and their trees."""
    if statement.size > MAX_IMAGE_JSON:  # as a local one is read: never fetched, let alone kept
        raise TamperedImageError(
            f"{store} lists its statement ({statement.name}) with {statement.size} bytes, more"
            f" than {MAX_IMAGE_JSON}", "the manifest was changed; pull from the publisher",
        )  # fmt: skip
    _fetch(store, work, statement, show, [statement, *others])
    loaded = work.named(manifest_mod.load)
    _only_named(store, statement, loaded, others)
    small = [b for b in others if _beside(b)]
    if any(b.name.startswith(f"{signatures.DIR}/") for b in others):
        work.subdir(signatures.DIR)
    for blob in small:
        _fetch(store, work, blob, show, [statement, *others])
    if trust is not None:
        try:
            work.named(lambda image: signatures.require_trusted(image, loaded.raw, trust))
        except TamperedImageError:
            work.remove()  # a refused image is not kept to resume
            raise
    for blob in others:
        if blob not in small:
            _fetch(store, work, blob, show, [statement, *others])


def _only_named(store: Store, statement: artifact.Blob, loaded: manifest_mod.Manifest,
                others: list[artifact.Blob]) -> None:  # fmt: skip
    """TamperedImageError unless the manifest's files are exactly those the statement names (its
    layers and trees, of their sizes), keys.json and signatures."""
    expected = {}
    for layer in loaded.layers:
        expected[layer.file], expected[layer.tree] = layer.size, layer.tree_size
    names = {b.name for b in others}
    for blob in others:
        if blob.name in expected and blob.size != expected[blob.name]:
            raise TamperedImageError(
                f"{store} lists {blob.name} with {blob.size} bytes; image {statement.digest}"
                f" says {expected[blob.name]}",
                "the manifest was changed; pull from the publisher",
            )
        if blob.name not in expected and not _beside(blob):
            raise TamperedImageError(
                f"{store} carries {blob.name}, a file image {statement.digest} does not name",
                "the manifest was changed; pull from the publisher",
            )
        limit = MAX_IMAGE_JSON if blob.name == envelope.FILE else signatures.MAX_SIGNATURE_BYTES
        if blob.name not in expected and blob.size > limit:  # never read past that anyway
            raise TamperedImageError(
                f"{store} lists {blob.name} with {blob.size} bytes, more than {limit}",
                "the manifest was changed; pull from the publisher",
            )
    if (count := sum(b.name.startswith(f"{signatures.DIR}/") for b in others)) > (
        signatures.MAX_SIGNATURES
    ):
        raise TamperedImageError(
            f"{store} lists {count} signatures, more than {signatures.MAX_SIGNATURES}",
            "the manifest was changed; pull from the publisher",
        )
    if missing := sorted(set(expected) - names):
        raise TamperedImageError(
            f"{store} lacks {', '.join(missing)} of image {statement.digest}",
            "the manifest was changed; pull from the publisher",
        )


def _beside(blob: artifact.Blob) -> bool:
    """Whether `blob` is one of the files an image has beside those its statement names:
    keys.json, or a signature."""
    if blob.name == envelope.FILE:
        return blob.media_type == artifact.KEYS_TYPE
    return (
        blob.media_type == artifact.SIGNATURE_TYPE
        and blob.name.startswith(f"{signatures.DIR}/")
        and blob.name.endswith(signatures.SUFFIX)
    )


def _fetch(store: Store, work: _WorkDir, blob: artifact.Blob, show: Show,
           every: list[artifact.Blob]) -> None:  # fmt: skip
    """One blob into its file of the work directory: kept if complete and correct (an
    interrupted pull), continued if shorter, else fetched anew; removed if it is not the blob."""
    out = work.file(blob.name)
    try:
        with out:  # (closing flushes: a small file's ENOSPC may come only then)
            fd = out.fileno()
            if os.fstat(fd).st_size == blob.size and artifact.fd_digest(fd)[0] == blob.digest:
                return  # complete from an interrupted pull, and checked again
            if os.fstat(fd).st_size >= blob.size:
                os.ftruncate(fd, 0)
            with _bar(show, blob, "pull") as report:
                store.pull_blob(blob.digest, blob.size, out, report)
    except TamperedImageError:
        work.unlink(blob.name)
        raise
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        need = sum(b.size for b in every)
        raise UsageError(
            f"no space left on the device of {work.target.parent} for {blob.name} (the"
            f" image takes {need} bytes)",
            f"free some space, then pull again: it resumes from {work.name}",
        ) from None


PRIVATE_HINT = "remove it (rm -r {0}) and pull again: pull resumes only a directory it made"


class _WorkDir:
    """`.NAME.pull-DIGEST` beside the target: made by us, mode 0700, or (an interrupted pull)
    found, real, ours and private; held open, every file in it reached by descriptor."""

    def __init__(self, parent: int, name: str, target: Path, fd: int) -> None:
        self.parent, self.name, self.target, self.fd = parent, name, target, fd
        self.shown = target.parent / name
        self._dirs: dict[str, int] = {"": fd}
        self._stack = ExitStack()
        self._stack.callback(os.close, fd)

    @classmethod
    def open(cls, parent: int, name: str, target: Path) -> _WorkDir:
        make_dir(name, 0o700, dir_fd=parent, shown=target.parent / name)  # or an interrupted pull's
        fd = _private_dir(parent, name, target.parent / name)
        if not try_lock(fd):
            os.close(fd)
            raise UsageError(f"another pull into {target} is running",
                             "wait for it to finish") from None  # fmt: skip
        work = cls(parent, name, target, fd)
        if not work.named_here():  # renamed into place by the pull we waited on
            work.__exit__()
            raise UsageError(f"another pull into {target} finished meanwhile", "pull again")
        return work

    def __enter__(self) -> _WorkDir:
        return self

    def __exit__(self, *_: object) -> None:
        self._stack.close()

    def subdir(self, name: str) -> None:
        with suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=self.fd)
        self._dirs[name] = _private_dir(self.fd, name, self.shown / name)
        self._stack.callback(os.close, self._dirs[name])

    def prune(self, keep: set[str]) -> None:
        """Remove what is not in `keep`: what an interrupted pull of another manifest whose
        digest begins as this one's left (the name holds only 12 hex digits of it)."""
        for entry in os.listdir(self.fd):
            if (
                entry not in keep
                and entry not in self._dirs
                and stat.S_ISDIR(os.stat(entry, dir_fd=self.fd, follow_symlinks=False).st_mode)
            ):
                self.subdir(entry)  # ours and private, as the work directory is
        for folder, fd in sorted(self._dirs.items(), reverse=True):
            for entry in os.listdir(fd):
                name = f"{folder}/{entry}" if folder else entry
                if name not in keep and name not in self._dirs:
                    os.unlink(entry, dir_fd=fd)
            if folder and not any(n.startswith(f"{folder}/") for n in keep):
                os.rmdir(folder, dir_fd=self.fd)

    def _at(self, name: str) -> tuple[int, str]:
        folder, _, base = name.rpartition("/")
        return self._dirs[folder], base

    def file(self, name: str) -> BinaryIO:
        """File `name`, readable and writable: created new, or (resuming) the one we made."""
        dir_fd, base = self._at(name)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(base, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        except FileExistsError:
            try:
                fd = artifact.open_file(dir_fd, base, self.shown / name, flags=os.O_RDWR)
            except UsageError as err:
                raise UsageError(err.message, PRIVATE_HINT.format(self.shown)) from None
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():  # (one we made, or root's if we are root)
            os.close(fd)
            raise UsageError(f"{self.shown / name} is not ours (uid {st.st_uid})",
                             PRIVATE_HINT.format(self.shown))  # fmt: skip
        return os.fdopen(fd, "r+b")

    def publish(self) -> None:
        """Make the finished directories readable by others (mode 0755), as an image is."""
        for fd in self._dirs.values():
            os.fchmod(fd, 0o755)

    def unlink(self, name: str) -> None:
        dir_fd, base = self._at(name)
        os.unlink(base, dir_fd=dir_fd)

    def named(self, use: Callable[[Path], Any]) -> Any:
        """`use` on the work directory reached through our descriptor (whatever its name now
        leads to), its errors naming the target instead."""
        held = Path(f"/proc/self/fd/{self.fd}")
        try:
            return use(held)
        except CryptlayerError as err:
            err.message = err.message.replace(str(held), str(self.target))
            raise

    def remove(self) -> None:
        """Remove the work directory through our descriptors (ours and private: nobody else put
        anything in it), then its name if that still leads to it: in a parent others may write
        without the sticky bit, a neighbour can rename another of our directories to that name."""
        self.prune(set())
        if self.named_here():
            os.rmdir(self.name, dir_fd=self.parent)

    def named_here(self) -> bool:
        """Whether our name in the parent still leads to our directory."""
        try:
            st = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return FileId.of(st) == FileId.of(os.fstat(self.fd))


def _private_dir(dir_fd: int, name: str, shown: Path) -> int:
    """Directory `name` of `dir_fd`, opened without following a symlink; UsageError unless it
    is ours (the effective uid) and neither group nor others may use it."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        raise UsageError(f"{shown} is not a directory pull made ({err.strerror}; a symlink is"
                         " not followed)", PRIVATE_HINT.format(shown)) from None  # fmt: skip
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise UsageError(
            f"{shown} is not a directory pull made (owned by uid {st.st_uid}, mode"
            f" {stat.S_IMODE(st.st_mode):04o}): refusing to write into it",
            PRIVATE_HINT.format(shown),
        )
    return fd


def _check_existing(target: Path, statement: artifact.Blob, others: list[artifact.Blob],
                    trust: Path | None) -> None:  # fmt: skip
    """Return only if `target` holds this image, every file's sha256 as the manifest says
    (keys.json too: a rekeyed copy is another image now), and, with `trust`, is trusted."""
    exists = "choose a new directory (pull never overwrites)"
    try:
        dir_fd = os.open(target, DIR_FLAGS)
    except OSError as err:
        raise UsageError(f"{target} already exists and is not an image directory"
                         f" ({err.strerror})", exists) from None  # fmt: skip
    try:
        _require_ours(os.fstat(dir_fd), target, exists)
        try:
            raw = read_untrusted(manifest_mod.MANIFEST, MAX_IMAGE_JSON, dir_fd=dir_fd)
        except (OSError, UntrustedFileError):
            raise UsageError(f"{target} already exists and is not a cryptlayer image",
                             exists) from None  # fmt: skip
        if oci.digest_of(raw) != statement.digest:
            raise UsageError(f"{target} already exists and holds another image", exists)
        for blob in others:
            try:
                fd = artifact.open_file(dir_fd, blob.name, target / blob.name)
            except UsageError:
                fd = -1
            try:
                if fd >= 0:
                    _require_ours(os.fstat(fd), target / blob.name, exists)
                same = fd >= 0 and artifact.fd_digest(fd) == (blob.digest, blob.size)
            finally:
                if fd >= 0:
                    os.close(fd)
            if not same:
                rekeyed = " (rekeyed here? then it is another image now)" * (
                    blob.name == envelope.FILE
                )
                raise TamperedImageError(
                    f"{target} does not match image {statement.digest} ({blob.name}"
                    f" differs{rekeyed})",
                    "remove it and pull again, or pull into a new directory",
                )
    finally:
        os.close(dir_fd)
    if trust is not None:
        signatures.require_trusted(target, raw, trust)


def _require_ours(st: os.stat_result, shown: Path, hint: str) -> None:
    """UsageError unless `st` is root's or ours and neither group nor others may write it: what
    another user can change at any moment is not a copy pull can call up to date."""
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise UsageError(
            f"{shown} already exists and is not yours to vouch for (owned by uid {st.st_uid},"
            f" mode {stat.S_IMODE(st.st_mode):04o})",
            hint,
        )


RENAME_NOREPLACE = 1


def _rename_noreplace(dir_fd: int, old: str, new: str) -> bool:
    """Rename `old` to `new` in `dir_fd` unless `new` exists (renameat2 RENAME_NOREPLACE: no
    instant between the look and the rename); False if it exists. A kernel or file system
    without the flag: a plain rename (which never replaces a non-empty directory either)."""
    import ctypes

    from cryptlayer.fsutil import libc

    done = libc().renameat2(dir_fd, old.encode(), dir_fd, new.encode(), RENAME_NOREPLACE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), new)
    os.rename(old, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return True
