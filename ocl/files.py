"""Writing files safely: atomic replacement, durable renames, space allocated up front, and
the check that a directory can be written before anything is.

- :func:`atomic_file` / :func:`atomic_path` / :func:`write_atomic`: a temp file in the same
  directory, fsynced and renamed over the target (then the directory fsynced): a crash
  leaves the old file or the new one, never a torn one. An :class:`OSError` becomes one
  :class:`~ocl.errors.StorageError` naming the file (disk full: the bytes needed and free).
- :func:`preallocate`: allocate a file's bytes now, so a full disk shows up at once, with the
  size needed, not in the middle of a run (or as a SIGBUS in a memory-mapped write).
- :func:`check_writable_dir`: refuse an unwritable directory before a run writes anything.
- :func:`remove_stale_temps`: remove the temp files of writers that died (a shared directory
  such as the feature cache, which no single process owns).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

from ocl.errors import OCLError, storage_error

log = logging.getLogger(__name__)

#: A tag of this host in temp-file names: a PID means something only on the host that wrote it.
_HOST = hashlib.sha1(platform.node().encode()).hexdigest()[:8]
#: A temp file whose writer is unknown (named by an earlier version) is removed only when it has
#: not been written to for this long: a live writer's file changes far more often than that.
STALE_SECONDS = 3600.0
_TEMP = re.compile(r"^\..+\.(\d+)-([0-9a-f]{8})\.[^.]+\.tmp$")

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
    """A temp file next to ``path`` (``.<name>.<pid>-<host>.<random>.tmp``, created empty: the
    writer's PID and a tag of its host name, so that :func:`remove_stale_temps` can tell a
    dead writer's leftover from a live one's file) for a writer that
    needs a file name (``np.save``, a memory map); on a clean exit it is fsynced and renamed
    onto ``path``, and the directory fsynced. On any error the temp file is removed and
    ``path`` is untouched; an :class:`OSError` becomes a :class:`StorageError` naming
    ``path`` (``what``: a phrase for the message, e.g. "writing the checkpoint"; ``need``:
    bytes the write needs, if known)."""
    path = Path(path)
    doing = what or f"writing {path.name}"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-{_HOST}.", suffix=".tmp")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, max_age: float = STALE_SECONDS) -> list[str]:
    """Remove the temp files (``.<name>...tmp``, see :func:`atomic_path`) that interrupted writers
    left in ``directory``, and only those: a file named by a writer of this host whose PID is no
    longer running, or (another host's, or an earlier version's name without a PID) one not
    modified for ``max_age`` seconds. A live writer's temp file is never touched, so this is
    safe in a directory several processes write (the feature cache). Returns the names removed.
    """
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(".") and e.name.endswith(".tmp")) or not e.is_file(follow_symlinks=False):
            continue
        m = _TEMP.match(e.name)
        try:
            if m and m.group(2) == _HOST:
                stale = int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))
            else:
                stale = now - e.stat(follow_symlinks=False).st_mtime > max_age
            if stale:
                os.unlink(e.path)
                removed.append(e.name)
        except OSError:
            continue  # gone already (another process cleaned it), or not ours to remove
    if removed:
        log.info("removed %d temp file(s) that interrupted writes left in %s: %s", len(removed), directory,
                 ", ".join(sorted(removed)))
    return removed
