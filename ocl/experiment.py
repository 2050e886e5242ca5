"""Wires a resolved config into a run: source -> protocol -> features -> learner -> results.

Kept separate from the CLI so tests and scripts can call :func:`run_experiment` with a
plain ``DictConfig`` and an output directory.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ocl import checkpoint as ckpt
from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.metrics import NearFutureTracker, Tracker, boundary_summary, near_future_summary
from ocl.report import write_json_atomic, write_near_future_csv, write_steps_csv
from ocl.runner import RunResult, RunState, run_stream
from ocl.streams.base import Source
from ocl.streams.custom import to_source
from ocl.streams.features import STORAGE_DTYPES, Extractor, extract_features
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
        if isinstance(obj, functools.partial):
            _check_options(what, obj, kwargs)
        return obj(*args, **kwargs) if (args or kwargs) else obj
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, OCLError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise OCLError(f"could not build `{what}` from its config ({node.get('_target_')}): {e}") from e


def _check_options(what: str, factory: functools.partial, given_by_runner: dict[str, Any]) -> None:
    """Name a mistyped option of a ``_partial_`` factory (``+learner.lrr=0.1``) instead of
    letting the constructor fail with a bare ``TypeError``."""
    try:
        params = inspect.signature(factory.func).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the target validates its own **options
    unknown = sorted(set(factory.keywords) - set(params))
    if unknown:
        valid = sorted(k for k in params if k not in given_by_runner and k != "self")
        raise OCLError(
            f"{what}: unknown option(s) {unknown} for {getattr(factory.func, '__qualname__', factory.func)}; "
            f"valid options: {valid}. Fix the spelling of the override (e.g. {what}.{valid[0] if valid else 'x'}=...)."
        )


#: Top-level run settings: (check, what a valid value is). Hydra checks key names (a mistyped key
#: is an error there); values arrive as whatever the command line parsed, so check them here.
_RUN_KEYS: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "chunk_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "curve_window": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "threads": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                "an integer >= 1 or null"),
    "checkpoint_every": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                         "a number of examples >= 1, or null (only at the end and on Ctrl-C)"),
    "eval_test": (lambda v: isinstance(v, bool), "true or false"),
    "progress": (lambda v: isinstance(v, bool), "true or false"),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "cache_dtype": (lambda v: v in STORAGE_DTYPES, " or ".join(STORAGE_DTYPES)),
}


def check_run_config(cfg: DictConfig) -> None:
    """Raise :class:`OCLError` naming the first top-level setting with an invalid value."""
    for key, (ok, what) in _RUN_KEYS.items():
        if key in cfg and not ok(cfg[key]):
            raise OCLError(f"{key}={cfg[key]!r}: must be {what}. Set it as {key}=VALUE on the command line "
                           "(see configs/config.yaml).")
    make_near_future(cfg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def make_near_future(cfg: DictConfig) -> NearFutureTracker | None:
    """The near-future evaluation ``cfg.near_future`` asks for (``offset`` S, ``every`` m), or
    ``None`` when it is off (``near_future.every=null``, or no ``near_future`` node).

    Raises:
        OCLError: S is not an integer >= 0, or m not an integer >= 1 or null.
    """
    node = cfg.get("near_future")
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        raise OCLError(f"near_future={node!r}: set its keys instead, e.g. near_future.offset=100 "
                       "near_future.every=20 (near_future.every=null turns it off).")
    offset, every = node.get("offset"), node.get("every")
    if not _is_int(offset) or offset < 0:
        raise OCLError(f"near_future.offset={offset!r}: must be an integer >= 0 (S, how many steps past the "
                       "next one the evaluated example lies; see configs/config.yaml).")
    if every is None:
        return None
    if not _is_int(every) or every < 1:
        raise OCLError(f"near_future.every={every!r}: must be an integer >= 1 (steps between near-future "
                       "evaluations), or null to turn them off.")
    return NearFutureTracker(offset, every)


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
    dtype = str(cfg.get("cache_dtype", "float32"))
    train = extract_features(source.train, extractor, cache, progress=bool(cfg.progress), dtype=dtype)
    test = None
    if cfg.eval_test and source.test is not None and len(source.test) > 0:
        test = extract_features(source.test, extractor, cache, progress=bool(cfg.progress), dtype=dtype)
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
    """Metrics dict of one run (the body of ``results.json``). Reads the per-step records in
    blocks: constant memory however long the stream."""
    tr = result.tracker
    out: dict[str, Any] = dict(tr.summary())
    out["examples_per_second"] = tr.t / result.learn_seconds if result.learn_seconds > 0 else float("nan")
    out["learn_seconds"] = result.learn_seconds
    out["eval_seconds"] = result.eval_seconds
    out["nonfinite_predictions"] = tr.nonfinite
    out.update(near_future_summary(result.near_future))
    out["near_future_seconds"] = result.near_future_seconds
    keep = np.unique(np.linspace(0, tr.t - 1, min(tr.t, 500)).astype(int))  # <= 500 points
    out["online_accuracy_curve"] = {"window": curve_window, "step": keep,
                                    "accuracy": tr.accuracy_curve_at(keep, curve_window)}
    out["task_boundaries"] = stream.boundaries()
    if result.acc is not None:
        out["accuracy_matrix"] = result.acc
        out.update(boundary_summary(result.acc))
    return out


def _writable_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable by writing a file there (``os.access`` lies
    for root and on some network file systems)."""
    fix = "choose another with hydra.run.dir=DIR (or fix its permissions)."
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise OCLError(f"cannot write to the run directory {out_dir} ({e.strerror or e}); {fix}") from e


