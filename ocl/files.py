"""Writing files safely: atomic replacement, durable renames, space allocated up front, and
the check that a directory can be written before anything is.

- :func:`atomic_file` / :func:`atomic_path` / :func:`write_atomic`: a temp file in the same
  directory, fsynced and renamed over the target (then the directory fsynced): a crash
  leaves the old file or the new one, never a torn one. An :class:`OSError` becomes one
  :class:`~ocl.errors.StorageError` naming the file (disk full: the bytes needed and free).
- :func:`preallocate`: allocate a file's bytes now, so a full disk shows up at once, with the
  size needed, not in the middle of a run (or as a SIGBUS in a memory-mapped write).
- :func:`check_writable_dir`: refuse an unwritable directory before a run writes anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from ocl.errors import OCLError, storage_error

_UMASK = os.umask(0o022)  # read once (umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put back at once


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str | None = None, need: int | None = None) -> Iterator[Path]:
    """A temp file next to ``path`` (``.<name>.<random>.tmp``, created empty) for a writer that
    needs a file name (``np.save``, a memory map); on a clean exit it is fsynced and renamed
    onto ``path``, and the directory fsynced. On any error the temp file is removed and
    ``path`` is untouched; an :class:`OSError` becomes a :class:`StorageError` naming
    ``path`` (``what``: a phrase for the message, e.g. "writing the checkpoint"; ``need``:
    bytes the write needs, if known)."""
    path = Path(path)
    doing = what or f"writing {path.name}"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise storage_error(e, path, doing, need) from e
    try:
        with contextlib.suppress(OSError):  # the permissions open() would give, not mkstemp's 0600
            os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise storage_error(e, path, doing, need) from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", what: str | None = None,
                need: int | None = None) -> Iterator[IO]:
    """:func:`atomic_path`, opened for writing in ``mode`` (text modes without newline
    translation)."""
    with atomic_path(path, what, need) as tmp, open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
        yield f


def write_atomic(path: str | os.PathLike, data: bytes, what: str | None = None) -> None:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "wb", what, need=len(data)) as f:
        f.write(data)


def preallocate(fd: int, nbytes: int, where: str, what: str) -> None:
    """Allocate the first ``nbytes`` of the open file ``fd`` on disk now, so that a full disk
    shows up here, with the size needed, and not later: in the middle of a run, or as a
    SIGBUS when the file is written through a memory mapping. A no-op where the file system
    cannot preallocate."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return
        raise storage_error(e, where, f"allocating {what}", need=nbytes) from e


def check_writable_dir(path: str | os.PathLike, what: str = "the run directory",
                       fix: str = "choose another directory with hydra.run.dir=DIR (or fix its permissions)") -> None:
    """Raise :class:`OCLError` unless ``path`` is, or can be created as, a writable directory.

    Creates nothing: it probes the nearest existing ancestor with an anonymous temp file
    (``os.access`` is not enough: it says yes to root on a read-only file system).
    ``what`` names the directory in the message (``the run directory``);
    ``fix`` says what to do.
    """
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OCLError(f"cannot create {what} {path}: {probe} is a file, not a directory; {fix}.")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        why = e.strerror or str(e)
        if probe != path:  # the directory would be made in probe, which takes no new entries (/proc, a read-only mount)
            raise OCLError(f"cannot create {what} {path}: its parent {probe} does not accept new files or "
                           f"folders ({why}); {fix}.") from e
        raise OCLError(f"cannot write to {what} {path} ({why}); {fix}.") from e
