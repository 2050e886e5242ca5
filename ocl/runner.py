"""The prequential runner: stream -> features -> learner -> metrics.

For every chunk of C examples, strictly in this order::

    logp = learner.predict(x)     # labels of this chunk not yet revealed
    tracker.record(logp, y)       # scored before any update
    learner.update(x, y)          # now the learner may learn from them
    # every m steps (near-future accuracy, optional): the learner as it stands now scores
    # the input of step end + S, which it has not seen, through learner.evaluate (no state change)

At each task boundary (and at the end) the learner is evaluated on every task's
held-out test set, filling the accuracy matrix ``acc[after task i, on task j]``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.sidefile import pread_records
from ocl.streams.protocols import Stream
from ocl.tracker import NearFutureTracker, Tracker

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Where a prequential pass stands: everything besides the learner that a checkpoint
    must restore to continue exactly.

    Attributes:
        tracker: per-step records so far (``tracker.t`` is the stream position).
        acc: ``(T, T)`` accuracy matrix, rows filled up to the current task, or ``None``.
        task: the task of the last chunk processed.
        learn_seconds, eval_seconds: wall time so far.
        done: the final evaluation has run.
        near_future: near-future evaluations so far, or ``None`` when they are off.
        near_future_seconds: wall time spent on them.
    """

    tracker: Tracker
    acc: np.ndarray | None
    task: int = 0
    learn_seconds: float = 0.0
    eval_seconds: float = 0.0
    done: bool = False
    near_future: NearFutureTracker | None = None
    near_future_seconds: float = 0.0

    @property
    def steps(self) -> int:
        return self.tracker.t

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "acc": None if self.acc is None else self.acc.copy(),
                "task": self.task, "learn_seconds": self.learn_seconds, "eval_seconds": self.eval_seconds,
                "done": self.done, "near_future": None if self.near_future is None else self.near_future.state_dict(),
                "near_future_seconds": self.near_future_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore into this state (its tracker must be built for the same stream, its
        near-future tracker, if any, with the same S and m)."""
        if (self.near_future is None) != (state["near_future"] is None):
            raise ValueError("the checkpoint was made with near-future evaluation "
                             f"{'on' if state['near_future'] is not None else 'off'}, this run has it "
                             f"{'on' if self.near_future is not None else 'off'}")
        self.tracker.load_state_dict(state["tracker"])
        if self.near_future is not None:
            self.near_future.load_state_dict(state["near_future"])
        self.acc = None if state["acc"] is None else np.array(state["acc"])
        self.task, self.done = int(state["task"]), bool(state["done"])
        self.learn_seconds, self.eval_seconds = float(state["learn_seconds"]), float(state["eval_seconds"])
        self.near_future_seconds = float(state["near_future_seconds"])


@dataclass
class RunResult:
    """What one prequential pass produced.

    Attributes:
        tracker: per-step records (loss, prediction, label, task).
        acc: ``(T, T)`` accuracy matrix, or ``None`` without test data.
        learn_seconds: wall time spent in predict + record + update.
        eval_seconds: wall time spent on held-out evaluation at task boundaries.
        state: the final :class:`RunState` (what the end-of-run checkpoint stores).
        near_future: the near-future evaluations, or ``None`` when they were off.
        near_future_seconds: wall time spent on them (in neither of the two above).
    """

    tracker: Tracker
    acc: np.ndarray | None
    learn_seconds: float
    eval_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    state: RunState | None = None
    near_future: NearFutureTracker | None = None
    near_future_seconds: float = 0.0


def iter_chunks(n: int, chunk_size: int, boundaries: np.ndarray, start: int = 0) -> Iterator[tuple[int, int]]:
    """Chunks ``(start, end)`` of at most ``chunk_size`` steps that never straddle a task
    boundary (so every task starts a fresh chunk), from step ``start`` (a chunk start) on.
    A generator: a million-step stream must not become a million tuples."""
    cuts = sorted(set([0, n, *boundaries.tolist()]))
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b <= start:
            continue
        first = a if start <= a else start
        if (first - a) % chunk_size:
            raise ValueError(f"step {start} is not the start of a chunk of {chunk_size}")
        for s in range(first, b, chunk_size):
            yield s, min(s + chunk_size, b)


class _RowReader:
    """Reads feature rows ``feats[idx]`` as ``(len(idx), D)`` float32.

    A memory-mapped ``.npy`` (the feature cache) is read with ``pread``
    (:func:`~ocl.sidefile.pread_records`), never through the mapping, so that a random-order
    pass does not make the whole file (256 MB per million 64-d rows) resident in the process.
    Anything else is simply indexed.
    """

    def __init__(self, feats: np.ndarray) -> None:
        self.feats, self.fd = feats, None
        if (isinstance(feats, np.memmap) and feats.filename is not None and feats.ndim == 2
                and feats.flags.c_contiguous):
            self.fd = os.open(feats.filename, os.O_RDONLY)
            self.row = np.dtype((feats.dtype, (feats.shape[1],)))  # one row, (D,)
            self.offset = int(feats.offset)

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        if self.fd is None:
            return np.asarray(self.feats[idx], dtype=np.float32)
        return pread_records(self.fd, self.row, self.offset, idx, 1)[:, 0].astype(np.float32)  # (C, D), a copy

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@torch.no_grad()
def evaluate_tasks(
    learner: Learner, test_feats: np.ndarray, stream: Stream, batch_size: int = 1024
) -> np.ndarray:
    """Accuracy of ``learner.evaluate`` on each task's held-out test set, ``(T,)``.

    Tasks that share their test images (a label-permuted stream: every task is the whole test
    split under another label mapping) are predicted once and scored against each task's labels:
    ``evaluate`` changes nothing (the learner contract), so this is exact, and it makes an
    evaluation of T such tasks T times cheaper (50 tasks on the full CIFAR-10 permuted stream).
    """
    accs = []
    predicted: dict[bytes, np.ndarray] = {}  # test indices -> predicted classes
    for tt in stream.tests:
        key = tt.index.tobytes()
        if key not in predicted:
            preds = []
            for s in range(0, tt.index.size, batch_size):
                x = torch.from_numpy(np.asarray(test_feats[tt.index[s : s + batch_size]], dtype=np.float32))
                preds.append(learner.evaluate(x).argmax(1).numpy())
            predicted[key] = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        accs.append(int((predicted[key] == tt.labels).sum()) / max(tt.index.size, 1))
    return np.asarray(accs)


def run_stream(
    learner: Learner,
    feats: np.ndarray,
    stream: Stream,
    chunk_size: int = 1,
    test_feats: np.ndarray | None = None,
    progress: bool = True,
    on_chunk: Callable[[RunState], None] | None = None,
    state: RunState | None = None,
    tracker: Tracker | None = None,
    near_future: NearFutureTracker | None = None,
) -> RunResult:
    """Run ``learner`` prequentially over ``stream``.

    Args:
        learner: the online learner.
        feats: ``(n_train, D)`` features of ``source.train`` (indexed by ``stream.order``).
        stream: the protocol's stream.
        chunk_size: C, examples per predict/update step.
        test_feats: ``(n_test, D)`` features of ``source.test`` for boundary evaluation.
        progress: show a progress bar.
        on_chunk: called with the :class:`RunState` after every chunk (checkpoints, tests);
            it may raise to stop the run.
        state: continue from this state (a resumed run; the learner must be the one that
            produced it) instead of from the start.
        tracker: where to record a fresh run (default: an in-memory :class:`Tracker`).
        near_future: evaluate near-future accuracy in a fresh run with these S and m
            (``None``: off). A resumed run continues what ``state`` holds.
    """
    if chunk_size < 1:
        raise OCLError(f"chunk_size must be >= 1; got {chunk_size}.")
    n = len(stream)
    evaluate = test_feats is not None and len(stream.tests) > 0
    if state is None:
        state = RunState(tracker if tracker is not None else Tracker(n, stream.tasks),
                         np.zeros((stream.n_tasks, stream.n_tasks)) if evaluate else None,
                         near_future=near_future)
    acc, nf = state.acc, state.near_future
    rows = _RowReader(feats)
    bar = tqdm(total=n, initial=state.steps, desc=learner.name, unit="ex",
               disable=not progress, mininterval=0.5, leave=False)
    try:
        for start, end in iter_chunks(n, chunk_size, stream.boundaries(), state.steps):
            new_task = int(stream.tasks[start])
            if new_task != state.task:
                if acc is not None:
                    t0 = time.perf_counter()
                    acc[state.task] = evaluate_tasks(learner, test_feats, stream)
                    state.eval_seconds += time.perf_counter() - t0
                learner.on_task_boundary(new_task)
                state.task = new_task
            # read before the clock starts: with features extracted ahead of the learner
            # (ocl.streams.prefetch) this may wait for them, which is not learning time
            x = torch.from_numpy(rows(stream.order[start:end]))  # (C, D)
            t0 = time.perf_counter()
            y = torch.from_numpy(stream.labels[start:end])
            logp = learner.predict(x)
            state.tracker.record(logp, y)
            learner.update(x, y)
            state.learn_seconds += time.perf_counter() - t0
            j = None if nf is None else nf.target(start, end, n)
            if j is not None:  # after the update: the learner as it stands after step end - 1
                xj = torch.from_numpy(rows(stream.order[j : j + 1]))  # (1, D), never seen by the learner
                t0 = time.perf_counter()
                with torch.no_grad():
                    logp_j = learner.evaluate(xj)  # (1, K)
                nf.record(end - 1, j, logp_j, torch.from_numpy(stream.labels[j : j + 1]))
                state.near_future_seconds += time.perf_counter() - t0
            bar.update(end - start)
            if on_chunk is not None:
                on_chunk(state)
    finally:  # also when on_chunk stops the run (Ctrl-C, a crash test)
        bar.close()
        rows.close()
    if acc is not None and not state.done:
        t0 = time.perf_counter()
        acc[state.task] = evaluate_tasks(learner, test_feats, stream)
        state.eval_seconds += time.perf_counter() - t0
    state.done = True
    return RunResult(state.tracker, acc, state.learn_seconds, state.eval_seconds, state=state,
                     near_future=nf, near_future_seconds=state.near_future_seconds)
