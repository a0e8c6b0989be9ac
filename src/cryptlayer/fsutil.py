"""Small file-system helpers: atomic writes, and reading files that an attacker may have made."""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

# (their home is the error tree; imported from here too)
from cryptlayer.errors import NotRegularError as NotRegularError
from cryptlayer.errors import UntrustedFileError as UntrustedFileError

# How an untrusted file is opened, once open_regular has seen it is a regular file: never
# through a symlink in its last component, never blocking, never as a controlling terminal,
# never kept across exec.
UNTRUSTED = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# How a name is looked at first: O_PATH opens no device, FIFO or socket (no driver's open runs,
# nothing blocks), and with O_NOFOLLOW it gives a symlink itself rather than its target.
LOOK = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# How a directory is opened wherever a symlink could have been planted in its place: as the
# directory itself, never through a symlink (the open fails: ENOTDIR), never kept across exec.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# openat2(2)'s RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS: ".." and absolute symlinks stay inside
RESOLVE_IN_ROOT = 0x10 | 0x02
RESOLVE_NO_SYMLINKS = 0x04
SYS_OPENAT2 = 437  # the same number on every architecture (syscalls added since 5.1 are)


class FileId(NamedTuple):
    """Which file an open descriptor or a name is, on this host: (device, inode) as fstat(2) gives
    them; the same file whatever it is called meanwhile. In JSON (records, openings, loop steps):
    [DEV, INO]."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino)

    def to_json(self) -> list[int]:
        return [self.dev, self.ino]

    @classmethod
    def from_json(cls, value: Any) -> FileId:
        """From [DEV, INO] (or "DEV:INO", as a loop step recorded it before); ValueError or
        TypeError if it is neither."""
        if isinstance(value, str):
            value = value.split(":")
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(f"{value!r} is not a file's [device, inode]")
        dev, ino = value
        if isinstance(dev, bool) or isinstance(ino, bool):
            raise TypeError(f"{value!r} is not a file's [device, inode]")
        return cls(int(dev), int(ino))


def kind(mode: int) -> str:
    """What a file of `mode` is, for a message ("a FIFO", "a character device node"...)."""
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device node"), (stat.S_ISBLK, "a block device node"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")]  # fmt: skip
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def reopen_regular(path_fd: int, what: str, flags: int = UNTRUSTED) -> int:
    """The file behind the O_PATH descriptor `path_fd` (left open), opened with `flags` only if
    it is a regular file: the very inode that was checked (through /proc/self/fd), so that a
    device or FIFO is never opened; NotRegularError otherwise, OSError(ELOOP) for a symlink."""
    st = os.fstat(path_fd)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "is a symbolic link", what)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularError(what, kind(st.st_mode))
    return os.open(f"/proc/self/fd/{path_fd}", flags & ~os.O_NOFOLLOW | os.O_NOCTTY)


def open_regular(name: str, *, dir_fd: int | None = None, flags: int = UNTRUSTED) -> int:
    """Open `name` with `flags` only if it is a regular file, never through a symlink in its last
    component (OSError ELOOP) and never opening anything else (NotRegularError): the name is
    looked at with O_PATH first. OSError as open(2) gives it (FileNotFoundError...)."""
    path_fd = os.open(name, LOOK, dir_fd=dir_fd)
    try:
        return reopen_regular(path_fd, name, flags)
    finally:
        os.close(path_fd)


@functools.cache
def libc() -> Any:
    """The C library, for the system calls Python's os module lacks (errno kept for ctypes)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def open_in_root(root_fd: int, relative: str, *, symlinks: bool = True) -> int:
    """Open `relative` below directory `root_fd` as if `root_fd` were `/` (symlinks and `..`
    included; with `symlinks` False, any symlink on the way is refused with ELOOP), for reading
    without blocking; OSError as open(2) gives it.

    Only a regular file is opened for reading; anything else (a device, a FIFO) is not opened at
    all and comes back as an O_PATH descriptor, good for fstat only, which callers refuse."""
    path_fd = _look_in_root(root_fd, relative, symlinks)
    try:
        mode = os.fstat(path_fd).st_mode
        if stat.S_ISLNK(mode):  # (the lookup without openat2 follows none)
            raise OSError(errno.ELOOP, "is a symbolic link", relative)
        if not stat.S_ISREG(mode):
            return path_fd
        fd = reopen_regular(path_fd, relative)
    except BaseException:
        os.close(path_fd)
        raise
    os.close(path_fd)
    return fd


