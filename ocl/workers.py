"""Parallel ``ocl compare``: learner x seed runs in worker processes (``workers=N``).

Every run is independent (its own learner, its own seeded protocol), so a comparison is
embarrassingly parallel. The parent extracts the features once, as in a serial compare;
the workers map the same ``.npy`` files read-only (the feature cache when there is one,
else a temporary copy in the run directory), so N workers share one copy of the features
in the page cache instead of holding N.

Workers are *spawned*, not forked: torch's OpenMP thread pools do not survive ``fork``.
Each worker gets the source with its labels only (:class:`ocl.streams.base.LabelSet`): the
protocol needs labels to build the stream, never images, and shipping decoded images to
every worker would cost gigabytes. A worker runs :func:`ocl.jobs.run_guarded`, the very
function the serial path runs, so a record does not depend on ``workers`` (tests check this).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

from omegaconf import DictConfig
from tqdm import tqdm

from ocl.build import Features
from ocl.errors import OCLError
from ocl.jobs import Shipment, failed_record, remove_work_dirs, run_shipped, shared_features

log = logging.getLogger(__name__)


#: Rough cost per example of the shipped learners, relative to ``linear`` (examples/s on the
#: full-size CIFAR-10 split of pretrained features, D=1280, one thread: scripts/results/benchmark/,
#: with the transformer's and SLDA's current defaults: 72 and 417 ex/s against linear's ~2,900;
#: ranpac and randumb from their speed next to SLDA's in scripts/bench_speed.py, 0.33x and 0.39x;
#: the pools: roughly the sum of their experts).
#: Only the order matters: the slowest runs start first, so that a slow run is not left to
#: run alone at the end while the other workers sit idle. Other learners count as 1.
RELATIVE_COST: dict[str, float] = {
    "pooled": 48, "transformer": 40, "ranpac": 21, "randumb": 18, "knn": 17, "readout_pool": 9,
    "avalanche_gdumb": 7.8, "slda": 6.9,
    "avalanche_er_ace": 3.5, "mlp": 3.4, "avalanche_replay": 2.7, "er": 1.4, "avalanche_naive": 1.2, "linear": 1.0, "ncm": 0.35, "recent": 0.15,
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


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Exit (status 1, no cleanup) once the parent process is gone. A worker whose parent was
    killed (SIGKILL, SIGTERM, a crash) would otherwise run its current job to the end (a
    transformer run on 50,000 examples: an hour) with nobody to take its record."""
    while True:
        time.sleep(every)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(level: int, parent: int | None = None) -> None:
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
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


def run_parallel(cfg: DictConfig, feats: Features, learners: dict[str, DictConfig], jobs: Sequence[tuple[str, int]],
                 out_dir: Path, workers: int) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` (learner, seed) in ``workers`` spawned processes, the slowest learners first
    (:func:`slowest_first`); yield each record as it finishes (completion order).

    A worker that dies (killed for memory, a segfault) breaks the whole pool, and with it
    every run in flight; we cannot tell from outside which run killed it. So the runs that
    had started are rerun one at a time (where a death names its run exactly: that run
    fails, with the reason), then the runs that had not started go on in a fresh pool.

    Args:
        cfg: the composed compare config (sent to the workers resolved, as plain data).
        feats: the :class:`ocl.build.Features` extracted by the parent.
        learners: each learner's config node, by name.
        jobs: ``(learner name, seed)`` pairs.
        out_dir: the run directory (scratch files go here and are removed after).
        workers: processes at once (capped at ``len(jobs)``).
    """
    level = logging.getLogger("ocl").getEffectiveLevel()
    with shared_features(cfg, feats, learners, out_dir) as ship:
        yield from _run(ship, level, slowest_first(jobs), workers)


def _run(ship: Shipment, level: int, jobs: list[tuple[str, int]], workers: int) -> Iterator[dict[str, Any]]:
    while jobs:
        unstarted, started = yield from _pool(ship, level, jobs, workers)
        if started and not unstarted and len(started) == len(jobs) == 1:
            name, seed = started[0]  # alone in its pool: this run killed its worker
            log.error("%s (seed %d): its worker process died (killed for memory?)", name, seed)
            yield failed_record(name, seed, "its worker process died during the run (killed for memory? "
                                            "a crash in native code?); rerun it with workers=1 to see more")
        elif started:
            log.warning("a worker process died; rerunning the runs that were under way one at a time, "
                        "to find the one that killed it: %s", ", ".join(f"{n} seed {s}" for n, s in started))
            for job in started:  # one pool each: a death then names its run
                yield from _run(ship, level, [job], 1)
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


def _pool(ship: Shipment, level: int, jobs: list[tuple[str, int]], workers: int
          ) -> Generator[dict[str, Any], None, tuple[list[tuple[str, int]], list[tuple[str, int]]]]:
    """One process pool over ``jobs``, yielding records. Returns ``(unstarted, started)``: the
    runs lost when the pool broke, split by whether they had begun (both empty if it did not)."""
    ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(level, os.getpid()))
    markers = {job: ship.scratch / f"started-{uuid.uuid4().hex}" for job in jobs}
    futures: dict[Future, tuple[str, int]] = {
        ex.submit(run_shipped, ship.plain, ship.source, ship.train, ship.test, n, s, ship.learners[n],
                  str(ship.out_dir), ship.tensorboard, str(markers[(n, s)])): (n, s) for n, s in jobs}
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
        remove_work_dirs(ship.out_dir, name, seed)
    return [job for job in jobs if job in broken and job not in started], started

