"""Continual-learning metrics as pure functions over recorded arrays (the tracker that records
them during a prequential run is :mod:`ocl.tracker`).

Conventions: losses are natural-log (nats); ``correct`` is a boolean array of
per-step outcomes; ``acc`` is an accuracy matrix with ``acc[i, j]`` = accuracy on
task j's held-out test set after training on tasks 0..i.
"""

from __future__ import annotations

import numpy as np


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


def accuracy_after_switches(task: np.ndarray, correct: np.ndarray, length: int) -> np.ndarray:
    """Correctness k = 0..length-1 examples after each task switch (recovery after a shift).

    Args:
        task: ``(N,)`` task id per example; a switch is where it changes (the first task is none).
        correct: ``(N,)`` 0/1 per example.
        length: examples kept after each switch.
    Returns:
        ``(n_switches, length)`` float64; NaN past the end of a task.
    """
    starts = np.flatnonzero(np.diff(task) != 0) + 1
    ends = np.append(starts[1:], len(task))
    out = np.full((len(starts), length), np.nan)
    for i, (a, b) in enumerate(zip(starts, ends)):
        n = min(length, b - a)
        out[i, :n] = correct[a : a + n]
    return out


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
