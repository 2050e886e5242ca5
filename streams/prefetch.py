"""Extracting features into the cache's shards (:mod:`ocl.streams.rows`): all of a set at once
(:func:`extract_features`, what ``ocl extract`` and ``ocl compare`` do), or only the images a run
streams, in stream order, in a background thread ahead of the learner (:func:`stream_features`,
what ``ocl run`` does when the cache has no complete entry).

A run's stream order is known before any feature is computed, so the thread extracts exactly
the images the run will read, in the order it reads them: the training examples up to the
first task boundary, then the test images (evaluated there, when ``eval_test`` is on), then
the rest of the stream. Each batch becomes a shard of the cache as soon as it is done; the
learner reads rows through :class:`LazyFeatures`, which waits only when the learner catches
up with the extraction. A longer run later, or another protocol on the same images, finds
those shards and extracts only what it lacks; once every image of a set has its row, the
set's full entry is assembled, exactly as a whole-set extraction would have written it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ocl.errors import OCLError
from ocl.signals import sigterm_as_interrupt
from ocl.streams.base import ImageSet
from ocl.streams.cache import check_dtype, compute, extract_batch
from ocl.streams.features import Extractor
from ocl.streams.rows import RowStore

log = logging.getLogger(__name__)


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during an extraction; the message says what was kept and how to go on."""


def _bar(total: int, initial: int, desc: str, progress: bool, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=desc, disable=not progress or not sys.stderr.isatty(),
                **kw)


def fill(store: RowStore, images: ImageSet, extractor: Extractor, order: np.ndarray, batch_size: int,
         stop: threading.Event | None = None, on_batch: Callable[[int], None] | None = None) -> int:
    """Extract the images of ``order`` that ``store`` lacks, in that order, ``batch_size`` at a
    time, each batch written as a shard when it is done. Stops before the next batch once
    ``stop`` is set; ``on_batch(k)`` is called after each batch of ``k`` images.
    Returns the number of images extracted."""
    todo = store.missing(order)
    done = 0
    for s in range(0, todo.size, batch_size):
        if stop is not None and stop.is_set():
            break
        idx = todo[s:s + batch_size]
        store.add(idx, extract_batch(images, idx, extractor, store.dtype, store.dim))
        done += idx.size
        if on_batch is not None:
            on_batch(idx.size)
    return done


def open_store(images: ImageSet, extractor: Extractor, cache_dir: str | os.PathLike,
               dtype: str) -> tuple[RowStore, np.ndarray | None]:
    """The :class:`RowStore` of ``images`` under ``cache_dir`` and its complete entry's memmap,
    if it has one (a hit); else ``None``, and the store is ready to extract into: the temp
    files of dead writers removed, the shards on disk taken in."""
    store = RowStore(cache_dir, images.fingerprint(), extractor.key(), len(images), check_dtype(dtype))
    full = store.full()
    if full is not None:
        log.info("feature cache hit: %s (%d x %d)", store.path, *full.shape)
        return store, full
    store.clean()
    store.refresh()
    if store.dim is None and extractor.feature_dim is not None:
        store.dim = int(extractor.feature_dim)
    return store, None


def _kept(store: RowStore) -> str:
    have = int((store.shard_of >= 0).sum())
    return f"{have} of {store.n} images are kept in {store.shards} shards in {store.rows_dir}"