def _look_in_root(root_fd: int, relative: str, symlinks: bool) -> int:
    """open_in_root's lookup: an O_PATH descriptor of what `relative` names."""
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]  # fmt: skip

    resolve = RESOLVE_IN_ROOT | (0 if symlinks else RESOLVE_NO_SYMLINKS)
    how = OpenHow(os.O_PATH | os.O_CLOEXEC, 0, resolve)
    fd = libc().syscall(SYS_OPENAT2, root_fd, relative.encode(), ctypes.byref(how),
                         ctypes.sizeof(how))  # fmt: skip
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err != errno.ENOSYS:
        raise OSError(err, os.strerror(err), relative)
    # A kernel before 5.6: no symlink is followed at all (stricter, never outside the root).
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, "refusing '..'", relative)
    current = root_fd
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = LOOK if last else UNTRUSTED | os.O_DIRECTORY
            nxt = os.open(part, flags, dir_fd=current)
            if current != root_fd:
                os.close(current)
            current = nxt
        return current
    except BaseException:
        if current != root_fd:
            os.close(current)
        raise


def make_dir(name: str | Path, mode: int, *, dir_fd: int | None = None,
             shown: str | Path | None = None) -> None:  # fmt: skip
    """Directory `name` (below `dir_fd`) made with `mode` unless something has that name already
    (what it is, the caller checks when it opens it: open_dir); UsageError("cannot create SHOWN:
    why") if it cannot be made."""
    from cryptlayer.errors import UsageError

    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as err:
        raise UsageError(f"cannot create {shown or name}: {err.strerror}") from None


def open_dir(name: str | Path, *, dir_fd: int | None = None, mode: int | None = None,
             shown: str | Path | None = None) -> int:  # fmt: skip
    """Directory `name` (below `dir_fd`), made first with `mode` if given and absent
    (make_dir), opened with DIR_FLAGS: OSError (ENOTDIR, for a symlink too) unless it is a
    directory itself."""
    if mode is not None:
        make_dir(name, mode, dir_fd=dir_fd, shown=shown)
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """flock `fd` without waiting: whether it is now held (False: another open file holds it,
    i.e. a live process; a dead one's lock is the kernel's to release)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def read_regular(fd: int, limit: int, what: str) -> bytes:
    """All of the open file `fd` (closed afterwards); UntrustedFileError unless it is a regular
    file of at most `limit` bytes."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularError(what, kind(st.st_mode))
        if st.st_size > limit:
            raise UntrustedFileError(f"{what} has {st.st_size} bytes, more than {limit}")
        chunks = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise UntrustedFileError(f"{what} has more than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_untrusted(name: str, limit: int, *, dir_fd: int | None = None) -> bytes:
    """A regular file of at most `limit` bytes, opened without following a symlink (in its last
    component) or blocking; FileNotFoundError if absent, UntrustedFileError if not such a file."""
    try:
        fd = open_regular(name, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UntrustedFileError(f"{name} is a symbolic link") from None
        raise
    return read_regular(fd, limit, name)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """All of `data` to `fd`: write(2) may write less than asked (a full disk, a signal), and a
    file renamed over another must be whole."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _mkstemp(directory: Path, prefix: str) -> tuple[int, str]:
    """tempfile.mkstemp(prefix=prefix, dir=directory)'s file (a new name, O_EXCL, no symlink
    followed, mode 0600, close-on-exec), without importing tempfile: its shutil and random
    (bz2, lzma, hashlib) cost a teardown's record update ~0.3 s under emulation (figure 12)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = os.path.join(directory, prefix + os.urandom(6).hex())
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(directory))


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new file, never half of one.

    `durable`: also on the disk before returning (fsync), so that a power cut keeps it. Without,
    the replacement is still atomic for every process and survives any crash but the machine's.
    """
    fd, tmp = _mkstemp(path.parent, f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomic_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """write_atomic by descriptor: `name` in the directory `dir_fd` replaced with `data`, through
    a temporary file created there new (O_EXCL, O_NOFOLLOW: never a name someone planted), synced,
    then renamed; whatever the directory's path leads to meanwhile."""
    tmp = f".{name}.{os.urandom(4).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


