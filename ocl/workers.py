"""Parallel ``ocl compare``: learner x seed runs in worker processes (``workers=N``).

Every run is independent (its own learner, its own seeded protocol), so a comparison is
embarrassingly parallel. The parent extracts the features once, as in a serial compare;
the workers map the same ``.npy`` files read-only (the feature cache when there is one,
else a temporary copy in the run directory), so N workers share one copy of the features
in the page cache instead of holding N.

Workers are *spawned*, not forked: torch's OpenMP thread pools do not survive ``fork``.
Each worker gets the source with its labels only (:class:`LabelSet`): the protocol needs
labels to build the stream, never images, and shipping decoded images to every worker
would cost gigabytes. A worker runs :func:`ocl.compare.run_guarded`, the very function the
serial path runs, so a record does not depend on ``workers`` (tests check this).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import shutil
import signal
import sys
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ocl.errors import OCLError
from ocl.rundir import scratch_dir
from ocl.streams.base import ImageSet, Source

log = logging.getLogger(__name__)


class LabelSet(ImageSet):
    """The labels of an :class:`ImageSet` without its images (what a compare worker needs).

    Args:
        labels: ``(n,)`` int64 labels.
        fingerprint: the fingerprint of the image set these labels came from.
    """

    def __init__(self, labels: np.ndarray, fingerprint: str) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self._fp = fingerprint

    def get(self, idx: np.ndarray) -> np.ndarray:
        raise OCLError("a compare worker holds labels only (features were extracted by the parent); "
                       "a protocol that reads images cannot run with workers > 1: use workers=1.")

    def fingerprint(self) -> str:
        return self._fp


def labels_only(source: Source) -> Source:
    """A copy of ``source`` whose splits carry labels only (cheap to send to a worker)."""
    test = None if source.test is None else LabelSet(source.test.labels, source.test.fingerprint())
    return Source(source.name, LabelSet(source.train.labels, source.train.fingerprint()), test,
                  list(source.classes))


#: Rough cost per example of the shipped learners, relative to ``linear`` (examples/s of the
#: full CIFAR-10 comparison in scripts/results/compare/cifar50k_table.txt: one thread, D=3072).
#: Only the order matters: the slowest runs start first, so that a slow run is not left to
#: run alone at the end while the other workers sit idle. Other learners count as 1.
RELATIVE_COST: dict[str, float] = {
    "transformer": 13, "slda": 10, "knn": 8, "avalanche_gdumb": 6.6, "mlp": 4.5, "avalanche_er_ace": 2.6,
    "avalanche_replay": 2.4, "avalanche_naive": 1.2, "er": 1.1, "linear": 1.0, "ncm": 0.4, "recent": 0.2,
}


def slowest_first(jobs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """``(learner, seed)`` jobs in the order to start them: by :data:`RELATIVE_COST`, highest
    first (longest-processing-time-first scheduling); ties keep their order."""
    return sorted(jobs, key=lambda job: -RELATIVE_COST.get(job[0], 1.0))


def check_workers(value: Any) -> int:
    """``workers=`` as an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OCLError(f"workers={value!r}: must be an integer >= 1 (the number of runs at once; "
                       "1 runs them one after another in this process).")
    return value


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


def _init_worker(level: int) -> None:
    # A spawned worker starts without the parent's logging setup (hydra's); log to stderr as
    # the CLI does, tagged with the worker's pid.
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - [worker %(process)d] %(message)s")
    # Ctrl-C in a terminal reaches the whole process group. The parent alone handles it (it
    # terminates the workers, see _pool); a worker that also raised KeyboardInterrupt would
    # print its own traceback into the user's terminal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default write lock is a multiprocessing semaphore; a worker terminated on Ctrl-C
    # never unregisters it, and the resource tracker then warns of "leaked semaphore objects".
    # A worker's bars are off (the parent draws the only one): a thread lock does.
    tqdm.set_lock(threading.RLock())


def _job(cfg: dict[str, Any], source: Source, train: str, test: str | None, name: str, seed: int,
         out_dir: str, tensorboard: bool, marker: str) -> dict[str, Any]:
    """One run inside a worker: map the features, then exactly what the serial path does.
    ``marker`` exists while the run is under way, so that the parent can tell, after a worker
    died, which runs had started."""
    Path(marker).touch()
    try:
        from ocl import compare  # here, not at import: ocl.compare imports this module

        feats = compare.Features(source, None, np.load(train, mmap_mode="r"),  # type: ignore[arg-type]
                                 None if test is None else np.load(test, mmap_mode="r"), 0.0)
        writer_class = compare._tensorboard_writer_class() if tensorboard else None
        return compare.run_guarded(OmegaConf.create(cfg), feats, name, seed, Path(out_dir), writer_class)
    finally:
        Path(marker).unlink(missing_ok=True)


class _Pool:
    """What every pool of one comparison shares: the config, sources and feature files."""

    def __init__(self, plain: dict[str, Any], source: Source, train: str, test: str | None, out_dir: Path,
                 scratch: Path, tensorboard: bool) -> None:
        self.plain, self.source, self.train, self.test = plain, source, train, test
        self.out_dir, self.scratch, self.tensorboard = out_dir, scratch, tensorboard
        self.level = logging.getLogger("ocl").getEffectiveLevel()


