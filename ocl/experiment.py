"""Wires a resolved config into a run: source -> protocol -> features -> learner -> results.

Kept separate from the CLI so tests and scripts can call :func:`run_experiment` with a
plain ``DictConfig`` and an output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import platform
import random
import time
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from ocl import checkpoint as ckpt
from ocl import rundir
from ocl.errors import OCLError, StorageError, describe_os_error
from ocl.files import check_writable_dir
from ocl.learners.base import Learner
from ocl.metrics import boundary_summary
from ocl.report import write_json_atomic, write_near_future_csv, write_steps_csv
from ocl.runner import RunResult, RunState, run_stream
from ocl.streams.base import Source
from ocl.streams.custom import to_source
from ocl.streams.cache import STORAGE_DTYPES, extract_features
from ocl.streams.features import Extractor
from ocl.streams.protocols import Stream
from ocl.threads import torch_threads
from ocl.tracker import NearFutureTracker, Tracker, near_future_summary

log = logging.getLogger(__name__)


#: What the runner passes to every learner factory itself (``factory(feature_dim=D, num_classes=K, seed=s)``).
LEARNER_ARGS: tuple[str, ...] = ("feature_dim", "num_classes", "seed")
_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})


def _nonnegative(key: str) -> bool:
    """Options that must not be negative whatever the target: step sizes and penalties."""
    return key in ("lr", "weight_decay", "momentum") or key.endswith("_lr")


def _short(text: Any, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters: an error message must never carry a file's bytes."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s) - limit:,} more characters)"


def build(cfg: DictConfig, what: str, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[what])`` with user errors surfaced as :class:`OCLError`.

    The node's options are checked first (:func:`check_options`); a ``_partial_`` factory
    is then called with ``args``/``kwargs``. Hydra wraps exceptions raised by the target; an
    :class:`OCLError` inside is re-raised as-is so the user reads our message, not a
    wrapper's. A constructor that rejects a value (``ValueError``/``TypeError``) becomes one line.
    """
    node = cfg.get(what)
    if node is None or "_target_" not in node:
        raise OCLError(f"config group '{what}' needs a `_target_` (e.g. {what}=<name>).")
    check_options(node, what, tuple(kwargs), len(args))
    try:
        obj = instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, (OCLError, OSError)):
            cause = cause.__cause__
        if isinstance(cause, OCLError):
            raise cause from None
        if isinstance(cause, OSError):  # a file the target could not read: name it
            raise OCLError(f"could not build `{what}` ({node.get('_target_')}): {describe_os_error(cause)}") from e
        raise OCLError(f"could not build `{what}` from its config ({node.get('_target_')}): {_short(e)}") from e
    if not (args or kwargs):
        return obj
    try:
        return obj(*args, **kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        name = getattr(getattr(obj, "func", obj), "__qualname__", node.get("_target_"))
        given = {k: v for k, v in node.items() if k not in _HYDRA_KEYS}
        raise OCLError(f"{what}: {name} refused its options {given}: {_short(e)}") from e


def _target_of(node: Any) -> Any:
    try:
        return get_object(str(node["_target_"]))
    except Exception:  # hydra says what is wrong with a target it cannot import, when building
        return None


def _simple_types(hint: Any) -> set[type] | None:
    """The scalar types a type hint allows (``float | None`` -> {float, NoneType}), or None
    when the hint is anything else (containers, classes: not checked here)."""
    scalars = (float, int, bool, str, type(None))
    if hint in scalars:
        return {hint}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if all(a in scalars for a in args):
            return set(args)
    return None


def _check_value(what: str, key: str, value: Any, hint: Any) -> None:
    allowed = _simple_types(hint)
    if allowed is None or str in allowed:  # a string option takes what the command line made of it
        return
    number = float in allowed
    if value is None:
        ok = type(None) in allowed
    elif isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or number
    elif isinstance(value, float):
        ok = number and math.isfinite(value)
    else:
        ok = False
    if ok and _nonnegative(key) and isinstance(value, (int, float)) and value < 0:
        raise OCLError(f"{what}.{key}={value!r}: must be >= 0.")
    if not ok:
        kinds = [k for t, k in ((float, "a finite number"), (int, "an integer"), (bool, "true or false"))
                 if t in allowed and not (t is int and number)]
        if type(None) in allowed:
            kinds.append("null")
        raise OCLError(f"{what}.{key}={value!r}: must be {' or '.join(kinds)}. Set it as {what}.{key}=VALUE.")


def check_options(node: Any, what: str, runner_args: Sequence[str] = (), n_args: int = 0) -> None:
    """Check a config node's options against the signature of its ``_target_`` before anything
    is built: a mistyped name (``+learner.lrr=0.1``) and a value of the wrong kind
    (``learner.lr=abc``, ``learner.lr=nan``, ``learner.window=abc``, ``learner.lr=-1``) are
    one clear :class:`OCLError` instead of a constructor's traceback.

    Names come from the signature, or for a constructor taking ``**options`` from the dataclass
    it names as ``options`` (e.g. the transformer's ``TransformerConfig``); values are checked
    against scalar type hints (``float`` options must be finite; options named ``lr``,
    ``*_lr``, ``weight_decay``, ``momentum`` must be >= 0).

    Args:
        node: the config node (``_target_`` + options).
        what: its name in messages (``learner``, ``learner_options.mlp``).
        runner_args: keyword arguments the runner passes itself (not options).
        n_args: positional arguments the runner passes first (a protocol's ``source``).
    """
    target = _target_of(node)
    if target is None:
        return
    try:
        params = inspect.signature(target).parameters
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except (TypeError, ValueError, NameError):
        return
    given = [k for k in node if k not in _HYDRA_KEYS]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        spec = getattr(target, "options", None)
        if not dataclasses.is_dataclass(spec):
            return  # the target validates its own **options
        names = [f.name for f in dataclasses.fields(spec)]
        hints = {**hints, **typing.get_type_hints(spec)}
    else:
        names = [k for k in params if k != "self"]
    unknown = sorted(set(given) - set(names))
    if unknown:
        positional = [k for k in params if k != "self"][:n_args]
        valid = sorted(set(names) - set(runner_args) - set(positional))
        raise OCLError(
            f"{what}: unknown option(s) {unknown} for {getattr(target, '__qualname__', target)}; "
            f"valid options: {valid}. Fix the spelling of the override (e.g. {what}.{valid[0] if valid else 'x'}=...)."
        )
    for key in given:
        _check_value(what, key, node[key], hints.get(key))


#: Top-level run settings: (check, what a valid value is). Hydra checks key names (a mistyped key
#: is an error there); values arrive as whatever the command line parsed, so check them here.
#: Seeds go to torch (which takes at most 2**64 - 1) and numpy (which refuses negative ones).
MAX_SEED = 2**64 - 1
_RUN_KEYS: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED,
             f"an integer in [0, {MAX_SEED}] (2**64 - 1, the largest seed torch takes)"),
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
    """Raise :class:`OCLError` naming a required setting that was not given (``???`` in the
    configs, e.g. ``stream.path`` of ``stream=arrays``), or the first top-level setting with
    an invalid value (including a ``cache_dir`` that is a file or not writable)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise OCLError(f"{', '.join(missing)}: required but not given; set {'it' if len(missing) == 1 else 'them'} "
                       f"on the command line, e.g. {missing[0]}=VALUE.")
    for key, (ok, what) in _RUN_KEYS.items():
        if key in cfg and not ok(cfg[key]):
            raise OCLError(f"{key}={cfg[key]!r}: must be {what}. Set it as {key}=VALUE on the command line "
                           "(see configs/config.yaml).")
    make_near_future(cfg)
    cache = cfg.get("cache_dir")
    if cache:
        check_writable_dir(os.path.expanduser(str(cache)), "the feature cache directory (cache_dir)",
                           "set cache_dir=DIR to another directory, or cache_dir=null to not cache features")


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


#: The config groups built from ``_target_`` nodes: what the runner passes each factory itself
#: (keyword names, number of positional arguments).
GROUPS: dict[str, tuple[tuple[str, ...], int]] = {
    "stream": ((), 0), "protocol": (("seed",), 1), "backbone": ((), 0), "learner": (LEARNER_ARGS, 0),
}


def check_groups(cfg: DictConfig, groups: Sequence[str] = tuple(GROUPS)) -> None:
    """:func:`check_options` on each config group's node, before anything slow is built."""
    for what in groups:
        node = cfg.get(what)
        if node is not None and "_target_" in node:
            check_options(node, what, *GROUPS[what])