# The one limit on a JSON document of an image, wherever it is read (the image directory, an OCI
# layout, a registry): manifest.json, keys.json, the artifact's manifest, a layout's index.json.
# A few KiB in practice; 4 MiB is distribution's own limit on a manifest.
MAX_IMAGE_JSON = 4 << 20


def read_image_json(
    path: Path, fmt: str, missing_hint: str, *, dir_fd: int | None = None
) -> dict[str, Any]:
    """A JSON document of an image, of format `fmt`; UsageError saying what is wrong.

    The file is an attacker's: a regular file (no symlink, FIFO or device), size-capped. With
    `dir_fd`, it is `path.name` in that open directory (`path` is what messages show)."""
    return read_image_document(path, (fmt,), missing_hint, dir_fd=dir_fd)[0]


def read_image_document(
    path: Path,
    formats: tuple[str, ...],
    missing_hint: str,
    *,
    dir_fd: int | None = None,
    check: Callable[[bytes], None] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """read_image_json of one of `formats`, and the exact bytes it was parsed from; `check`
    (raising what it finds) is given those bytes before anything is parsed."""
    from cryptlayer.errors import DamagedImageError, UsageError

    damaged = "the image is damaged; rebuild it"
    try:
        if dir_fd is None:
            data = read_untrusted(str(path), MAX_IMAGE_JSON)
        else:
            data = read_untrusted(path.name, MAX_IMAGE_JSON, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UsageError(f"{path} is missing", missing_hint) from None
    except UntrustedFileError as err:
        raise DamagedImageError(f"{path}: {err}", damaged) from err
    except OSError as err:
        raise DamagedImageError(f"{path} is not valid JSON ({err})", damaged) from err
    if check is not None:
        check(bytes(data))
    try:
        raw = json.loads(data.decode("utf-8"))
    except RecursionError as err:
        raise DamagedImageError(f"{path} is nested too deeply", damaged) from err
    except ValueError as err:
        raise DamagedImageError(f"{path} is not valid JSON ({err})", damaged) from err
    if not isinstance(raw, dict) or raw.get("format") not in formats:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DamagedImageError(
            f"{path} is malformed: format is {found!r}, expected {formats[0]!r}", damaged
        )
    return raw, bytes(data)


def json_bytes(value: Any, *, compact: bool = False) -> bytes:
    """A JSON document as cryptlayer writes it: sorted keys, indented (or, `compact`, on one
    line: json's C encoder, for the journal's many writes), one final newline."""
    if compact:
        return (json.dumps(value, separators=(",", ":"), sort_keys=True) + "\n").encode()
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(
    path: Path, value: Any, mode: int = 0o644, *, durable: bool = True, compact: bool = False
) -> None:
    """write_atomic for a JSON document."""
    write_atomic(path, json_bytes(value, compact=compact), mode, durable=durable)


def write_new_file(path: Path, data: bytes | bytearray | memoryview, mode: int) -> None:
    """Create `path` with `data` and `mode`; never overwrite: UsageError if it exists."""
    from cryptlayer.errors import UsageError

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UsageError(
            f"{path} already exists", "choose another name; keygen never overwrites"
        ) from None
    except OSError as err:
        raise UsageError(f"cannot create {path}: {err.strerror}") from err
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def wipe_file(path: Path) -> None:
    """Overwrite `path` with zeros, then remove it (a header copy on tmpfs: its pages would
    otherwise go back to the kernel with the keyslots in them). Gone already is fine."""
    try:
        with open(path, "r+b") as f:
            f.write(bytes(os.fstat(f.fileno()).st_size))
    except FileNotFoundError:
        return
    path.unlink(missing_ok=True)
