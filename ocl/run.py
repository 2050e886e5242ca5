"""One run of ``ocl run``: the run directory, resume, checkpoints and the result files.

:func:`run_experiment` builds the run (:func:`ocl.build.prepare`), hands it to the
prequential loop (:func:`ocl.runner.run_stream`) with a checkpointer, and writes
``results.json``, ``steps.csv`` and ``near_future.csv``. Tests and scripts call it with a
plain ``DictConfig`` and an output directory.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ocl import checkpoint as ckpt
from ocl import rundir
from ocl.build import learning_threads, make_learner, prepare, seed_everything, with_learner_defaults
from ocl.errors import OCLError, StorageError
from ocl.metrics import boundary_summary
from ocl.options import check_groups, check_run_config, make_near_future
from ocl.report import write_json_atomic, write_near_future_csv, write_steps_csv
from ocl.runner import RunResult, RunState, run_stream
from ocl.streams.protocols import Stream
from ocl.tracker import Tracker, near_future_summary

log = logging.getLogger(__name__)


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
    cfg = with_learner_defaults(cfg)  # the results and the checkpoint record every option of the learner
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
    run = prepare(cfg)
    with contextlib.closing(run):  # stops the background extraction however the run ends (its shards stay)
        source, stream, train, test = run.source, run.stream, run.train, run.test
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
            learner = make_learner(cfg.learner, int(train.shape[1]), stream.num_classes, int(cfg.seed))
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
                # this thread's setting: a background extraction thread has its own (every core)
                result = run_stream(learner, train, stream, int(cfg.chunk_size), test, progress=bool(cfg.progress),
                                    on_chunk=checkpointer, state=state)
                checkpointer.save(result.state)  # the end: resume=true on a finished run just rewrites the results
            run.close()  # every feature the run reads is extracted: the thread has finished (or assembles the entry)
            res = summarize(result, stream, int(cfg.curve_window))
            skipped = learner.skipped_updates
            if skipped:
                log.warning("%d updates were skipped because their loss (or gradient) was not finite", skipped)
            info = run.extractor.info
            res.update({
                "learner": learner.name,
                "stream": source.name,
                "protocol": stream.name,
                "n_tasks": stream.n_tasks,
                "num_classes": stream.num_classes,
                "feature_dim": int(train.shape[1]),
                "backbone": info,
                "random_backbone": info.get("weights") == "random",
                # building the backbone (and reading the cache), plus the background extraction's wall
                # time when there was one (overlapped with learning, not added to it)
                "feature_seconds": run.seconds + (run.prefetch.seconds if run.prefetch is not None else 0.0),
                "seed": int(cfg.seed),
                "chunk_size": int(cfg.chunk_size),
                "threads": n_threads,
                "skipped_updates": skipped,
                "resumed": resume,
                "torch": torch.__version__,
                "host": platform.node(),
                "config": config,
            })
            if hasattr(learner, "expert_names"):  # a pooled learner: its experts, in pool order
                res["experts"] = list(learner.expert_names)
            if source.label_map is not None:  # sparse label ids renumbered: class i was label label_map[i]
                res["label_map"] = source.label_map
            write_json_atomic(out_dir / "results.json", res)
            write_steps_csv(out_dir / "steps.csv", result.tracker)
            if result.near_future is not None:
                write_near_future_csv(out_dir / "near_future.csv", result.near_future)
        except StorageError as e:  # disk full, permission: say what survived and how to continue
            raise StorageError(f"{e} {checkpointer.recovery()}", e.disk_full) from e
        result.tracker.close()
        return res
