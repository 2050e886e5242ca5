"""Getting data onto disk: network check, missing-file errors, torchvision downloads, zips.

Downloads always go through torchvision's own dataset code (it knows the URLs and
checksums); this module only decides *whether* to try and turns every failure into
an :class:`OCLError` that names the exact paths the loader expected.
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import os
import shutil
import socket
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence

from filelock import FileLock, Timeout

from ocl.errors import OCLError, free_bytes, storage_error

log = logging.getLogger(__name__)

#: Where loaders without an explicit ``root`` look for (and download) data.
DEFAULT_ROOT = "~/.cache/ocl/data"
#: Where zips are unpacked (``<here>/<zip stem>``), never beside the user's zip; the
#: environment variable ``OCL_EXTRACT_DIR`` moves it.
EXTRACT_CACHE = "~/.cache/ocl/extracted"
_MARKER = ".ocl-extracted"  # written last, so its presence means "extraction complete"


def network_available(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Return True if a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # DNS failure, refused, unreachable, timeout
        return False


def missing_files(name: str, expected: Sequence[str], hint: str) -> OCLError:
    """Build (not raise) the error for data that is not where a loader looked.

    Args:
        name: the data set, e.g. ``"cifar10"``.
        expected: the exact paths that were looked for.
        hint: how to fix it (where to put files, which argument / config key to set).
    """
    lines = [f"{name}: data not found. Looked for:"]
    lines += [f"  {p}" for p in expected]
    lines.append(f"How to fix: {hint}")
    return OCLError("\n".join(lines))


def fetch(
    name: str,
    host: str,
    get: Callable[[], object],
    expected: Sequence[str],
    hint: str,
    download: bool,
) -> None:
    """Run ``get`` (a torchvision download) if allowed and the host is reachable.

    Raises :class:`OCLError` naming ``expected`` when ``download`` is False, when
    ``host`` cannot be reached, or when ``get`` fails for any reason.
    """
    if not download:
        raise missing_files(name, expected, f"{hint} (download=False, so nothing was fetched.)")
    if not network_available(host):
        raise missing_files(
            name, expected, f"{hint} (download=True, but {host} cannot be reached from this machine.)"
        )
    log.info("%s: downloading with torchvision from %s", name, host)
    try:
        get()
    except Exception as e:  # any failure of third-party download code is the user's to fix
        raise missing_files(
            name, expected, f"{hint} (download from {host} failed: {type(e).__name__}: {e})"
        ) from e


# ----------------------------------------------------------------------------- zips


def _writable_dir(path: str) -> bool:
    """True if ``path`` (created if needed) accepts new entries.

    A directory whose mode has no write bit at all is treated as read-only even for
    root, so shared read-only data folders are not written into.
    """
    try:
        os.makedirs(path, exist_ok=True)
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(path, os.W_OK)


def _stamp(zip_path: str) -> str:
    st = os.stat(zip_path)
    return f"{zip_path}\n{st.st_size}\n{st.st_mtime_ns}\n"


def _is_complete(target: str, stamp: str) -> bool:
    """Whether ``target`` holds a finished extraction of the zip of ``stamp``: same size and
    mtime, and a recorded path naming the same file (``../shared/x.zip`` and its resolved path
    are one zip, not a reason to unpack it again)."""
    try:
        with open(os.path.join(target, _MARKER)) as f:
            found = f.read()
    except OSError:
        return False
    if found == stamp:
        return True
    path, _, rest = found.partition("\n")
    want_path, _, want_rest = stamp.partition("\n")
    return rest == want_rest and os.path.realpath(path) == os.path.realpath(want_path)


def _extract_dir() -> str:
    return os.path.expanduser(os.environ.get("OCL_EXTRACT_DIR") or EXTRACT_CACHE)


def _extract_into(zip_path: str, tmp: str) -> None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                dest = zf.extract(info, tmp)  # strips absolute paths and '..' components
                if not info.is_dir():
                    # Keep the archive's timestamps (read as UTC, so the result does not depend
                    # on the time zone) so file fingerprints survive re-extraction.
                    t = calendar.timegm(info.date_time + (0, 0, 0))
                    os.utime(dest, (t, t))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise OCLError(f"{zip_path}: not a readable zip archive ({e}). Re-download or re-create it.") from e


def _members(zip_path: str) -> tuple[int, int]:
    """``(files, bytes once unpacked)`` of a zip."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise OCLError(f"{zip_path}: not a readable zip archive ({e}). Re-download or re-create it.") from e
    return len(infos), sum(i.file_size for i in infos)


