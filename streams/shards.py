"""A feature-cache entry built from shards written by several workers.

``ocl extract engine=ray`` splits an :class:`ImageSet` into contiguous shards of
``shard_size`` images; each worker writes the features of the shards it gets, and the
entry is assembled only when every shard is there. The finished entry is exactly what
:func:`ocl.streams.prefetch.extract_features` writes (``features.npy`` + ``meta.json``,
read by the same checks), so the learners never know how it was made. While it is being
built the entry holds::

    shards/plan.json             n, shard_size, fingerprint, extractor key, dtype
    shards/<index>.npy           (stop - start, D) features of images [start, stop)
    shards/<index>.json          start, stop, shape, dtype, sha1 and size of that .npy

Each shard is written to a temp file, fsynced and renamed, its ``.json`` last, so a shard
with a ``.json`` is complete; an interrupted extraction (a killed worker, Ctrl-C, a lost
node) keeps those, and the next run computes only the others. :meth:`ShardedEntry.assemble`
checks every shard's sha1 while it copies them into ``features.npy``, writes ``meta.json``
last and removes ``shards/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ocl.errors import OCLError
from ocl.files import atomic_path, fsync_dir, preallocate, write_atomic
from ocl.streams.base import ImageSet
from ocl.streams.cache import CACHE_FORMAT, cache_key, cache_problem, check_dtype, compute, write_meta
from ocl.streams.features import Extractor

log = logging.getLogger(__name__)

_COPY_ROWS_BYTES = 1 << 24  # assemble 16 MB at a time: never holds a big cache in memory


@dataclass(frozen=True)
class Shard:
    """Images ``[start, stop)`` of the set, number ``index`` in the plan."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.index:06d}"

    def __len__(self) -> int:
        return self.stop - self.start


class SliceImageSet(ImageSet):
    """Images ``[start, stop)`` of ``base`` as an :class:`ImageSet` of their own."""

    def __init__(self, base: ImageSet, start: int, stop: int) -> None:
        self.base, self.start = base, int(start)
        self.labels = base.labels[start:stop]

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.base.get(self.start + np.asarray(idx, dtype=np.int64))

    def fingerprint(self) -> str:
        return hashlib.sha1(f"{self.base.fingerprint()}[{self.start}:{self.start + len(self)}]".encode()).hexdigest()


