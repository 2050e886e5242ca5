"""Continual-learning metrics as pure functions over recorded arrays, plus the tracker
that records them during a prequential run.

Conventions: losses are natural-log (nats); ``correct`` is a boolean array of
per-step outcomes; ``acc`` is an accuracy matrix with ``acc[i, j]`` = accuracy on
task j's held-out test set after training on tasks 0..i.
"""

from __future__ import annotations

import math

import numpy as np
import torch


# ---------------------------------------------------------------- online (prequential)


def online_accuracy_curve(correct: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average of ``correct`` over the last ``window`` steps.

    Args:
        correct: ``(N,)`` booleans.
        window: steps per window; the first ``window - 1`` entries average what exists.
    Returns:
        ``(N,)`` float64, entry t = mean(correct[max(0, t-window+1) : t+1]).
    """
    c = np.concatenate([[0.0], np.cumsum(correct, dtype=np.float64)])
    t = np.arange(1, c.size)
    lo = np.maximum(0, t - window)
    return (c[t] - c[lo]) / (t - lo)


def near_future_accuracy(pred: np.ndarray, y: np.ndarray, k: int) -> float:
    """Accuracy of the prediction made at step t scored against the label at step t+k.

    Near-future accuracy (Al Kader Hammoud et al., 2023) catches learners that exploit
    label correlation between consecutive steps: on a shuffled stream it drops to chance.

    Args:
        pred: ``(N,)`` predicted labels (made for step t).
        y: ``(N,)`` true labels.
        k: look-ahead in steps (k >= 0; k = 0 is ordinary online accuracy).
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    if k >= len(y):
        return float("nan")
    return float(np.mean(pred[: len(y) - k] == y[k:]))


# ---------------------------------------------------------------- task-boundary (held out)


def final_average_accuracy(acc: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last task: mean_j acc[T-1, j]."""
    return float(np.mean(acc[-1]))


def average_anytime_accuracy(acc: np.ndarray) -> float:
    """Mean over i of the average accuracy on the tasks seen so far: mean_i mean_{j<=i} acc[i, j]."""
    T = acc.shape[0]
    return float(np.mean([np.mean(acc[i, : i + 1]) for i in range(T)]))


def forgetting(acc: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al., 2018): for each task j < T-1, the best
    accuracy it ever had after being learned minus its final accuracy; mean over j.
    ``nan`` with a single task."""
    T = acc.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([np.max(acc[j : T - 1, j]) - acc[T - 1, j] for j in range(T - 1)]))


def backward_transfer(acc: np.ndarray) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): mean_{j<T-1} acc[T-1, j] - acc[j, j]; ``nan`` with one task."""
    T = acc.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([acc[T - 1, j] - acc[j, j] for j in range(T - 1)]))


def boundary_summary(acc: np.ndarray) -> dict[str, float]:
    """All task-boundary metrics of an accuracy matrix ``(T, T)`` as a dict."""
    return {
        "final_avg_accuracy": final_average_accuracy(acc),
        "avg_anytime_accuracy": average_anytime_accuracy(acc),
        "forgetting": forgetting(acc),
        "backward_transfer": backward_transfer(acc),
    }


# ---------------------------------------------------------------- recording


class Tracker:
    """Records per-step prequential outcomes into preallocated arrays (fixed memory).

    Call :meth:`record` with each chunk's log-probabilities *before* the learner sees
    the chunk's labels.

    Args:
        n: total number of steps the stream will have.
        tasks: ``(n,)`` task index of each step (stored alongside the records).
    """

    def __init__(self, n: int, tasks: np.ndarray | None = None) -> None:
        self.n = n
        self.t = 0
        self.loss = np.zeros(n, dtype=np.float64)  # nats
        self.p_true = np.zeros(n, dtype=np.float32)
        self.pred = np.zeros(n, dtype=np.int64)
        self.label = np.zeros(n, dtype=np.int64)
        self.task = np.zeros(n, dtype=np.int64) if tasks is None else np.asarray(tasks, dtype=np.int64)
        self.nonfinite = 0  # predictions that were NaN/inf (scored as the worst case)

    def record(self, logp: torch.Tensor, y: torch.Tensor) -> None:
        """Score one chunk. ``logp``: ``(C, K)`` log-probabilities; ``y``: ``(C,)`` labels."""
        C = y.shape[0]
        if logp.shape[0] != C:
            raise ValueError(f"learner returned {logp.shape[0]} predictions for a chunk of {C}")
        if self.t + C > self.n:
            raise ValueError("more steps recorded than the stream has")
        logp = logp.detach().float().cpu()
        y = y.cpu()
        lp_true = logp.gather(1, y[:, None])[:, 0].double()
        bad = ~torch.isfinite(lp_true)
        if bad.any():
            # A non-finite prediction is scored as probability ~0 rather than poisoning the sums.
            self.nonfinite += int(bad.sum())
            lp_true = torch.where(bad, torch.full_like(lp_true, math.log(1e-30)), lp_true)
        sl = slice(self.t, self.t + C)
        self.loss[sl] = (-lp_true).numpy()
        self.p_true[sl] = lp_true.exp().numpy()
        self.pred[sl] = logp.argmax(1).numpy()
        self.label[sl] = y.numpy()
        self.t += C

    @property
    def correct(self) -> np.ndarray:
        return self.pred[: self.t] == self.label[: self.t]

    def summary(self) -> dict[str, float]:
        """Online metrics over the steps recorded so far."""
        n = self.t
        return {
            "n_examples": n,
            "avg_online_accuracy": float(np.mean(self.correct)) if n else float("nan"),
            "cumulative_log_loss": float(np.sum(self.loss[:n])),
            "mean_log_loss": float(np.mean(self.loss[:n])) if n else float("nan"),
        }