def _resume_hint(out_dir: Path) -> str:
    return f"ocl run <the same overrides> resume=true hydra.run.dir={out_dir}"


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run one prequential experiment and write ``results.json``, ``steps.csv`` and (with
    near-future evaluation on) ``near_future.csv`` to ``out_dir``.

    The run checkpoints itself to ``out_dir/checkpoint.pt`` every ``cfg.checkpoint_every``
    examples, at the end, and on SIGINT/SIGTERM (then raises
    :class:`~ocl.checkpoint.RunInterrupted`); with ``cfg.resume`` it continues from that
    checkpoint and ends with the results an uninterrupted run would have produced.
    Per-step records go to ``out_dir/steps.npy`` as they are made (not into memory).
    """
    check_run_config(cfg)
    out_dir = Path(out_dir)
    _writable_dir(out_dir)
    resume = bool(cfg.get("resume", False))
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = out_dir / ckpt.CHECKPOINT
    saved = None
    if resume:
        saved = ckpt.load(ckpt_path)
        ckpt.check_resumable(saved, config, None, ckpt_path)  # before any slow work
    elif ckpt_path.exists():
        raise OCLError(
            f"{out_dir} already holds a checkpoint ({ckpt_path.name}) of an earlier run; nothing was changed. "
            f"Continue that run with resume=true, or start a new one in another directory (hydra.run.dir=DIR)."
        )
    seed_everything(int(cfg.seed))
    source, stream, extractor, train, test, feat_s = prepare(cfg)
    digest = ckpt.stream_digest(stream, tuple(train.shape[1:]))
    steps_path = out_dir / "steps.npy"
    if saved is not None:
        ckpt.check_resumable(saved, config, digest, ckpt_path)
        learner = saved["learner"]
        state = RunState(Tracker(len(stream), stream.tasks, path=str(steps_path), resume=True), None,
                         near_future=make_near_future(cfg))
        try:
            state.load_state_dict(saved["run"])
        except (OSError, ValueError) as e:
            raise OCLError(f"cannot resume {ckpt_path}: {e}. Start a new run in another directory.") from e
        ckpt.set_rng_state(saved["rng"])
        log.info("resuming %s at example %d of %d", ckpt_path, state.steps, len(stream))
    else:
        learner = make_learner(cfg, int(train.shape[1]), stream.num_classes)
        learner.set_workdir(out_dir)
        evaluate = test is not None and len(stream.tests) > 0
        state = RunState(Tracker(len(stream), stream.tasks, path=str(steps_path)),
                         np.zeros((stream.n_tasks, stream.n_tasks)) if evaluate else None,
                         near_future=make_near_future(cfg))
    checkpointer = ckpt.Checkpointer(ckpt_path, cfg.get("checkpoint_every"), learner, config, digest,
                                     _resume_hint(out_dir))
    checkpointer.last_saved = state.steps
    log.info("stream %s/%s: %d examples, %d classes, %d tasks, D=%d, chunk %d",
             source.name, stream.name, len(stream), stream.num_classes, stream.n_tasks,
             train.shape[1], cfg.chunk_size)
    with learning_threads(cfg.get("threads")) as n_threads, checkpointer.catch_signals():
        # after extraction, which wants every core
        result = run_stream(learner, train, stream, int(cfg.chunk_size), test, progress=bool(cfg.progress),
                            on_chunk=checkpointer, state=state)
        checkpointer.save(result.state)  # the end: resume=true on a finished run just rewrites the results
    res = summarize(result, stream, int(cfg.curve_window))
    skipped = getattr(learner, "skipped_updates", None)
    if skipped:
        log.warning("%d updates were skipped because their loss (or gradient) was not finite", skipped)
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
        "skipped_updates": skipped,
        "resumed": resume,
        "torch": torch.__version__,
        "host": platform.node(),
        "config": config,
    })
    write_json_atomic(out_dir / "results.json", res)
    write_steps_csv(out_dir / "steps.csv", result.tracker)
    if result.near_future is not None:
        write_near_future_csv(out_dir / "near_future.csv", result.near_future)
    result.tracker.close()
    return res