def extract_zip(zip_path: str) -> str:
    """Unpack ``zip_path`` once into the data cache and return the folder holding its contents.

    The folder is ``~/.cache/ocl/extracted/<zipstem>`` (``$OCL_EXTRACT_DIR/<zipstem>``; a
    different zip of the same name gets ``<zipstem>-<hash of its path>``), never beside the
    zip: the user's folder may be read-only, and 60,000 files appearing there unannounced
    are not wanted. A one-line notice says where and how large; a complete extraction made by
    an earlier version beside the zip (``.<zipstem>-extracted``) is still reused. A marker file
    (written last, recording the zip's path, size and mtime) makes later calls reuse a complete
    extraction and redo a partial or stale one; runs started together unpack it once (a file lock
    beside the folder: the others wait). The archive's timestamps are kept, so the
    image folder's fingerprint (and its feature cache entries) does not depend on where or
    when it was unpacked.

    Raises:
        OCLError: the zip is missing or unreadable, or the cache folder cannot take it (not
            writable, or too little free space: the message gives the size).
    """
    zip_path = os.path.abspath(os.path.expanduser(zip_path))
    if not os.path.isfile(zip_path):
        raise missing_files("zip", [zip_path], "check the path to the .zip file.")
    stem = os.path.splitext(os.path.basename(zip_path))[0]
    cache = _extract_dir()
    own = os.path.join(cache, stem)
    other = f"{own}-{hashlib.sha1(os.path.realpath(zip_path).encode()).hexdigest()[:8]}"
    legacy = os.path.join(os.path.dirname(zip_path), f".{stem}-extracted")
    stamp = _stamp(zip_path)
    for target in (own, other, legacy):
        if _is_complete(target, stamp):
            return target
    if not _writable_dir(cache):
        raise OCLError(f"{zip_path}: cannot unpack it into {cache} (not writable); set OCL_EXTRACT_DIR=DIR to a "
                       "writable folder, or unpack the zip yourself and pass the folder as root.")
    files, size = _members(zip_path)
    free = free_bytes(cache)
    if free is not None and free < size:
        raise OCLError(f"{zip_path}: unpacking it needs {size / 1e6:,.0f} MB in {cache}, which has "
                       f"{free / 1e6:,.0f} MB free; set OCL_EXTRACT_DIR=DIR to a folder with room, or unpack the "
                       "zip yourself and pass the folder as root.")
    # One process unpacks, the others wait and reuse its folder: runs started together (ocl compare,
    # the benchmark's workers) would otherwise each delete and replace the same stale folder.
    lock = FileLock(os.path.join(cache, f".{stem}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # say why this run seems to hang (CIFAR-10's 60,000 files take about a minute)
        log.info("waiting for another run that is unpacking %s into %s", zip_path, cache)
        lock.acquire()
    try:
        for target in (own, other):
            if _is_complete(target, stamp):  # unpacked by another process while this one waited
                return target
        return _unpack(zip_path, own, other, stamp, files, size)
    finally:
        lock.release()


def _unpack(zip_path: str, own: str, other: str, stamp: str, files: int, size: int) -> str:
    """Unpack into ``own`` (``other`` if ``own`` holds another zip's finished extraction); caller holds the lock."""
    # a stem already taken by another zip's finished extraction: this zip gets its own folder
    try:
        with open(os.path.join(own, _MARKER)) as f:
            taken = os.path.realpath(f.readline().rstrip("\n")) != os.path.realpath(zip_path)
    except OSError:
        taken = False
    target = other if taken else own
    parent = os.path.dirname(target)
    log.info("unpacking %s (%s files, %.0f MB) into %s, once (later runs reuse it; OCL_EXTRACT_DIR moves it)",
             zip_path, f"{files:,}", size / 1e6, target)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(own)}-partial-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the extraction is ordinary data
        _extract_into(zip_path, tmp)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            f.write(stamp)
        if os.path.lexists(target):  # partial or stale extraction
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(e, target, f"unpacking {zip_path}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
