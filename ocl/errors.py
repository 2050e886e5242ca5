"""User-facing errors.

Anything a user can cause (a missing file, a bad shape, a label out of range, a bad
config value) is raised as :class:`OCLError` with a message that says what is wrong,
where, and how to fix it. The CLI prints the message without a traceback and exits
non-zero; programming errors stay ordinary exceptions with tracebacks.

The machine can cause some too: a full disk, a file without permission, a read-only file
system. :func:`storage_error` turns such an :class:`OSError` into a :class:`StorageError`
that names the path, what was being done, and (for a full disk) how many bytes were needed.
"""

from __future__ import annotations

import errno
import os
import shutil


class OCLError(Exception):
    """An error caused by the user's input, with a message meant to be read by them."""


class StorageError(OCLError):
    """Reading or writing a file failed for a reason outside the program (disk full,
    permission, read-only file system, I/O error). ``disk_full`` says whether space ran out."""

    def __init__(self, message: str, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM}


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor), or None."""
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def storage_error(e: OSError, path: str | os.PathLike, doing: str, need: int | None = None) -> StorageError:
    """One clear message for ``e``, raised while ``doing`` (e.g. "writing the checkpoint") on ``path``.

    Args:
        e: the error.
        path: the file the operation was on (``e.filename`` often is not set: ``os.pwrite``).
        doing: what was being done, as a phrase that follows "while".
        need: bytes the failed write needed, when known.
    """
    where = os.fspath(path)
    if e.errno in _FULL:
        free = free_bytes(where)
        what = "no space left" if e.errno == errno.ENOSPC else "disk quota exceeded"
        msg = f"{what} on the device of {where} while {doing}"
        details = []
        if need is not None:
            details.append(f"{need:,} bytes were needed")
        if free is not None:
            details.append(f"{free:,} bytes are free")
        msg += f" ({', '.join(details)})" if details else ""
        return StorageError(msg + ".", disk_full=True)
    if e.errno in _DENIED:
        return StorageError(f"permission denied: {where} while {doing}; fix its permissions (or choose "
                            "another path).")
    if e.errno == errno.EROFS:
        return StorageError(f"{where} is on a read-only file system (while {doing}); choose another path.")
    return StorageError(f"{where}: {e.strerror or e} (while {doing}).")


def describe_os_error(e: OSError) -> str:
    """``e`` as one line that names its path(s) when it has any (an escaped :class:`OSError`)."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{paths}: {reason}" if paths else f"{reason} ({type(e).__name__}, no path given by the system)"