def seed_everything(seed: int) -> None:
    """Seed every global RNG a learner or library might use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_threads(threads: int | None) -> contextlib.AbstractContextManager[int]:
    """Run the block with ``threads`` torch intra-op threads (``None``: unchanged); restores
    the previous setting after. Yields the thread count in effect."""
    return torch_threads(threads, "threads")


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


def _resume_hint(out_dir: Path) -> str:
    return f"ocl run <the same overrides> resume=true hydra.run.dir={out_dir}"


def run_experiment(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run one prequential experiment and write ``results.json``, ``steps.csv`` and (with
    near-future evaluation on) ``near_future.csv`` to ``out_dir``.

    The run owns ``out_dir`` while it runs (:func:`ocl.rundir.claim`: a second process is
    refused) and writes nothing there until every check passed (config, resume, data,
    learner), so a refused run leaves the directory as it was. It checkpoints itself to
    ``out_dir/checkpoint.pt`` every ``cfg.checkpoint_every`` examples, at the end, and on
    SIGINT/SIGTERM (then raises :class:`~ocl.checkpoint.RunInterrupted`); with ``cfg.resume``
    it continues from that checkpoint (verified, side files included) and ends with the
    results an uninterrupted run would have produced. Per-step records go to
    ``out_dir/steps.npy`` as they are made (not into memory).

    Raises:
        OCLError: a setting, file or directory the user can fix; a :class:`~ocl.errors.StorageError`
            (disk full, permission) during the run says which checkpoint is intact.
    """
    check_run_config(cfg)
    check_groups(cfg)
    with rundir.claim(out_dir) as rd:
        return _run_owned(cfg, rd)


