"""``ocl extract``: fill the feature cache of a stream without running a learner.

Extract once (on GPUs, on a cluster), learn anywhere: ``ocl run`` and ``ocl compare`` with
the same ``stream``/``backbone``/``cache_dir``/``cache_dtype`` overrides then find the
features in the cache. Two engines:

- ``engine=local``: :func:`ocl.streams.prefetch.extract_features`, in this process, batch by
  batch into shards of the cache (:mod:`ocl.streams.rows`): Ctrl-C or SIGTERM keeps the
  finished ones, and the same command continues from them;
- ``engine=ray``: the images are cut into shards (:mod:`ocl.streams.shards`) and a Ray Data
  ``map_batches`` over the shards not yet written runs on a pool of actors, one model per
  actor (per GPU on a GPU cluster). Each actor reads its shard's images, extracts and writes
  the shard to the cache; the driver assembles the entry once every shard is there. A worker
  that dies is restarted by Ray Data and its shard redone (Ray Data's actor fault
  tolerance); an extraction that stops (Ctrl-C, the driver or the cluster gone) resumes from
  the shards it has when run again. The features are those of the local
  engine (same extractor, same preprocessing; only the batch boundaries differ, which moves
  conv/matmul results by float rounding at most).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ocl.errors import OCLError
from ocl.build import build, feature_splits, load_source
from ocl.options import check_run_config
from ocl.ray_engine import check_engine, check_ray_config, ray_session, require_ray
from ocl.streams.base import ImageSet
from ocl.streams.prefetch import extract_features
from ocl.streams.features import Extractor
from ocl.signals import sigterm_as_interrupt
from ocl.streams.shards import Shard, ShardedEntry

log = logging.getLogger(__name__)


def run_extract(cfg: DictConfig) -> list[dict[str, Any]]:
    """Extract (or find cached) the features of ``cfg.stream``'s train split, and of its test
    split unless ``eval_test=false``, with ``cfg.backbone`` into ``cfg.cache_dir``.

    Returns one row per split: ``split``, ``images``, ``feature_dim``, ``dtype``, ``bytes``,
    ``seconds``, ``images_per_second``, ``cached`` (it was there already) and ``path``
    (the cache entry).

    Raises:
        OCLError: no cache (``cache_dir=null``), a backbone that is not cached (``pixels``),
            a bad setting, Ray missing for ``engine=ray``, or an extraction that stopped (the
            message says how to resume).
    """
    check_run_config(cfg)
    engine = check_engine(cfg.get("engine", "local"))
    if engine == "ray":
        check_ray_config(cfg.ray)
    cache = cfg.get("cache_dir")
    if not cache:
        raise OCLError("ocl extract fills the feature cache, and cache_dir is null: set cache_dir=DIR "
                       "(the directory ocl run / ocl compare will read the features from).")
    cache = os.path.expanduser(str(cache))
    dtype = str(cfg.get("cache_dtype", "float32"))
    source = load_source(cfg)
    extractor: Extractor = build(cfg, "backbone")
    if not extractor.cacheable:
        raise OCLError(f"backbone {extractor.key()} is computed on the fly and never cached (reading the images "
                       "costs as much as computing it): there is nothing to extract. Choose a model backbone, "
                       "e.g. backbone=dino_vits16.")
    splits = feature_splits(cfg, source)
    progress = bool(cfg.get("progress", True))
    rows = []
    if engine == "local":
        for split, images in splits:
            rows.append(_timed(split, lambda: extract_features(images, extractor, cache, progress=progress,
                                                               dtype=dtype)))
        return rows
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    with sigterm_as_interrupt(), ray_session(cfg.ray):  # SIGTERM stops it as Ctrl-C does: the shards stay
        for split, images in splits:
            rows.append(_timed(split, lambda: extract_sharded(images, extractor, backbone, cache, dtype, cfg.ray,
                                                              progress)))
    return rows


def _timed(split: str, extract: Any) -> dict[str, Any]:
    """Run ``extract()`` (which returns the cache entry's memmap) and describe the result."""
    began, t0 = time.time_ns(), time.perf_counter()
    feats = extract()
    dt = time.perf_counter() - t0
    path = Path(feats.filename).parent
    return {"split": split, "images": int(feats.shape[0]), "feature_dim": int(feats.shape[1]), "dtype": str(feats.dtype),
            "bytes": int((path / "features.npy").stat().st_size), "seconds": dt,
            "images_per_second": feats.shape[0] / dt if dt > 0 else float("nan"),
            "cached": (path / "meta.json").stat().st_mtime_ns < began,  # written by an earlier run
            "path": str(path)}


# ---------------------------------------------------------------- engine=ray


class ShardWriter:
    """A Ray Data actor: one model, building shards of the cache (``map_batches`` rows are
    shards ``{index, start, stop}``; it returns ``{index, n, began, ended}`` per shard written,
    the last two in ``time.time()`` seconds).

    Args:
        backbone: the resolved ``backbone`` config, built here (on the worker's GPU, if Ray
            gave it one: ``device: auto`` sees only that GPU).
        images: the image set (read here, shard by shard).
        entry: the cache entry being built.
        threads: torch threads (the worker's CPUs).
    """

    def __init__(self, backbone: dict[str, Any], images: ImageSet, entry: ShardedEntry, threads: int) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.extractor: Extractor = build(OmegaConf.create({"backbone": backbone}), "backbone")
        if self.extractor.key() != entry.extractor_key:
            raise OCLError("a Ray worker built a different backbone than the driver (other weights on that node?):\n"
                           f"  worker: {self.extractor.key()}\n  driver: {entry.extractor_key}")
        self.images, self.entry = images, entry

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, began, ended = [], [], []
        for i, start, stop in zip(batch["index"], batch["start"], batch["stop"]):
            began.append(time.time())
            self.entry.write(Shard(int(i), int(start), int(stop)), self.images, self.extractor)
            ended.append(time.time())
            n.append(int(stop) - int(start))
        return {"index": np.asarray(batch["index"]), "n": np.asarray(n, dtype=np.int64),
                "began": np.asarray(began), "ended": np.asarray(ended)}


def _resources(ray: Any, rcfg: Any, n_shards: int) -> tuple[int, float, float]:
    """``(workers, CPUs per worker, GPUs per worker)``: one worker per GPU of the cluster when
    it has GPUs, else one per ``extract_cpus`` CPUs; never more workers than shards."""
    total = ray.cluster_resources()
    cpus = float(rcfg.extract_cpus)
    gpus = rcfg.extract_gpus
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) > 0 else 0.0
    workers = rcfg.extract_workers
    if workers is None:
        workers = int(total.get("GPU", 0) // gpus) if gpus > 0 else int(total.get("CPU", 1) // max(cpus, 1.0))
    return max(1, min(int(workers), n_shards)), cpus, float(gpus)


def extract_sharded(images: ImageSet, extractor: Extractor, backbone: dict[str, Any], cache_dir: str, dtype: str,
                    rcfg: Any, progress: bool = True) -> np.ndarray:
    """Features of ``images`` in the cache, computed shard by shard by a pool of Ray actors
    (a Ray session must be up: :func:`ocl.ray_engine.ray_session`).

    Shards already written (by an earlier, interrupted run) are kept; a complete entry is
    returned as it is. ``extractor`` (built here, in the driver) gives the cache key; every
    worker builds its own from ``backbone`` and must find the same key.

    Returns:
        ``(n, D)`` read-only memmap of the cache entry, in ``dtype``.
    """
    ray = require_ray()
    from tqdm.auto import tqdm

    entry = ShardedEntry(cache_dir, images.fingerprint(), extractor.key(), len(images), dtype)
    if entry.complete():
        log.info("feature cache hit: %s", entry.path)
        return np.load(entry.path / "features.npy", mmap_mode="r")
    shards = entry.plan(int(rcfg.shard_size))
    done = entry.done(shards)
    pending = [sh for sh in shards if sh.index not in done]
    if pending:
        workers, cpus, gpus = _resources(ray, rcfg, len(pending))
        log.info("extracting %d images in %d shards (%d already written) with %d Ray workers (%g CPU, %g GPU each)",
                 sum(map(len, pending)), len(pending), len(done), workers, cpus, gpus)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, theirs blocks
        ds = ray.data.from_items([asdict(sh) for sh in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(ShardWriter, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
                            fn_constructor_kwargs={"backbone": backbone, "images": images, "entry": entry,
                                                   "threads": max(1, int(cpus))})
        bar = tqdm(total=len(images), initial=sum(len(sh) for sh in shards if sh.index in done), unit="img",
                   desc="features (ray)", disable=not progress or not sys.stderr.isatty())
        n, began, ended = 0, float("inf"), 0.0
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(int(batch["n"].sum()))
                n += int(batch["n"].sum())
                began, ended = min(began, float(batch["began"].min())), max(ended, float(batch["ended"].max()))
        except Exception as e:
            raise stopped_error(e, entry, shards) from e
        finally:
            bar.close()
        # The rate once the first worker is up (decode, extract, write; not starting the pool),
        # which a long extraction approaches:
        span = ended - began
        log.info("%d images in %.1f s from the first shard's start to the last one's end: %.1f img/s",
                 n, span, n / span if span > 0 else float("nan"))
    return entry.assemble(shards, engine="ray")


def stopped_error(e: Exception, entry: ShardedEntry, shards: list[Shard]) -> OCLError:
    """The error of an extraction that stopped: the user's own problem (an OCLError raised in a
    worker, e.g. NaN features) as it is, else what happened and how to resume."""
    cause: BaseException | None = e
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OCLError):
            return OCLError(str(cause))
        seen.add(id(cause))
        cause = cause.__cause__ or getattr(cause, "cause", None)
    # Ray Data hands a worker's exception back as text only (a UserCodeException whose message
    # holds the worker's traceback): find our error's message in it.
    found = re.search(r"^ocl\.errors\.\w+: ", str(e), re.M)  # OCLError or a subclass (StorageError)
    if found:
        return OCLError(str(e)[found.end():].split("\n\nThe above exception")[0].strip())
    kept = len(entry.done(shards))
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return OCLError(f"the Ray extraction stopped ({type(e).__name__}: {first}). {kept} of {len(shards)} shards "
                    f"are written in {entry.shards_dir}; run the same command again to extract the other "
                    f"{len(shards) - kept}.")
