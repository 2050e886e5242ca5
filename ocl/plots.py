"""PNG plots of a comparison (matplotlib, Agg canvas: no display, no global pyplot state).

Both functions take the records of ``compare.json`` (one per learner x seed; failed runs
are skipped) and write one PNG.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ocl.files import atomic_file

log = logging.getLogger(__name__)


def _by_learner(records: Sequence[dict[str, Any]]) -> "OrderedDict[str, list[dict[str, Any]]]":
    groups: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for r in records:
        if r.get("status", "ok") == "ok":
            groups.setdefault(r["learner"], []).append(r)
    return groups


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")


def mean_curve(runs: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean online-accuracy curve over seeds: ``(steps, accuracy)``.

    Seeds whose curves were sampled at other steps (streams of other lengths) are
    interpolated onto the first seed's steps.
    """
    steps = np.asarray(runs[0]["online_accuracy_curve"]["step"], dtype=np.float64)
    ys = []
    for r in runs:
        c = r["online_accuracy_curve"]
        s, a = np.asarray(c["step"], dtype=np.float64), np.asarray(c["accuracy"], dtype=np.float64)
        ys.append(a if s.shape == steps.shape and np.array_equal(s, steps) else np.interp(steps, s, a))
    return steps, np.mean(ys, axis=0)


def plot_online_curves(records: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path | None:
    """Online accuracy (trailing window) against stream position, one line per learner
    (mean over seeds), task boundaries of the first run as dotted vertical lines.

    Returns the path written, or ``None`` when no run succeeded.
    """
    groups = _by_learner(records)
    if not groups:
        log.warning("no successful run: %s not written", path)
        return None
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i}" for i in range(10)] + ["black", "#b8860b", "#9acd32", "#4682b4"]  # tab10 + 4 distinct
    window = None
    for i, (name, runs) in enumerate(groups.items()):
        steps, acc = mean_curve(runs)
        window = runs[0]["online_accuracy_curve"].get("window", window)
        ax.plot(steps + 1, acc, color=colors[i % len(colors)], lw=1.5,
                ls="-" if i < len(colors) else "--", label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    first = next(iter(groups.values()))[0]
    for b in first.get("task_boundaries") or []:
        ax.axvline(int(b), color="0.5", ls=":", lw=1)
    ax.set_xlabel("examples seen")
    ax.set_ylabel(f"online accuracy (last {window} examples)" if window else "online accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "online accuracy (mean over seeds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    _save(fig, Path(path))
    return Path(path)


def plot_accuracy_matrices(records: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """One heat map per learner of ``acc[after task i, on task j]`` (mean over seeds whose
    matrices have the same shape), values written in the cells for up to 10 tasks.

    Returns the path written, or ``None`` when no run has an accuracy matrix (no test data).
    """
    mats: list[tuple[str, np.ndarray, int]] = []
    for name, runs in _by_learner(records).items():
        ms = [np.asarray(r["accuracy_matrix"], dtype=np.float64) for r in runs if r.get("accuracy_matrix") is not None]
        if ms:
            same = [m for m in ms if m.shape == ms[0].shape]
            mats.append((name, np.mean(same, axis=0), len(same)))
    if not mats:
        log.info("no accuracy matrix (no held-out test data): %s not written", path)
        return None
    n = len(mats)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    T = max(m.shape[0] for _, m, _ in mats)
    cell = 0.45 if T > 6 else 0.6
    side = max(2.6, cell * T + 1.2)
    fig = Figure(figsize=(side * cols + 0.8, side * rows + 0.3))
    image = None
    for k, (name, m, nseeds) in enumerate(mats):
        ax = fig.add_subplot(rows, cols, k + 1)
        image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
        if m.shape[0] <= 10:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
        ax.set_title(f"{name} ({nseeds} seed{'s' * (nseeds > 1)})", fontsize=9)
        ax.set_xlabel("evaluated on task j", fontsize=8)
        if k % cols == 0:
            ax.set_ylabel("after task i", fontsize=8)
        ticks = range(m.shape[0])
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
        ax.tick_params(labelsize=7)
    fig.subplots_adjust(wspace=0.3, hspace=0.45)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="test accuracy")
    _save(fig, Path(path))
    return Path(path)