def _run_owned(cfg: DictConfig, rd: rundir.RunDir) -> dict[str, Any]:
    out_dir = rd.path
    resume = bool(cfg.get("resume", False))
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = out_dir / ckpt.CHECKPOINT
    saved = None
    if resume:
        saved = ckpt.load(ckpt_path)  # verified, side files included
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
        rd.commit()
        ckpt.set_rng_state(saved["rng"])
        log.info("resuming %s at example %d of %d", ckpt_path, state.steps, len(stream))
    else:
        learner = make_learner(cfg, int(train.shape[1]), stream.num_classes)
        rd.commit()  # every check passed: from here on the run writes into its directory
        try:
            learner.set_workdir(out_dir)
            evaluate = test is not None and len(stream.tests) > 0
            state = RunState(Tracker(len(stream), stream.tasks, path=str(steps_path)),
                             np.zeros((stream.n_tasks, stream.n_tasks)) if evaluate else None,
                             near_future=make_near_future(cfg))
        except StorageError as e:
            raise StorageError(f"{e} No checkpoint had been written yet: fix the cause, then start the run again.",
                               e.disk_full) from e
    checkpointer = ckpt.Checkpointer(ckpt_path, cfg.get("checkpoint_every"), learner, config, digest,
                                     _resume_hint(out_dir), resumed_at=None if saved is None else state.steps)
    checkpointer.total = len(stream)
    log.info("stream %s/%s: %d examples, %d classes, %d tasks, D=%d, chunk %d",
             source.name, stream.name, len(stream), stream.num_classes, stream.n_tasks,
             train.shape[1], cfg.chunk_size)
    try:
        with learning_threads(cfg.get("threads")) as n_threads, checkpointer.catch_signals():
            # after extraction, which wants every core
            result = run_stream(learner, train, stream, int(cfg.chunk_size), test, progress=bool(cfg.progress),
                                on_chunk=checkpointer, state=state)
            checkpointer.save(result.state)  # the end: resume=true on a finished run just rewrites the results
        res = summarize(result, stream, int(cfg.curve_window))
        skipped = learner.skipped_updates
        if skipped:
            log.warning("%d updates were skipped because their loss (or gradient) was not finite", skipped)
        info = extractor.info
        res.update({
            "learner": learner.name,
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
    except StorageError as e:  # disk full, permission: say what survived and how to continue
        raise StorageError(f"{e} {checkpointer.recovery()}", e.disk_full) from e
    result.tracker.close()
    return res