def run_parallel(cfg: DictConfig, feats: Any, jobs: Sequence[tuple[str, int]], out_dir: Path,
                 workers: int) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` (learner, seed) in ``workers`` spawned processes, the slowest learners first
    (:func:`slowest_first`); yield each record as it finishes (completion order).

    A worker that dies (killed for memory, a segfault) breaks the whole pool, and with it
    every run in flight; we cannot tell from outside which run killed it. So the runs that
    had started are rerun one at a time (where a death names its run exactly: that run
    fails, with the reason), then the runs that had not started go on in a fresh pool.

    Args:
        cfg: the composed compare config (sent to the workers resolved, as plain data).
        feats: the :class:`ocl.compare.Features` extracted by the parent.
        jobs: ``(learner name, seed)`` pairs.
        out_dir: the run directory (scratch files go here and are removed after).
        workers: processes at once (capped at ``len(jobs)``).
    """
    with shared_features(cfg, feats, out_dir) as ctx:
        yield from _run(ctx, slowest_first(jobs), workers)


@contextlib.contextmanager
def shared_features(cfg: DictConfig, feats: Any, out_dir: Path) -> Iterator[_Pool]:
    """What every worker of a comparison needs, as files and plain data: the resolved config
    (bars off), the labels-only source and the paths of the feature ``.npy`` files (the cache's,
    else copies in a scratch folder of ``out_dir``, removed on exit). Both engines use it
    (``workers=N`` here, ``engine=ray`` in :mod:`ocl.ray_engine`)."""
    scratch = scratch_dir(out_dir, "workers")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        plain["progress"] = False  # one bar, the parent's; workers' bars would interleave
        yield _Pool(plain, labels_only(feats.source), str(_npy_path(feats.train, scratch / "train.npy")),
                    None if feats.test is None else str(_npy_path(feats.test, scratch / "test.npy")),
                    out_dir, scratch, bool(cfg.get("tensorboard", False)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(ctx: _Pool, jobs: list[tuple[str, int]], workers: int) -> Iterator[dict[str, Any]]:
    from ocl.compare import failed_record

    while jobs:
        unstarted, started = yield from _pool(ctx, jobs, workers)
        if started and not unstarted and len(started) == len(jobs) == 1:
            name, seed = started[0]  # alone in its pool: this run killed its worker
            log.error("%s (seed %d): its worker process died (killed for memory?)", name, seed)
            yield failed_record(name, seed, "its worker process died during the run (killed for memory? "
                                            "a crash in native code?); rerun it with workers=1 to see more")
        elif started:
            log.warning("a worker process died; rerunning the runs that were under way one at a time, "
                        "to find the one that killed it: %s", ", ".join(f"{n} seed {s}" for n, s in started))
            for job in started:  # one pool each: a death then names its run
                yield from _run(ctx, [job], 1)
        elif unstarted:
            # Broken, yet no run had started: the workers die on start-up and a new pool would
            # too. The classic case: a script without `if __name__ == "__main__":`, which spawn
            # re-imports in every worker.
            why = ("the worker processes died on start-up; a script that calls run_compare with workers > 1 "
                   "must guard its entry point with `if __name__ == \"__main__\":`, or use workers=1")
            log.error("%s", why)
            for name, seed in unstarted:
                yield failed_record(name, seed, why)
            return
        jobs = unstarted if started else []


def _pool(ctx: _Pool, jobs: list[tuple[str, int]], workers: int
          ) -> Generator[dict[str, Any], None, tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
    """One process pool over ``jobs``, yielding records. Returns ``(unstarted, started)``: the
    runs lost when the pool broke, split by whether they had begun (both empty if it did not)."""
    from ocl.compare import failed_record

    ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(ctx.level,))
    markers = {job: ctx.scratch / f"started-{uuid.uuid4().hex}" for job in jobs}
    futures: dict[Future, tuple[str, int]] = {
        ex.submit(_job, ctx.plain, ctx.source, ctx.train, ctx.test, n, s, str(ctx.out_dir), ctx.tensorboard,
                  str(markers[(n, s)])): (n, s) for n, s in jobs}
    pending = set(futures)
    broken: list[tuple[str, int]] = []
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                name, seed = futures[fut]
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    broken.append((name, seed))
                except Exception as e:  # e.g. a record that does not pickle; run_guarded catches the rest
                    log.error("%s (seed %d): worker error: %s", name, seed, e)
                    yield failed_record(name, seed, f"worker error: {type(e).__name__}: {e}")
    except BaseException:
        # Ctrl-C, or the consumer stopped: do not leave workers computing runs nobody will read.
        # (ProcessPoolExecutor has no public way to stop its workers before Python 3.14.)
        procs = list((getattr(ex, "_processes", None) or {}).values())
        for p in procs:
            p.terminate()
        for p in procs:  # reaped: no zombies left to a caller that goes on (a script, a notebook)
            p.join(timeout=5)
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    started = [job for job in jobs if job in broken and markers[job].exists()]
    for name, seed in started:  # the dead run's marker and scratch directory
        markers[(name, seed)].unlink(missing_ok=True)
        remove_work_dirs(ctx.out_dir, name, seed)
    return [job for job in jobs if job in broken and job not in started], started


def remove_work_dirs(out_dir: Path, name: str, seed: int) -> None:
    """Remove the scratch directories a run whose process died left in ``out_dir``
    (:func:`ocl.compare.run_one` removes them itself when it gets to)."""
    for p in Path(out_dir).glob(f".work-{name}-seed{seed}-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
