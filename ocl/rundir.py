"""A run directory: owned by one process at a time, written atomically, changed only by runs
that pass their checks.

- **Ownership.** :func:`claim` takes an exclusive ``fcntl.flock`` on ``<run dir>/.ocl.lock``
  (holder's PID, host, start time and command written inside; the file is removed when the
  claim ends). A second process is refused at once with :class:`OCLError` naming the holder.
  The kernel releases the lock on any exit, SIGKILL included, so a crashed run never leaves
  the directory locked (only a stale file, taken over by the next run). Claims nest within
  a process (the CLI claims, then :func:`ocl.run.run_experiment` claims again).
- **Commit.** Nothing of the run is written before :meth:`RunDir.commit`, which a run calls
  once all its checks passed (config, resume, data, learner). Until then a refused run
  leaves the directory as it found it: the lock file is removed (or its previous content
  restored) and a directory the claim created is removed again. Committing runs the
  registered callbacks (the CLI writes ``.hydra/`` and opens the log file there) and removes
  scratch left by an interrupted process.
- **Scratch.** Files are written atomically (:mod:`ocl.files`: a temp file in the same
  directory, fsynced and renamed over the target). Every temp file and scratch folder in a
  run directory is named ``.<name>.<random>.tmp`` (:func:`scratch_dir` for folders), so a
  later commit can recognise and remove it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from ocl.errors import OCLError, storage_error

log = logging.getLogger(__name__)

LOCK = ".ocl.lock"
_FIX = "choose another directory with hydra.run.dir=DIR (or fix its permissions)"


# ---------------------------------------------------------------- scratch


def _is_scratch(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def scratch_dir(run_dir: str | os.PathLike, label: str) -> Path:
    """A new private folder ``<run dir>/.<label>-<random>.tmp`` (removed by the caller when done;
    one left behind by a killed process is removed by the next commit in ``run_dir``)."""
    return Path(tempfile.mkdtemp(prefix=f".{label}-", suffix=".tmp", dir=run_dir))


def remove_scratch(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temp files and scratch folders an interrupted process left in ``run_dir``.
    Only call it while owning the directory. Returns their names."""
    removed = []
    with os.scandir(run_dir) as it:
        entries = [e for e in it if _is_scratch(e.name)]
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(e.name)
        except OSError as err:
            log.warning("could not remove the leftover temp file %s (%s)", e.path, err.strerror or err)
    if removed:
        log.info("removed %d temp file(s) an interrupted run left in %s: %s", len(removed), run_dir,
                 ", ".join(sorted(removed)))
    return removed


# ---------------------------------------------------------------- ownership


class RunDir:
    """This process's claim on a run directory (see the module docstring). Made by :func:`claim`.

    Attributes:
        path: the directory (absolute).
        committed: :meth:`commit` has run.
    """

    def __init__(self, path: Path, created: bool) -> None:
        self.path, self.created = path, created
        self.committed = False
        self._callbacks: list[Callable[[], None]] = []
        self._fd: int | None = None
        self._lock_was_new = False
        self._old_lock: bytes = b""
        self._depth = 0

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at :meth:`commit` (at once if it has run)."""
        if self.committed:
            fn()
        else:
            self._callbacks.append(fn)

    def commit(self) -> None:
        """The run passed its checks and is about to write: remove leftover scratch and run the
        callbacks. Idempotent."""
        if self.committed:
            return
        self.committed = True
        try:
            remove_scratch(self.path)
        except OSError as e:
            raise storage_error(e, self.path, "listing the run directory") from e
        for fn in self._callbacks:
            fn()

    # ------------------------------------------------------------ the lock
    def _acquire(self) -> None:
        lock = self.lock_path
        for _ in range(100):  # a holder that removes its new lock file (refused) can race with us
            try:
                fd, new = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
            except FileExistsError:
                try:
                    fd, new = os.open(lock, os.O_RDWR | os.O_CLOEXEC), False
                except FileNotFoundError:
                    continue
            except OSError as e:
                raise OCLError(f"cannot write to the run directory {self.path} ({e.strerror or e}); {_FIX}.") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OCLError(
                    f"{self.path} is in use by another ocl process ({holder}); a run directory belongs to "
                    f"one run at a time and nothing in it was changed. Wait for that run to finish (or stop "
                    f"it), or choose another directory with hydra.run.dir=DIR."
                ) from None
            except OSError as e:
                os.close(fd)
                raise OCLError(f"cannot lock {lock} ({e.strerror or e}); the file system does not support "
                               f"file locks: {_FIX}.") from e
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder had just removed: try again
                os.close(fd)
                continue
            self._fd, self._lock_was_new = fd, new
            self._old_lock = b"" if new else _pread_all(fd)
            info = json.dumps({"pid": os.getpid(), "host": platform.node(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "command": " ".join(sys.argv)[:500]}).encode() + b"\n"
            _replace_content(fd, info)
            return
        raise OCLError(f"could not take the lock {lock}: it keeps being replaced; {_FIX}.")

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self.committed or self._lock_was_new:
                # Removed while still locked: a process that opened it meanwhile finds, once it
                # holds the lock, that the path is gone or another file, and starts over (_acquire).
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_path)
            else:  # refused: leave a lock file left by a killed run as it was
                with contextlib.suppress(OSError):
                    _replace_content(fd, self._old_lock)
        finally:
            os.close(fd)  # releases the flock
        if not self.committed and self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty


def _pread_all(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def _replace_content(fd: int, data: bytes) -> None:
    os.pwrite(fd, data, 0)  # one write, then cut: a reader never sees an empty file in between
    os.ftruncate(fd, len(data))


def _read_holder(fd: int) -> str:
    """Who holds the lock, from the lock file (the holder writes it just after locking)."""
    for _ in range(20):
        try:
            info = json.loads(_pread_all(fd).decode())
            return (f"PID {info['pid']} on {info['host']}, running since {info['since']}: "
                    f"{info.get('command') or '?'}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            time.sleep(0.01)  # written a moment after the lock was taken
    return "PID unknown"


_HELD: dict[str, RunDir] = {}


@contextlib.contextmanager
def claim(path: str | os.PathLike, created: bool | None = None) -> Iterator[RunDir]:
    """Own the run directory ``path`` for the block: create it if needed, take its lock, and
    give it back on exit (see the module docstring). Nested claims of the same directory in
    one process share the outer claim.

    Args:
        path: the run directory.
        created: whether the caller created ``path`` for this run (the CLI knows; hydra makes
            the directory before any of our code runs). ``None``: find out here.

    Raises:
        OCLError: another process holds the directory, or it cannot be created or written.
    """
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    key = os.path.realpath(path)
    held = _HELD.get(key)
    if held is not None:
        held._depth += 1
        try:
            yield held
        finally:
            held._depth -= 1
        return
    if created is None:
        created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise OCLError(f"cannot create the run directory {path}: a file of that name exists; {_FIX}.") from e
    except OSError as e:
        raise OCLError(f"cannot create the run directory {path} ({e.strerror or e}); {_FIX}.") from e
    rd = RunDir(path, created)
    rd._acquire()
    _HELD[key] = rd
    try:
        yield rd
    finally:
        del _HELD[key]
        rd._release()


def held(path: str | os.PathLike) -> RunDir | None:
    """This process's claim on ``path``, if it holds one."""
    return _HELD.get(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))