def plan_shards(n: int, shard_size: int) -> list[Shard]:
    """``[0, n)`` cut into shards of ``shard_size`` images (the last one shorter)."""
    if shard_size < 1:
        raise OCLError(f"shard_size={shard_size}: must be >= 1 (images per shard).")
    return [Shard(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]


class ShardedEntry:
    """The cache entry of (images, extractor key, dtype) under ``cache_dir``, built shard by shard.

    Cheap to construct and to pickle (paths and strings only): the driver makes one to plan
    the work, and every worker one to write its shards.

    Args:
        cache_dir: the cache root (shared storage when the workers are on other machines).
        fingerprint: ``images.fingerprint()``.
        extractor_key: ``extractor.key()``.
        n: number of images.
        dtype: storage dtype (``float32`` or ``float16``).
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, extractor_key: str, n: int,
                 dtype: str = "float32") -> None:
        self.fingerprint, self.extractor_key, self.n, self.dtype = fingerprint, extractor_key, int(n), check_dtype(dtype)
        self.path = Path(cache_dir) / cache_key(fingerprint, extractor_key, dtype)
        self.shards_dir = self.path / "shards"

    # ------------------------------------------------------------------ driver side

    def complete(self) -> bool:
        """Whether the assembled entry is there and passes every check of the cache."""
        if not (self.path / "meta.json").exists():
            return False
        why = cache_problem(self.path, self.fingerprint, self.extractor_key, self.n, self.dtype)
        if why is not None:
            log.warning("feature cache %s is invalid (%s); rebuilding it.", self.path, why)
        return why is None

    def plan(self, shard_size: int) -> list[Shard]:
        """The shards of this entry. An extraction under way keeps its plan (a resumed run with
        another ``shard_size`` continues the first one's shards); a new one writes it."""
        plan_path = self.shards_dir / "plan.json"
        want = {"n": self.n, "fingerprint": self.fingerprint, "extractor": self.extractor_key, "dtype": self.dtype}
        if plan_path.is_file():
            try:
                old = json.loads(plan_path.read_text())
                size = int(old["shard_size"])
                if old.get("format") == CACHE_FORMAT and {k: old.get(k) for k in want} == want and size >= 1:
                    if size != shard_size:
                        log.info("resuming an extraction planned with shard_size=%d (not %d)", size, shard_size)
                    return plan_shards(self.n, size)
            except (OSError, ValueError, KeyError, TypeError):
                pass
            log.warning("%s holds shards of another extraction; starting again", self.shards_dir)
            shutil.rmtree(self.shards_dir, ignore_errors=True)
        shards = plan_shards(self.n, shard_size)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(plan_path, json.dumps({"format": CACHE_FORMAT, "shard_size": int(shard_size), **want}).encode(),
                     "writing the extraction's plan.json")
        return shards

    def done(self, shards: list[Shard]) -> set[int]:
        """Indices of the shards already written: their ``.json`` is there and names a ``.npy``
        of the right range and size (their sha1 is checked by :meth:`assemble`)."""
        out = set()
        for sh in shards:
            info = self._read_info(sh)
            npy = self.shards_dir / f"{sh.name}.npy"
            if info is not None and npy.is_file() and npy.stat().st_size == info["n_bytes"]:
                out.add(sh.index)
        return out

    def _read_info(self, sh: Shard) -> dict[str, Any] | None:
        try:
            info = json.loads((self.shards_dir / f"{sh.name}.json").read_text())
        except (OSError, ValueError):
            return None
        if (info.get("start"), info.get("stop"), info.get("dtype")) != (sh.start, sh.stop, self.dtype):
            return None
        return info

    def assemble(self, shards: list[Shard], **meta: Any) -> np.ndarray:
        """Check every shard's sha1 while copying them, in order, into ``features.npy``; then
        write ``meta.json`` (last) and remove ``shards/``. Returns the read-only memmap.

        Raises:
            OCLError: a shard is missing or corrupt (a corrupt one is removed, so that the
                same command, run again, recomputes just that shard).
        """
        done = self.done(shards)
        missing = [sh.index for sh in shards if sh.index not in done]
        if missing:
            raise OCLError(f"{len(missing)} of {len(shards)} shards of {self.path} are missing "
                           f"(first: {missing[0]}); run the same command again to compute them.")
        dims = {tuple(self._read_info(sh)["shape"])[1] for sh in shards}
        if len(dims) != 1:
            raise OCLError(f"the shards of {self.path} have different feature sizes {sorted(dims)}: they were "
                           "written by different backbones; delete the folder and extract again.")
        shape = (self.n, dims.pop())
        total = hashlib.sha1()
        with atomic_path(self.path / "features.npy", "assembling the feature cache from its shards (they are kept: "
                                                     "the same command, run again, finishes it)") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(self.dtype), shape=shape)
            with open(tmp, "rb+") as fh:  # a full disk now, not a SIGBUS in the mapped writes
                preallocate(fh.fileno(), os.path.getsize(tmp), str(tmp), "the feature cache")
            for sh in shards:
                self._copy_shard(sh, out, total)
            out.flush()
            del out
            (self.path / "meta.json").unlink(missing_ok=True)  # an old meta must never vouch for new features
        write_meta(self.path, shape, self.dtype, total.hexdigest(), self.fingerprint, self.extractor_key,
                   shards=len(shards), **meta)
        shutil.rmtree(self.shards_dir, ignore_errors=True)
        fsync_dir(self.path)
        log.info("feature cache written from %d shards: %s", len(shards), self.path)
        return np.load(self.path / "features.npy", mmap_mode="r")

    def _copy_shard(self, sh: Shard, out: np.ndarray, total: Any) -> None:
        info = self._read_info(sh)
        npy = self.shards_dir / f"{sh.name}.npy"
        arr = np.load(npy, mmap_mode="r")
        if arr.shape != (len(sh), out.shape[1]) or arr.dtype != out.dtype:
            self._drop(sh, f"holds {arr.shape} {arr.dtype}, expected {(len(sh), out.shape[1])} {out.dtype}")
        h = hashlib.sha1()
        rows = max(1, _COPY_ROWS_BYTES // max(1, arr.strides[0]))
        for s in range(0, len(sh), rows):
            block = np.ascontiguousarray(arr[s:s + rows])
            h.update(block.data)
            total.update(block.data)  # the shards in order are the rows of the whole array
            out[sh.start + s:sh.start + s + len(block)] = block
        if h.hexdigest() != info["sha1"]:
            self._drop(sh, "its sha1 does not match its .json (corrupted bytes)")

    def _drop(self, sh: Shard, why: str) -> None:
        (self.shards_dir / f"{sh.name}.json").unlink(missing_ok=True)
        (self.shards_dir / f"{sh.name}.npy").unlink(missing_ok=True)
        raise OCLError(f"shard {sh.index} of {self.path} {why}; it was removed: run the same command again "
                       "to recompute it.")

    # ------------------------------------------------------------------ worker side

    def write(self, sh: Shard, images: ImageSet, extractor: Extractor, batch_size: int = 256) -> dict[str, Any]:
        """Extract images ``[sh.start, sh.stop)`` and write the shard (atomic, ``.json`` last).
        Returns its info (what the ``.json`` holds)."""
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.shards_dir / f"{sh.name}.npy", f"writing shard {sh.index} of the feature cache") as tmp:
            _, sha1, shape = compute(SliceImageSet(images, sh.start, sh.stop), extractor, tmp, batch_size,
                                      progress=False, dtype=self.dtype, offset=sh.start)
        info = {**asdict(sh), "shape": list(shape), "dtype": self.dtype, "sha1": sha1,
                "n_bytes": (self.shards_dir / f"{sh.name}.npy").stat().st_size}
        write_atomic(self.shards_dir / f"{sh.name}.json", json.dumps(info).encode(), f"writing shard {sh.index}'s .json")
        return info
