"""The prequential runner: stream -> features -> learner -> metrics.

For every chunk of C examples, strictly in this order::

    logp = learner.predict(x)     # labels of this chunk not yet revealed
    tracker.record(logp, y)       # scored before any update
    learner.update(x, y)          # now the learner may learn from them

At each task boundary (and at the end) the learner is evaluated on every task's
held-out test set, filling the accuracy matrix ``acc[after task i, on task j]``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.metrics import Tracker
from ocl.streams.protocols import Stream

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What one prequential pass produced.

    Attributes:
        tracker: per-step records (loss, prediction, label, task).
        acc: ``(T, T)`` accuracy matrix, or ``None`` without test data.
        learn_seconds: wall time spent in predict + record + update.
        eval_seconds: wall time spent on held-out evaluation at task boundaries.
    """

    tracker: Tracker
    acc: np.ndarray | None
    learn_seconds: float
    eval_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _chunks(n: int, chunk_size: int, boundaries: np.ndarray) -> list[tuple[int, int]]:
    """Chunk boundaries ``[(start, end), ...]`` of at most ``chunk_size`` steps that never
    straddle a task boundary (so every task starts a fresh chunk)."""
    cuts = sorted(set([0, n, *boundaries.tolist()]))
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        out.extend((s, min(s + chunk_size, b)) for s in range(a, b, chunk_size))
    return out


@torch.no_grad()
def evaluate_tasks(
    learner: Learner, test_feats: np.ndarray, stream: Stream, batch_size: int = 1024
) -> np.ndarray:
    """Accuracy of ``learner.evaluate`` on each task's held-out test set, ``(T,)``."""
    accs = []
    for tt in stream.tests:
        correct = 0
        for s in range(0, tt.index.size, batch_size):
            x = torch.from_numpy(np.asarray(test_feats[tt.index[s : s + batch_size]]))
            pred = learner.evaluate(x).argmax(1).numpy()
            correct += int((pred == tt.labels[s : s + batch_size]).sum())
        accs.append(correct / max(tt.index.size, 1))
    return np.asarray(accs)


def run_stream(
    learner: Learner,
    feats: np.ndarray,
    stream: Stream,
    chunk_size: int = 1,
    test_feats: np.ndarray | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> RunResult:
    """Run ``learner`` prequentially over ``stream``.

    Args:
        learner: the online learner.
        feats: ``(n_train, D)`` features of ``source.train`` (indexed by ``stream.order``).
        stream: the protocol's stream.
        chunk_size: C, examples per predict/update step.
        test_feats: ``(n_test, D)`` features of ``source.test`` for boundary evaluation.
        progress: show a progress bar.
        on_chunk: optional callback with the number of steps done (for checkpoints, tests).
    """
    if chunk_size < 1:
        raise OCLError(f"chunk_size must be >= 1; got {chunk_size}.")
    n = len(stream)
    tracker = Tracker(n, stream.tasks)
    evaluate = test_feats is not None and len(stream.tests) > 0
    acc = np.zeros((stream.n_tasks, stream.n_tasks)) if evaluate else None
    boundaries = stream.boundaries()
    learn_s = eval_s = 0.0
    task = 0
    bar = tqdm(total=n, desc=f"{getattr(learner, 'name', 'learner')}", unit="ex", disable=not progress,
               mininterval=0.5, leave=False)
    for start, end in _chunks(n, chunk_size, boundaries):
        new_task = int(stream.tasks[start])
        if new_task != task:
            if acc is not None:
                t0 = time.perf_counter()
                acc[task] = evaluate_tasks(learner, test_feats, stream)
                eval_s += time.perf_counter() - t0
            learner.on_task_boundary(new_task)
            task = new_task
        t0 = time.perf_counter()
        x = torch.from_numpy(np.asarray(feats[stream.order[start:end]], dtype=np.float32))
        y = torch.from_numpy(stream.labels[start:end])
        logp = learner.predict(x)
        tracker.record(logp, y)
        learner.update(x, y)
        learn_s += time.perf_counter() - t0
        bar.update(end - start)
        if on_chunk is not None:
            on_chunk(end)
    bar.close()
    if acc is not None:
        t0 = time.perf_counter()
        acc[task] = evaluate_tasks(learner, test_feats, stream)
        eval_s += time.perf_counter() - t0
    return RunResult(tracker, acc, learn_s, eval_s)
