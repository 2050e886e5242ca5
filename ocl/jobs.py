"""One job of ``ocl compare``: one learner, one seed, over features extracted once.

:func:`run_guarded` is what every engine runs, the serial loop of :mod:`ocl.compare`, the
worker processes of :mod:`ocl.workers` and the Ray tasks of :mod:`ocl.ray_engine`, so a
record does not depend on where it was computed. Another process gets the job as plain
data (:func:`shared_features`: the resolved config, the labels-only source, the paths of the
feature files) and runs it with :func:`run_shipped`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ocl.build import Features, learning_threads, make_learner, make_stream, seed_everything
from ocl.errors import OCLError
from ocl.options import make_near_future
from ocl.rundir import scratch_dir
from ocl.run import summarize
from ocl.runner import run_stream
from ocl.streams.base import Source, labels_only

log = logging.getLogger(__name__)

#: Scalar metrics of every record (``None`` when a run failed or the metric is undefined,
#: e.g. forgetting without test data).
METRICS: tuple[str, ...] = (
    "avg_online_accuracy", "near_future_accuracy", "near_future_mean_log_loss", "near_future_evaluations",
    "cumulative_log_loss", "mean_log_loss", "final_avg_accuracy",
    "avg_anytime_accuracy", "forgetting", "backward_transfer", "examples_per_second", "n_examples",
    "learn_seconds", "eval_seconds",
)


def tensorboard_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or an :class:`OCLError` saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch ships the writer, but it needs the `tensorboard` package
        raise OCLError("tensorboard=true needs the `tensorboard` package: pip install tensorboard "
                       "(or pip install 'ocl[tensorboard]'), or run with tensorboard=false.") from e
    return SummaryWriter


def _finite(v: Any) -> float | int | None:
    if v is None:
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    f = float(v)
    return f if math.isfinite(f) else None


def run_one(cfg: DictConfig, feats: Features, name: str, seed: int, learner_node: DictConfig, out_dir: Path,
            writer_class: Any = None) -> dict[str, Any]:
    """One learner (``learner_node``, e.g. :func:`ocl.build.learner_config` of ``name``), one seed,
    over the shared features. Returns the record for ``compare.json``.

    Raises whatever the learner raises; :func:`run_guarded` turns that into a failed record.
    """
    seed_everything(seed)
    stream = make_stream(cfg, feats.source, seed)
    learner = make_learner(learner_node, int(feats.train.shape[1]), stream.num_classes, seed)
    test = feats.test if feats.test is not None and len(stream.tests) > 0 else None
    # A learner may keep scratch state on disk (the transformer's replay history): give it a
    # private directory that is removed after the run.
    work = scratch_dir(out_dir, f"work-{name}-seed{seed}")
    try:
        learner.set_workdir(work)
        with learning_threads(cfg.get("threads")):
            result = run_stream(learner, feats.train, stream, int(cfg.chunk_size), test,
                                progress=bool(cfg.get("progress", True)), near_future=make_near_future(cfg))
        res = summarize(result, stream, int(cfg.curve_window))
        res["skipped_updates"] = learner.skipped_updates
        result.tracker.close()
    finally:
        del learner
        shutil.rmtree(work, ignore_errors=True)
    record: dict[str, Any] = {"learner": name, "seed": seed, "status": "ok", "error": None}
    record.update({m: _finite(res.get(m)) for m in METRICS})
    record.update({
        "skipped_updates": res.get("skipped_updates"),
        "nonfinite_predictions": res.get("nonfinite_predictions"),
        "near_future_offset": res["near_future_offset"],
        "near_future_every": res["near_future_every"],
        "n_tasks": stream.n_tasks,
        "num_classes": stream.num_classes,
        "task_boundaries": np.asarray(res["task_boundaries"]).tolist(),
        "online_accuracy_curve": {k: np.asarray(v).tolist() if k != "window" else v
                                  for k, v in res["online_accuracy_curve"].items()},
        "accuracy_matrix": None if res.get("accuracy_matrix") is None else np.asarray(res["accuracy_matrix"]).tolist(),
        "learner_config": OmegaConf.to_container(learner_node, resolve=True),
    })
    if writer_class is not None:
        _write_tensorboard(writer_class, out_dir / "tensorboard" / name / f"seed{seed}", record)
    return record


def _write_tensorboard(writer_class: Any, log_dir: Path, record: dict[str, Any]) -> None:
    """Online accuracy curve, accuracy-matrix rows and the summary metrics of one run."""
    w = writer_class(log_dir=str(log_dir))
    try:
        curve = record["online_accuracy_curve"]
        for step, acc in zip(curve["step"], curve["accuracy"]):
            w.add_scalar("online_accuracy", acc, int(step) + 1)
        acc = record.get("accuracy_matrix")
        if acc is not None:
            for i, row in enumerate(acc):
                w.add_scalars("accuracy_after_task", {f"task{j}": v for j, v in enumerate(row[: i + 1])}, i)
        for m in METRICS:
            if record.get(m) is not None:
                w.add_scalar(f"summary/{m}", record[m], int(record["n_examples"] or 0))
    finally:
        w.close()


def run_guarded(cfg: DictConfig, feats: Features, name: str, seed: int, learner_node: DictConfig, out_dir: Path,
                writer_class: Any = None) -> dict[str, Any]:
    """:func:`run_one`, with a failure turned into a ``failed`` record (a learner bug must not
    cost the other learners' results) and ``wall_seconds`` added. Every engine runs this."""
    t0 = time.perf_counter()
    try:
        rec = run_one(cfg, feats, name, seed, learner_node, out_dir, writer_class)
    except OCLError as e:
        log.error("%s (seed %d) failed: %s", name, seed, e)
        rec = failed_record(name, seed, str(e))
    except Exception as e:
        log.error("%s (seed %d) crashed:\n%s", name, seed, traceback.format_exc())
        rec = failed_record(name, seed, f"{type(e).__name__}: {e}")
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec


def failed_record(name: str, seed: int, error: str) -> dict[str, Any]:
    """The record of a run that did not finish: every metric ``None``."""
    rec: dict[str, Any] = {"learner": name, "seed": seed, "status": "failed", "error": error}
    rec.update({m: None for m in METRICS})
    return rec


# ---------------------------------------------------------------- a job in another process


@dataclass
class Shipment:
    """What every job of a comparison needs in another process, as plain data and files.

    Attributes:
        plain: the resolved compare config (bars off).
        learners: each learner's resolved config node, by name.
        source: the source with its labels only.
        train, test: paths of the ``.npy`` feature files (``test`` may be ``None``).
        out_dir: the run directory; scratch: a scratch folder in it (removed after).
        tensorboard: whether jobs write TensorBoard event files.
    """

    plain: dict[str, Any]
    learners: dict[str, Any]
    source: Source
    train: str
    test: str | None
    out_dir: Path
    scratch: Path
    tensorboard: bool


def _npy_path(arr: np.ndarray, fallback: Path) -> Path:
    """A ``.npy`` file holding exactly ``arr``: the file a cached memmap came from, else a copy."""
    name = getattr(arr, "filename", None)
    if isinstance(arr, np.memmap) and name:
        try:  # a cache hit is np.load(..., mmap_mode="r") of the whole file; make sure it is
            again = np.load(name, mmap_mode="r")
            if again.shape == arr.shape and again.dtype == arr.dtype:
                return Path(name)
        except (OSError, ValueError):
            pass
    np.save(fallback, np.ascontiguousarray(arr))
    return fallback


@contextlib.contextmanager
def shared_features(cfg: DictConfig, feats: Features, learners: dict[str, DictConfig],
                    out_dir: Path) -> Iterator[Shipment]:
    """The :class:`Shipment` of a comparison: the feature ``.npy`` files are the cache's, else
    copies in a scratch folder of ``out_dir``, removed on exit, so that N processes map one copy
    of the features read-only instead of holding N. Both engines use it (``workers=N`` in
    :mod:`ocl.workers`, ``engine=ray`` in :mod:`ocl.ray_engine`)."""
    scratch = scratch_dir(out_dir, "workers")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        plain["progress"] = False  # one bar, the parent's; workers' bars would interleave
        yield Shipment(plain, {n: OmegaConf.to_container(node, resolve=True) for n, node in learners.items()},
                       labels_only(feats.source), str(_npy_path(feats.train, scratch / "train.npy")),
                       None if feats.test is None else str(_npy_path(feats.test, scratch / "test.npy")),
                       out_dir, scratch, bool(cfg.get("tensorboard", False)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_shipped(cfg: dict[str, Any], source: Source, train: str, test: str | None, name: str, seed: int,
                learner: dict[str, Any], out_dir: str, tensorboard: bool, marker: str) -> dict[str, Any]:
    """One job in another process (the fields of a :class:`Shipment`): map the features, then
    exactly what the serial path does. ``marker`` exists while the run is under way, so that
    the parent can tell, after a worker died, which runs had started."""
    Path(marker).touch()
    try:
        feats = Features(source, None, np.load(train, mmap_mode="r"),
                         None if test is None else np.load(test, mmap_mode="r"), 0.0)
        writer_class = tensorboard_writer_class() if tensorboard else None
        return run_guarded(OmegaConf.create(cfg), feats, name, seed, OmegaConf.create(learner), Path(out_dir),
                           writer_class)
    finally:
        Path(marker).unlink(missing_ok=True)


def remove_work_dirs(out_dir: Path, name: str, seed: int) -> None:
    """Remove the scratch directories a run whose process died left in ``out_dir``
    (:func:`run_one` removes them itself when it gets to)."""
    for p in Path(out_dir).glob(f".work-{name}-seed{seed}-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