def extract_features(
    images: Any,
    extractor: Extractor,
    cache_dir: str | os.PathLike | None,
    batch_size: int = 256,
    progress: bool = True,
    dtype: str = "float32",
) -> np.ndarray:
    """Features of every item of ``images`` (an :class:`ImageSet`), cached on disk.

    Args:
        images: the ImageSet, read in order in batches of ``batch_size``.
        extractor: maps ``(b, H, W, C)`` uint8 to ``(b, D)`` float32.
        cache_dir: cache root; ``None`` (or a non-cacheable extractor) computes in memory.
        batch_size: images read per step.
        progress: show a tqdm bar (only on a terminal).
        dtype: storage dtype of the cache, ``"float32"`` or ``"float16"`` (rounded once,
            when written; without a cache the features stay float32).

    Returns:
        ``(n, D)``: a read-only ``np.memmap`` in the storage dtype when cached (read rows
        with ``np.asarray(x[idx], dtype=np.float32)``, as the runner does), else a float32
        array.

    Raises:
        OCLError: the extractor produced NaN/inf, or values float16 cannot hold, or a bad
            shape (that batch is not cached; the shards before it are).
        ExtractionInterrupted: Ctrl-C or SIGTERM; the finished shards are kept (the message
            says how many) and the same call, made again, extracts only the others.
    """
    if batch_size < 1:
        raise OCLError(f"batch_size must be >= 1; got {batch_size}.")
    check_dtype(dtype)
    if cache_dir is None or not extractor.cacheable:
        return compute(images, extractor, None, batch_size, progress)[0]
    # The complete entry when it is there; else the images no shard holds, in index order
    # (so a fresh extraction reads the same batches as ever), and the entry assembled.
    store, full = open_store(images, extractor, cache_dir, dtype)
    if full is not None:
        return full
    have = int((store.shard_of >= 0).sum())
    if have:
        log.info("feature cache: %d of %d images already extracted in %s; extracting the other %d",
                 have, store.n, store.rows_dir, store.n - have)
    bar = _bar(store.n, have, "features", progress)
    t0 = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            n = fill(store, images, extractor, np.arange(store.n), batch_size, on_batch=bar.update)
    except KeyboardInterrupt as e:
        raise ExtractionInterrupted(f"interrupted: {_kept(store)}; run the same command again to extract "
                                    "only the others.") from e
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    log.info("extracted %d features of dim %s in %.1f s (%.1f images/s)", n, store.dim, dt,
             n / dt if dt > 0 else float("inf"))
    return store.assemble(engine="local")




