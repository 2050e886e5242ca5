"""The on-disk feature cache: the features of a whole :class:`ImageSet` under one extractor
(:class:`~ocl.streams.features.Extractor`) live under ``cache_dir/<key>/``
(:func:`ocl.streams.prefetch.extract_features` fills and reads it)::

    features.npy   (n, D) in the storage dtype, read back as a read-only np.memmap
    meta.json      shape, dtype, sha1 of the feature bytes, fingerprint, extractor key

``<key>`` is the sha1 of the images' fingerprint and the extractor's key (model, weights,
preprocessing) and, for ``float16`` storage, the dtype, so any change to either is a cache
miss. The storage dtype is ``float32`` (default) or ``float16`` (half the disk and page
cache; the runner reads rows back as float32, so learners always get float32). Files are
written to a temp file, fsynced and renamed (atomic), meta.json last; on load every check
(meta present and matching, file size, sha1) must pass, otherwise a WARNING says why and
the cache is rebuilt. While an entry is incomplete, :mod:`ocl.streams.rows` keeps what was
extracted of it shard by shard (an interrupted extraction keeps its finished shards; a run
extracts only the images it uses, :mod:`ocl.streams.prefetch`); :mod:`ocl.streams.shards`
builds the same entry from shards written by several workers (``ocl extract engine=ray``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ocl.errors import OCLError
from ocl.files import preallocate, write_atomic
from ocl.streams.features import Extractor

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cache layout or meta fields change
#: Formats this code reads. 2 added float16 storage and the optional meta fields `engine`
#: and `shards` (an entry assembled from shards); a format-1 entry is a float32 entry as
#: format 2 writes it, so the caches of earlier versions stay valid.
READABLE_FORMATS = (1, 2)
#: Storage dtypes of the cache (``cache_dtype=``).
STORAGE_DTYPES = ("float32", "float16")


def cache_key(fingerprint: str, extractor_key: str, dtype: str = "float32") -> str:
    """Directory name of a cache entry: sha1 of the image fingerprint, the extractor key and
    (unless float32, so that float32 keys are those of earlier versions) the storage dtype."""
    parts = [fingerprint, extractor_key] + ([] if dtype == "float32" else [dtype])
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is a storage dtype of the cache, else :class:`OCLError`."""
    if dtype not in STORAGE_DTYPES:
        raise OCLError(f"cache_dtype={dtype!r}: must be one of {', '.join(STORAGE_DTYPES)} "
                       "(float16 halves the cache; learners still get float32).")
    return dtype


def write_meta(entry: Path, shape: tuple[int, int], dtype: str, sha1: str, fingerprint: str,
               extractor_key: str, **extra: Any) -> None:
    """Write ``entry/meta.json`` for the complete ``entry/features.npy`` (atomically, and
    last: it is what makes the entry valid). ``extra``: optional fields (``engine``, ...)."""
    meta = {
        "format": CACHE_FORMAT, "shape": list(shape), "dtype": dtype, "sha1": sha1,
        "n_bytes": (entry / "features.npy").stat().st_size, "fingerprint": fingerprint,
        "extractor": extractor_key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }
    write_atomic(entry / "meta.json", json.dumps(meta, indent=1).encode(), "writing the feature cache's meta.json")


