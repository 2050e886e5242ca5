"""The features of some images of a set, kept shard by shard in the set's cache entry.

A run uses only the images its stream streams (``protocol.max_examples``, a class subset) and
the test images it evaluates; :class:`RowStore` keeps what was extracted of a set per image,
under the same key as the full entry (:func:`ocl.streams.cache.cache_key`), so a longer run
later, another protocol or ``ocl extract`` reuses it and extracts only the images it lacks::

    <cache_dir>/<key>/rows/<name>.npy    (m, D) features, in the storage dtype
    <cache_dir>/<key>/rows/<name>.json   which images (source indices, in the shard's row
                                         order), shape, dtype, sha1 and size of that .npy

``<name>`` is unique to its writer (time, PID, counter), so runs extracting at the same time
never write the same file (an image both extract is kept twice; the first shard wins). Each
shard is written to a temp file, fsynced and renamed, its ``.json`` last: a shard with a
``.json`` is complete, and an interrupted extraction keeps every shard it finished. Once every
image has a row, :meth:`RowStore.assemble` writes the full entry (``features.npy`` +
``meta.json``, read by the same checks as ever) and removes ``rows/``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ocl.errors import OCLError, storage_error
from ocl.files import atomic_file, atomic_path, fsync_dir, preallocate, remove_stale_temps, write_atomic
from ocl.streams.cache import CACHE_FORMAT, cache_key, cache_problem, check_dtype, write_meta

log = logging.getLogger(__name__)

_BLOCK_BYTES = 1 << 24  # hash / copy 16 MB at a time: never holds a big cache in memory


def _sha1_rows(arr: np.ndarray) -> str:
    """sha1 of a 2-d array's row-major bytes, read in blocks."""
    h = hashlib.sha1()
    rows = max(1, _BLOCK_BYTES // max(1, arr.strides[0] if arr.ndim == 2 and arr.shape[0] else 1))
    for s in range(0, arr.shape[0], rows):
        h.update(np.ascontiguousarray(arr[s:s + rows]).data)
    return h.hexdigest()


class RowStore:
    """What the cache holds of the features of one image set (fingerprint, extractor key, dtype),
    image by image: the full entry when it is complete, else its shards.

    Thread-safe: the extraction thread adds shards while the learner's thread reads rows.

    Args:
        cache_dir: the cache root.
        fingerprint: ``images.fingerprint()``.
        extractor_key: ``extractor.key()``.
        n: number of images in the set.
        dtype: storage dtype (``float32`` or ``float16``).
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, extractor_key: str, n: int,
                 dtype: str = "float32") -> None:
        self.fingerprint, self.extractor_key, self.n, self.dtype = fingerprint, extractor_key, int(n), check_dtype(dtype)
        self.path = Path(cache_dir) / cache_key(fingerprint, extractor_key, dtype)
        self.rows_dir = self.path / "rows"
        self.dim: int | None = None
        self.shard_of = np.full(self.n, -1, np.int64)  # which shard holds image i (-1: none yet)
        self.row_of = np.full(self.n, -1, np.int64)  # its row there
        self._arrays: list[np.ndarray] = []  # shard k's rows (read-only memmaps)
        self._names: set[str] = set()
        self._seq = itertools.count()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the full entry

    def full(self) -> np.ndarray | None:
        """The complete entry's ``(n, D)`` read-only memmap when it is there and passes every
        check of the cache; else ``None`` (with a WARNING naming the problem of a broken one)."""
        if not (self.path / "meta.json").exists() and not (self.path / "features.npy").exists():
            return None  # nothing there yet: a plain miss
        why = cache_problem(self.path, self.fingerprint, self.extractor_key, self.n, self.dtype)
        if why is not None:
            log.warning("feature cache %s is invalid (%s); rebuilding it.", self.path, why)
            return None
        return np.load(self.path / "features.npy", mmap_mode="r")

    # ------------------------------------------------------------------ the shards

    def clean(self) -> None:
        """Remove the temp files interrupted writers left in the entry (only dead writers',
        :func:`ocl.files.remove_stale_temps`)."""
        for d in (self.path, self.rows_dir):
            if d.is_dir():
                remove_stale_temps(d)

    def refresh(self) -> int:
        """Take in the shards written since the last call (by this process or another); each is
        checked (its ``.json``, size and sha1), a broken one removed with a WARNING.
        Returns how many images have a row."""
        try:
            names = sorted(p.name[:-5] for p in self.rows_dir.glob("*.json"))
        except OSError:
            names = []
        for name in names:
            if name in self._names:
                continue
            why = self._take(name)
            if why is not None:
                log.warning("feature shard %s/%s is unusable (%s); removed, its images will be extracted again.",
                            self.rows_dir, name, why)
                for suffix in (".json", ".npy"):
                    (self.rows_dir / f"{name}{suffix}").unlink(missing_ok=True)
        return int((self.shard_of >= 0).sum())

    def _take(self, name: str) -> str | None:
        try:
            info = json.loads((self.rows_dir / f"{name}.json").read_text())
            idx = np.asarray(info["indices"], dtype=np.int64)
            shape, sha1, n_bytes = tuple(info["shape"]), info["sha1"], int(info["n_bytes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f".json unreadable: {type(e).__name__}"
        want = (CACHE_FORMAT, self.fingerprint, self.extractor_key, self.dtype, self.n)
        if (info.get("format"), info.get("fingerprint"), info.get("extractor"), info.get("dtype"), info.get("n")) != want:
            return "written for other images, another extractor or dtype"
        if len(shape) != 2 or shape[0] != idx.size or (idx.size and (idx.min() < 0 or idx.max() >= self.n)):
            return "its indices do not match its shape or the set"
        if self.dim is not None and shape[1] != self.dim:
            return f"feature size {shape[1]}, other shards have {self.dim}"
        npy = self.rows_dir / f"{name}.npy"
        try:
            if npy.stat().st_size != n_bytes:
                return ".npy truncated or replaced"
            arr = np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f".npy unreadable: {type(e).__name__}"
        if arr.shape != shape or arr.dtype != np.dtype(self.dtype) or _sha1_rows(arr) != sha1:
            return "its bytes do not match its .json"
        self._register(name, idx, arr)
        return None

    def _register(self, name: str, idx: np.ndarray, arr: np.ndarray) -> None:
        with self._lock:
            self.dim = int(arr.shape[1])
            k = len(self._arrays)
            self._arrays.append(arr)
            self._names.add(name)
            new = self.shard_of[idx] < 0  # an image two shards hold: the first one wins
            self.shard_of[idx[new]] = k
            self.row_of[idx[new]] = np.flatnonzero(new)

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """The images of ``indices`` without a row, each once, in the order of ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        _, first = np.unique(indices, return_index=True)
        uniq = indices[np.sort(first)]
        return uniq[self.shard_of[uniq] < 0]

    def add(self, indices: np.ndarray, feats: np.ndarray) -> None:
        """Write the shard of images ``indices`` (source indices) with features ``feats``
        ``(len(indices), D)`` (already in the storage dtype, finite) and take it in."""
        indices = np.asarray(indices, dtype=np.int64)
        feats = np.ascontiguousarray(feats)
        if feats.ndim != 2 or feats.shape[0] != indices.size or feats.dtype != np.dtype(self.dtype):
            raise ValueError(f"a shard needs ({indices.size}, D) {self.dtype}; got {feats.shape} {feats.dtype}")
        name = f"{time.time_ns():x}-{os.getpid()}-{next(self._seq):05d}"
        try:
            self.rows_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, self.rows_dir, "creating the feature cache's shards (cache_dir=null runs "
                                                  "without the cache)") from e
        npy = self.rows_dir / f"{name}.npy"
        with atomic_file(npy, "wb", "writing a shard of the feature cache", need=feats.nbytes + 128) as fh:
            np.save(fh, feats)  # a file object: given a name, np.save would append .npy to the temp name
        info = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "extractor": self.extractor_key,
                "dtype": self.dtype, "n": self.n, "shape": list(feats.shape), "sha1": _sha1_rows(feats),
                "n_bytes": npy.stat().st_size, "indices": indices.tolist()}
        write_atomic(self.rows_dir / f"{name}.json", json.dumps(info).encode(), "writing a feature shard's .json")
        self._register(name, indices, np.load(npy, mmap_mode="r"))

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (source indices, each with a row) as ``(len(idx), D)`` float32."""
        idx = np.asarray(idx, dtype=np.int64)
        with self._lock:
            shard, row = self.shard_of[idx], self.row_of[idx]
            arrays = list(self._arrays)
        if (shard < 0).any():
            raise KeyError(f"image {int(idx[np.flatnonzero(shard < 0)[0]])} has no features yet")
        out = np.empty((idx.size, self.dim or 0), np.float32)
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            out[sel] = arrays[k][row[sel]]
        return out

    @property
    def shards(self) -> int:
        return len(self._arrays)

    # ------------------------------------------------------------------ the full entry from the shards

    def assemble(self, **meta: Any) -> np.ndarray:
        """Copy every image's row, in order, into ``features.npy`` (hashing it), write
        ``meta.json`` (last) and remove ``rows/``. Every image must have a row.
        Returns the entry's read-only memmap."""
        if self.n and (self.shard_of < 0).any():
            raise OCLError(f"{int((self.shard_of < 0).sum())} images of {self.path} have no features yet.")
        shape = (self.n, int(self.dim or 0))
        n_shards = self.shards
        total = hashlib.sha1()
        with atomic_path(self.path / "features.npy", "assembling the feature cache from its shards (they are "
                                                     "kept: the same command, run again, finishes it)") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(self.dtype), shape=shape)
            with open(tmp, "rb+") as fh:  # a full disk now, not a SIGBUS in the mapped writes
                preallocate(fh.fileno(), os.path.getsize(tmp), str(tmp), "the feature cache")
            rows = max(1, _BLOCK_BYTES // max(1, shape[1] * out.dtype.itemsize))
            for s in range(0, self.n, rows):
                block = self.read(np.arange(s, min(s + rows, self.n))).astype(self.dtype)
                total.update(block.data)  # exact: the shards hold the storage dtype, read as float32
                out[s:s + len(block)] = block
            out.flush()
            del out
            (self.path / "meta.json").unlink(missing_ok=True)  # an old meta must never vouch for new features
        write_meta(self.path, shape, self.dtype, total.hexdigest(), self.fingerprint, self.extractor_key,
                   shards=n_shards, **meta)
        with self._lock:
            self._arrays = [np.load(self.path / "features.npy", mmap_mode="r")]
            self.shard_of[:], self.row_of[:] = 0, np.arange(self.n)
        shutil.rmtree(self.rows_dir, ignore_errors=True)
        fsync_dir(self.path)
        log.info("feature cache written from %d shards: %s", n_shards, self.path)
        return self._arrays[0]
