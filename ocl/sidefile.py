"""Append-only side files of a run: large state that a checkpoint refers to instead of copying.

The per-step records (``steps.npy``) and the transformer's replay history
(``replay_history.bin``) grow with the stream; copying them into every checkpoint would
make checkpoints as large as the stream. A :class:`SideFile` is an append-only file with a
running sha256 of its bytes ``[0, size)``. Pickled (inside a checkpoint) it becomes::

    {"path": <relative to the run directory>, "size": size, "sha256": <of bytes [0, size)>}

after an fsync, so the bytes a checkpoint counts are on disk before the checkpoint is.
Unpickling (on resume) resolves the path against the directory of the checkpoint being
loaded (a copied run directory resumes into its own files), and re-hashes ``[0, size)``:
a missing, truncated or edited file is refused with :class:`OCLError` before anything is
learned from it. Bytes past ``size`` (written after the checkpoint by a run that then
died) are never read and get overwritten. The re-hash reads the file once per resume
(~1 s per GB); appends only update the running hash.

Any object may hold a SideFile; wherever it sits in the pickled graph (a learner, the
tracker's state), :func:`ocl.checkpoint.save_atomic` records and :func:`ocl.checkpoint.load`
verifies it, with no code specific to that object.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ocl.errors import OCLError, storage_error
from ocl.files import preallocate

_BASE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ocl_sidefile_base", default=None)
_BLOCK = 1 << 22  # bytes hashed at a time when verifying


@contextlib.contextmanager
def relative_to(run_dir: str | os.PathLike) -> Iterator[None]:
    """Pickle side files with paths relative to ``run_dir`` (and unpickle them from there)."""
    token = _BASE.set(Path(os.path.abspath(run_dir)))
    try:
        yield
    finally:
        _BASE.reset(token)


class SideFile:
    """An append-only file whose pickled form is a verified reference (see the module docstring).

    Args:
        path: the file (created or truncated); ``None``: an anonymous temporary file that
            disappears with the process and pickles its data instead of a reference.
        what: what it holds, for messages ("the replay history").
    """

    def __init__(self, path: str | os.PathLike | None, what: str = "a side file") -> None:
        self.path = None if path is None else os.path.abspath(path)
        self.what = what
        self.size = 0  # bytes [0, size) are committed (and hashed)
        self._hash = hashlib.sha256()
        self._open(truncate=True)

    def _open(self, truncate: bool) -> None:
        self._tmp = None
        if self.path is None:
            self._tmp = tempfile.TemporaryFile(prefix="ocl-side-")
            self._fd = self._tmp.fileno()
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise storage_error(e, self.path, f"opening {self.what}") from e

    @property
    def where(self) -> str:
        return self.path or f"<temporary file of {self.what}>"

    def reserve(self, nbytes: int) -> None:
        """Allocate the file's first ``nbytes`` now (see :func:`preallocate`)."""
        preallocate(self._fd, nbytes, self.where, self.what)

    def append(self, data: bytes | memoryview) -> None:
        """Write ``data`` at the end of the committed bytes."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # pwrite may write less than asked (a nearly full disk)
            try:
                n = os.pwrite(self._fd, view[done:], self.size + done)
            except OSError as e:
                raise storage_error(e, self.where, f"writing {self.what}", need=len(view) - done) from e
            if n <= 0:
                raise storage_error(OSError(errno.ENOSPC, "no space"), self.where, f"writing {self.what}",
                                    need=len(view) - done)
            done += n
        self._hash.update(view)
        self.size += len(view)

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` committed bytes from ``offset``."""
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"read [{offset}, {offset + n}) beyond the {self.size} committed bytes of {self.where}")
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise OCLError(f"{self.where}: {self.what} is shorter than its {self.size:,} committed bytes; "
                           "it was truncated while the run was using it.")
        return data

    def sync(self) -> None:
        """Make the committed bytes durable."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise storage_error(e, self.where, f"flushing {self.what} to disk") from e

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
        elif getattr(self, "_fd", None) is not None:
            os.close(self._fd)
        self._fd, self._tmp = None, None

    def __del__(self) -> None:
        try:  # not contextlib.suppress: at interpreter exit module globals may already be None
            self.close()
        except Exception:
            pass

    @property
    def sha256(self) -> str:
        """Hex sha256 of the committed bytes."""
        return self._hash.hexdigest()

    # ------------------------------------------------------------ pickling (checkpoints)
    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = {"what": self.what, "size": self.size, "sha256": self.sha256}
        if self.path is None:  # an anonymous file dies with the process: carry the data
            state["data"] = self.pread(self.size, 0) if self.size else b""
            return state
        self.sync()  # bytes [0, size) durable before a checkpoint counts them
        base = _BASE.get()
        if base is None:
            state["path"] = self.path
        else:
            rel = os.path.relpath(self.path, base)
            if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                raise ValueError(f"{self.what} ({self.path}) lies outside the run directory {base}: a "
                                 "checkpoint can only refer to files inside it")
            state["path"] = rel
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.what, self.size = state["what"], 0
        self._hash = hashlib.sha256()
        if "data" in state:
            self.path = None
            self._open(truncate=True)
            self.append(state["data"])
        else:
            base = _BASE.get()
            self.path = os.path.join(base, state["path"]) if base is not None else state["path"]
            self._verify_and_open(int(state["size"]), state["sha256"])
        if self.sha256 != state["sha256"]:
            raise OCLError(f"{self.where}: {self.what} does not match its checkpoint.")

    def _verify_and_open(self, size: int, sha256: str) -> None:
        fix = "Restore it, or start the run afresh in a new directory."
        if not os.path.isfile(self.path) or os.path.getsize(self.path) < size:
            self._fd = None
            raise OCLError(f"{self.path}: {self.what} of this checkpoint is missing or shorter than the "
                           f"{size:,} bytes the checkpoint counts; it was moved, deleted or truncated. {fix}")
        self._open(truncate=False)
        done = 0
        while done < size:
            block = os.pread(self._fd, min(_BLOCK, size - done), done)
            if not block:
                break
            self._hash.update(block)
            done += len(block)
        self.size = done
        if done != size or self.sha256 != sha256:
            self.close()
            raise OCLError(
                f"{self.path} ({self.what}) changed after the checkpoint was written: its first {size:,} bytes, "
                f"which the checkpoint relies on, have sha256 {self.sha256[:16]}..., the checkpoint recorded "
                f"{sha256[:16]}.... {fix}"
            )


def pread_records(fd: int, dtype: np.dtype, offset: int, starts: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """``count`` consecutive fixed-size records from each of ``starts`` (record indices), read
    with ``os.pread`` from byte ``offset`` on of the open file ``fd``.

    Never through a memory mapping: pages touched through a mapping stay resident and count
    towards the process's RSS (the kernel maps ~16 neighbouring pages per fault), so reading
    a long file in random order that way would look like leaked memory; ``pread`` leaves the
    bytes in the OS page cache only.

    Returns:
        ``(len(starts), count)`` records, read-only (a subarray dtype such as ``(float32, (D,))``
        adds its shape: ``(len(starts), count, D)``).
    """
    dtype = np.dtype(dtype)
    size = dtype.itemsize
    buf = b"".join(os.pread(fd, count * size, offset + int(s) * size) for s in starts)
    if len(buf) != len(starts) * count * size:
        raise OCLError(f"a file of fixed-size records is shorter than the {len(starts) * count} records read from it; "
                       "it was truncated while in use.")
    return np.frombuffer(buf, dtype=dtype).reshape(len(starts), count, *dtype.shape)


class RecordFile(SideFile):
    """A side file of fixed-size records: an optional header, then ``dtype`` records appended
    in order (the per-step records, the replay history). Pickles like a :class:`SideFile`, with
    its dtype and header size.

    Args:
        path: the file (created or truncated), or ``None`` (see :class:`SideFile`).
        dtype: one record.
        what: what it holds, for messages.
        header: bytes written before the first record (e.g. an ``.npy`` header).
    """

    def __init__(self, path: str | os.PathLike | None, dtype: np.dtype, what: str, header: bytes = b"") -> None:
        super().__init__(path, what)
        self.dtype, self.offset = np.dtype(dtype), len(header)
        if header:
            self.append(header)

    def __len__(self) -> int:
        """Records committed."""
        return (self.size - self.offset) // self.dtype.itemsize

    def append_records(self, records: np.ndarray) -> None:
        """Append ``(n,)`` records of :attr:`dtype`."""
        if records.dtype != self.dtype:
            raise ValueError(f"{self.what}: records of {records.dtype}, expected {self.dtype}")
        self.append(records.tobytes())

    def read(self, starts: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
        """``count`` committed records from each of ``starts``: ``(len(starts), count)`` (see
        :func:`pread_records`). Works on a closed file too (it is opened for the read)."""
        n = len(self)
        if len(starts) and (min(starts) < 0 or max(starts) + count > n):
            raise ValueError(f"read of records beyond the {n} committed ones of {self.where}")
        if self._fd is not None:
            return pread_records(self._fd, self.dtype, self.offset, starts, count)
        fd = os.open(self.where, os.O_RDONLY)
        try:
            return pread_records(fd, self.dtype, self.offset, starts, count)
        finally:
            os.close(fd)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "dtype": self.dtype, "offset": self.offset}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.dtype, self.offset = np.dtype(state.pop("dtype")), int(state.pop("offset"))
        super().__setstate__(state)