class Prefetcher:
    """A background thread that extracts ``(store, images, order)`` jobs, one after the other,
    into the cache's shards; readers wait for the rows they need with :meth:`wait`.

    Args:
        jobs: what to extract, in that order: a store, its image set, source indices.
        extractor: the backbone (its model runs in the thread; torch ops release the GIL).
        batch_size: images per batch, and per shard: small, so the first rows come soon.
        threads: torch intra-op threads in the thread (``None``: every core; the learner
            runs on its own ``threads``, 1 by default).
        progress: show a tqdm bar of the images extracted.
    """

    def __init__(self, jobs: Sequence[tuple[RowStore, ImageSet, np.ndarray]], extractor: Extractor,
                 batch_size: int = 64, threads: int | None = None, progress: bool = True) -> None:
        self.jobs, self.extractor, self.batch_size = list(jobs), extractor, int(batch_size)
        self.threads = threads or os.cpu_count() or 1
        self.todo = sum(len(store.missing(order)) for store, _, order in self.jobs)  # an upper bound: jobs share images
        self.extracted = 0
        self.error: BaseException | None = None
        self.finished = False
        self.started_at = time.perf_counter()
        self.seconds = 0.0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._bar = _bar(self.todo, 0, "features", progress, position=1, leave=False)
        self._thread = threading.Thread(target=self._run, name="ocl-features", daemon=True)

    def start(self) -> "Prefetcher":
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def _on_batch(self, k: int) -> None:
        self._bar.update(k)
        with self._cond:
            self.extracted += k
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            # This thread's own setting (the learner keeps its own): torch initialises a thread's
            # count from the last one set anywhere on its first parallel op, so initialise first.
            torch.get_num_threads()
            torch.set_num_threads(int(self.threads))
            for store, images, order in self.jobs:
                fill(store, images, self.extractor, order, self.batch_size, self._stop, self._on_batch)
            for store in {id(s): s for s, _, _ in self.jobs}.values():
                if not self._stop.is_set() and store.n and (store.shard_of >= 0).all() and store.rows_dir.exists():
                    store.assemble(engine="local")  # every image is there: the full entry, for every reader
        except BaseException as e:  # handed to the reader, which raises it in the main thread
            self.error = e
        finally:
            self.seconds = time.perf_counter() - self.started_at
            with self._cond:
                self.finished = True
                self._cond.notify_all()

    def wait(self, store: RowStore, idx: np.ndarray | None) -> float:
        """Block until every image ``idx`` of ``store`` has its row (``None``: until the store
        knows D, after its first shard). Returns the seconds waited.

        Raises:
            OCLError: the extraction failed (its error), or ended without these images.
        """
        t0 = time.perf_counter()
        with self._cond:
            while store.dim is None if idx is None else (store.shard_of[idx] < 0).any():
                if self.error is not None:
                    if isinstance(self.error, OCLError):  # a bad batch, a full disk: as it is (its type too)
                        raise self.error
                    raise OCLError(f"feature extraction failed: {type(self.error).__name__}: "
                                   f"{self.error}") from self.error
                if self.finished:
                    raise OCLError(f"the feature extraction stopped before the images this run reads next "
                                   f"({store.path}).")
                self._cond.wait(0.5)  # with a timeout: Ctrl-C is handled meanwhile
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop after the batch under way (it is written: every finished batch is kept), wait
        for the thread, and say what the cache holds."""
        if self._stop.is_set():  # closed already
            return
        self._stop.set()
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join()
        self._bar.close()
        if self.extracted or self.error is not None:
            log.info("extracted %d images in %.1f s in the background (%.1f images/s)%s", self.extracted,
                     self.seconds, self.extracted / self.seconds if self.seconds > 0 else float("nan"),
                     "" if self.error is None else f", then failed: {self.error}")
        for store in {id(s): s for s, _, _ in self.jobs}.values():
            if store.rows_dir.exists():
                log.info("feature cache: %s", _kept(store))


class LazyFeatures:
    """``(n, D)`` features of an image set, read row by row as a :class:`Prefetcher` extracts
    them: ``feats[idx]`` (``idx`` an array of source indices) waits for those rows, then
    returns them as ``(len(idx), D)`` float32. What the runner needs of a feature array."""

    def __init__(self, store: RowStore, prefetcher: Prefetcher, name: str = "train") -> None:
        self.store, self.prefetcher, self.name = store, prefetcher, name
        self.dtype = np.dtype(np.float32)
        self._first = True

    @property
    def shape(self) -> tuple[int, int]:
        if self.store.dim is None:  # an extractor that knows D only once it has seen images
            self.prefetcher.wait(self.store, None)
        return (self.store.n, int(self.store.dim or 0))

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.store.n

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = np.atleast_1d(np.arange(self.store.n)[idx] if isinstance(idx, slice) else np.asarray(idx, np.int64))
        waited = self.prefetcher.wait(self.store, idx)
        if self._first:
            self._first = False
            log.info("first %s features read %.1f s after the extraction started (waited %.1f s for them)",
                     self.name, time.perf_counter() - self.prefetcher.started_at, waited)
        return self.store.read(idx)


def stream_plan(order: np.ndarray, boundaries: np.ndarray, test: np.ndarray | None) -> list[tuple[str, np.ndarray]]:
    """What a run reads, in the order it reads it: ``[("train", stream order up to the first
    task boundary), ("test", every task's test images), ("train", the rest)]`` (no test part
    when ``test`` is ``None``)."""
    cut = int(boundaries[0]) if len(boundaries) else len(order)
    plan = [("train", order[:cut])]
    if test is not None:
        plan.append(("test", test))
    plan.append(("train", order[cut:]))
    return [(split, idx) for split, idx in plan if len(idx)]


def stream_features(splits: Sequence[tuple[str, ImageSet]], stream: Any, extractor: Extractor,
                    cache_dir: str | os.PathLike, dtype: str = "float32", progress: bool = True,
                    batch_size: int = 64) -> tuple[dict[str, Any], Prefetcher | None]:
    """The features of ``splits`` (``[("train", images), ("test", images)?]``) that a run of
    ``stream`` reads: a complete cache entry as it is, else a :class:`LazyFeatures` over the
    shards a background :class:`Prefetcher` (started here) extracts, in stream order.

    Returns ``({split: features}, prefetcher or None)``; the caller must ``close()`` the
    prefetcher when the run ends (also on an error or Ctrl-C).
    """
    stores: dict[str, RowStore] = {}
    feats: dict[str, Any] = {}
    for split, images in splits:
        store, full = open_store(images, extractor, cache_dir, dtype)
        if full is not None:
            feats[split] = full
        else:
            stores[split] = store
    if not stores:
        return feats, None
    test_idx = None
    if "test" in stores:
        test_idx = np.concatenate([tt.index for tt in stream.tests] or [np.zeros(0, np.int64)]).astype(np.int64)
    plan = [(split, idx) for split, idx in stream_plan(np.asarray(stream.order, np.int64), stream.boundaries(),
                                                       test_idx) if split in stores]
    images = dict(splits)
    prefetcher = Prefetcher([(stores[s], images[s], idx) for s, idx in plan], extractor, batch_size,
                            getattr(extractor, "threads", None), progress)
    needed = {s: len(stores[s].missing(np.concatenate([idx for t, idx in plan if t == s] or [np.zeros(0, np.int64)])))
              for s in stores}
    log.info("extracting the features this run reads, in stream order, in the background: %s (the rest of each "
             "set is not extracted; shards in the cache are reused)",
             ", ".join(f"{s}: {needed[s]} images to extract" for s in stores))
    prefetcher.start()
    for split, store in stores.items():
        feats[split] = LazyFeatures(store, prefetcher, split)
    return feats, prefetcher
