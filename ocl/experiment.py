"""Wires a resolved config into a run: source -> protocol -> features -> learner -> results.

Kept separate from the CLI so tests and scripts can call :func:`run_experiment` with a
plain ``DictConfig`` and an output directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.metrics import boundary_summary, online_accuracy_curve
from ocl.report import write_json_atomic, write_steps_csv
from ocl.runner import RunResult, run_stream
from ocl.streams.base import Source
from ocl.streams.custom import to_source
from ocl.streams.features import Extractor, extract_features
from ocl.streams.protocols import Stream

log = logging.getLogger(__name__)


def build(cfg: DictConfig, what: str, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[what])`` with user errors surfaced as :class:`OCLError`.

    Hydra wraps exceptions raised by the target; an :class:`OCLError` inside is
    re-raised as-is so the user reads our message, not a wrapper's.
    """
    node = cfg.get(what)
    if node is None or "_target_" not in node:
        raise OCLError(f"config group '{what}' needs a `_target_` (e.g. {what}=<name>).")
    try:
        obj = instantiate(node, _convert_="all")
        return obj(*args, **kwargs) if (args or kwargs) else obj
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, OCLError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise OCLError(f"could not build `{what}` from its config ({node.get('_target_')}): {e}") from e


def seed_everything(seed: int) -> None:
    """Seed every global RNG a learner or library might use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def learning_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads (``None``: unchanged); restores
    the previous setting after. Yields the thread count in effect."""
    before = torch.get_num_threads()
    if threads is not None:
        if int(threads) < 1:
            raise OCLError(f"threads={threads}: must be >= 1 (or null for torch's default).")
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def prepare(cfg: DictConfig) -> tuple[Source, Stream, Extractor, np.ndarray, np.ndarray | None, float]:
    """Build the source and stream and extract (or load cached) features.

    Returns ``(source, stream, extractor, train_feats (n_train, D), test_feats or None, seconds)``.
    """
    source = to_source(build(cfg, "stream"), name=str(cfg.stream.get("name") or "custom"))
    stream: Stream = build(cfg, "protocol", source, seed=int(cfg.seed))
    if len(stream) == 0:
        raise OCLError(f"the stream built from {source.name} is empty; nothing to learn from.")
    extractor: Extractor = build(cfg, "backbone")
    cache = cfg.get("cache_dir")
    cache = os.path.expanduser(str(cache)) if cache else None
    t0 = time.perf_counter()
    train = extract_features(source.train, extractor, cache, progress=bool(cfg.progress))
    test = None
    if cfg.eval_test and source.test is not None and len(source.test) > 0:
        test = extract_features(source.test, extractor, cache, progress=bool(cfg.progress))
    elif cfg.eval_test and source.test is None:
        log.info("%s has no test split: skipping task-boundary evaluation.", source.name)
    return source, stream, extractor, train, test, time.perf_counter() - t0


def make_learner(cfg: DictConfig, feature_dim: int, num_classes: int) -> Learner:
    """Instantiate ``cfg.learner`` (a ``_partial_`` factory) for this stream."""
    learner = build(cfg, "learner", feature_dim=feature_dim, num_classes=num_classes, seed=int(cfg.seed))
    if not isinstance(learner, Learner):
        raise OCLError(f"learner `{cfg.learner._target_}` must subclass ocl.learners.base.Learner.")
    return learner


def summarize(result: RunResult, stream: Stream, curve_window: int) -> dict[str, Any]:
    """Metrics dict of one run (the body of ``results.json``)."""
    tr = result.tracker
    out: dict[str, Any] = dict(tr.summary())
    out["examples_per_second"] = tr.t / result.learn_seconds if result.learn_seconds > 0 else float("nan")
    out["learn_seconds"] = result.learn_seconds
    out["eval_seconds"] = result.eval_seconds
    out["nonfinite_predictions"] = tr.nonfinite
    curve = online_accuracy_curve(tr.correct, curve_window)
    keep = np.unique(np.linspace(0, tr.t - 1, min(tr.t, 500)).astype(int))  # <= 500 points
    out["online_accuracy_curve"] = {"window": curve_window, "step": keep, "accuracy": curve[keep]}
    out["task_boundaries"] = stream.boundaries()
    if result.acc is not None:
        out["accuracy_matrix"] = result.acc
        out.update(boundary_summary(result.acc))
    return out


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run one prequential experiment and write ``results.json`` and ``steps.csv`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise OCLError(f"cannot write to the run directory {out_dir}; choose another with hydra.run.dir=DIR.")
    seed_everything(int(cfg.seed))
    source, stream, extractor, train, test, feat_s = prepare(cfg)
    learner = make_learner(cfg, int(train.shape[1]), stream.num_classes)
    log.info("stream %s/%s: %d examples, %d classes, %d tasks, D=%d, chunk %d",
             source.name, stream.name, len(stream), stream.num_classes, stream.n_tasks,
             train.shape[1], cfg.chunk_size)
    with learning_threads(cfg.get("threads")) as n_threads:  # after extraction, which wants every core
        result = run_stream(learner, train, stream, int(cfg.chunk_size), test, progress=bool(cfg.progress))
    res = summarize(result, stream, int(cfg.curve_window))
    info = getattr(extractor, "info", {"model": "pixels", "weights": "none"})
    res.update({
        "learner": getattr(learner, "name", type(learner).__name__),
        "stream": source.name,
        "protocol": stream.name,
        "n_tasks": stream.n_tasks,
        "num_classes": stream.num_classes,
        "feature_dim": int(train.shape[1]),
        "backbone": info,
        "random_backbone": info.get("weights") == "random",
        "feature_seconds": feat_s,
        "seed": int(cfg.seed),
        "chunk_size": int(cfg.chunk_size),
        "threads": n_threads,
        "torch": torch.__version__,
        "host": platform.node(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    })
    write_json_atomic(out_dir / "results.json", res)
    write_steps_csv(out_dir / "steps.csv", result.tracker)
    return res