def compute(
    images: Any, extractor: Extractor, out_path: Path | None, batch_size: int, progress: bool,
    dtype: str = "float32", offset: int = 0,
) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Run the extractor over all images; write to ``out_path`` (.npy, in ``dtype``) if given.
    ``offset``: index of ``images[0]`` in the whole set (for error messages).

    Returns ``(features, sha1 of their bytes, shape)``.
    """
    from tqdm.auto import tqdm

    n = len(images)
    h = hashlib.sha1()
    out: np.ndarray | None = None
    if n == 0:
        out = np.zeros((0, extractor.feature_dim or 0), np.float32 if out_path is None else dtype)
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="img", desc="features", disable=not progress or not sys.stderr.isatty())
    try:
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(s + batch_size, n))
            f = extract_batch(images, idx, extractor, "float32" if out_path is None else dtype,
                              None if out is None else out.shape[1], offset)
            if out is None:  # D is known only after the first batch
                shape = (n, f.shape[1])
                if out_path is not None:
                    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=f.dtype, shape=shape)
                    with open(out_path, "rb+") as fh:  # a full disk now, not a SIGBUS in the mapped writes
                        preallocate(fh.fileno(), os.path.getsize(out_path), str(out_path), "the feature cache")
                else:
                    out = np.empty(shape, np.float32)
            f = np.ascontiguousarray(f)
            out[s:s + len(idx)] = f
            h.update(f.data)  # row-major batches in order == the bytes of the whole array
            bar.update(len(idx))
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    log.info("extracted %d features of dim %d in %.1f s (%.1f images/s)",
             n, out.shape[1], dt, n / dt if dt > 0 else float("inf"))
    if out_path is not None:
        if isinstance(out, np.memmap):
            out.flush()
        else:  # n == 0: no batch opened the memmap; still write a valid file
            np.save(out_path, out)
    return out, h.hexdigest(), (n, int(out.shape[1]))


def extract_batch(images: Any, idx: np.ndarray, extractor: Extractor, dtype: str = "float32",
                  dim: int | None = None, offset: int = 0) -> np.ndarray:
    """Features of ``images.get(idx)`` as a checked ``(len(idx), D)`` array in ``dtype``.
    ``dim``: the D the batch must have, if known; ``offset``: added to the indices that
    error messages name (the position of ``images[0]`` in a larger set).

    Raises:
        OCLError: a bad shape, NaN/inf, or values ``dtype`` (float16) cannot hold.
    """
    f = extractor(images.get(idx))
    f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
    f = f.astype(np.float32, copy=False)  # (b, D)
    if f.ndim != 2 or f.shape[0] != len(idx) or (dim is not None and f.shape[1] != dim):
        raise OCLError(f"extractor {extractor.key()} returned shape {f.shape} for {len(idx)} images.")
    if not np.isfinite(f).all():
        bad = offset + int(idx[np.flatnonzero(~np.isfinite(f).all(axis=1))[0]])
        raise OCLError(
            f"the feature extractor produced NaN/inf (first at image {bad}); its batch was not cached. "
            f"Extractor: {extractor.key()}. Check the weights and the input images."
        )
    if dtype != "float32":
        with np.errstate(over="ignore"):  # checked right below, with a message
            f = f.astype(dtype)
        if not np.isfinite(f).all():  # |x| > 65504 overflows float16
            bad = offset + int(idx[np.flatnonzero(~np.isfinite(f).all(axis=1))[0]])
            raise OCLError(f"features of image {bad} exceed the range of cache_dtype={dtype}; its batch was not "
                           "cached. Use cache_dtype=float32.")
    return np.ascontiguousarray(f)


def cache_problem(entry: Path, fp: str, ekey: str, n: int, dtype: str = "float32") -> str | None:
    """Why the cache entry cannot be trusted, or None if it can."""
    meta_path, feat_path = entry / "meta.json", entry / "features.npy"
    if not meta_path.is_file():
        return "meta.json is missing: an interrupted or partial write"
    try:
        meta = json.loads(meta_path.read_text())
        shape, sha1, n_bytes = tuple(meta["shape"]), meta["sha1"], int(meta["n_bytes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable ({type(e).__name__}: {e})"
    if meta.get("format") not in READABLE_FORMATS or meta.get("dtype") != dtype:
        return f"format/dtype {meta.get('format')}/{meta.get('dtype')}, expected {CACHE_FORMAT}/{dtype}"
    if meta.get("fingerprint") != fp or meta.get("extractor") != ekey:
        return "meta.json was written for other images or another extractor"
    if len(shape) != 2 or shape[0] != n:
        return f"meta.json shape {list(shape)} does not match {n} images"
    if not feat_path.is_file():
        return "features.npy is missing"
    size = feat_path.stat().st_size
    if size != n_bytes:
        return f"features.npy has {size} bytes, meta.json says {n_bytes} (truncated or replaced)"
    try:
        arr = np.load(feat_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"features.npy is unreadable ({type(e).__name__}: {e})"
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        return f"features.npy holds {arr.shape} {arr.dtype}, meta.json says {list(shape)} {dtype}"
    h = hashlib.sha1()
    flat = arr.reshape(-1)
    step = 1 << 22  # hash 16 MB at a time: never loads a big cache whole
    for s in range(0, flat.shape[0], step):
        h.update(np.ascontiguousarray(flat[s:s + step]).data)
    if h.hexdigest() != sha1:
        return "sha1 of features.npy does not match meta.json (corrupted bytes)"
    return None
