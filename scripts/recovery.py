"""Recovery after a shift: online accuracy k examples after each task switch, per learner.

On a label-permuted stream (``protocol=permuted``: labels re-drawn every segment) or a
class-incremental split, every task switch invalidates what was learned; this script
measures how fast each learner recovers, from the ``steps.csv`` of finished ``ocl run``
directories (one row per example; a switch is where the ``task`` column changes):

    .venv/bin/python scripts/recovery.py transformer=runs/perm/transformer_s* linear=runs/perm/linear_s* \
        --first 100 --plot scripts/results/recovery/permuted.png

For each learner (several run directories = several seeds) it prints the accuracy over the
first ``--first`` examples after a switch (mean ± std over seeds; the stream's first task is
left out: nothing was learned before it), and over the rest of each task; ``--plot`` draws
the mean accuracy against examples since the switch (a moving average over ``--smooth``).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np

from ocl.metrics import accuracy_after_switches
from ocl.report import read_steps_csv


def load_steps(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(task, correct)`` per example, from a run directory's steps.csv."""
    path = run_dir / "steps.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (a finished `ocl run` directory holds one)")
    return read_steps_csv(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=DIR...",
                   help="a learner label and its run directories (globs allowed; one per seed)")
    p.add_argument("--first", type=int, default=100, help="examples after a switch to score (default 100)")
    p.add_argument("--length", type=int, default=1000, help="examples after a switch to plot (default 1000)")
    p.add_argument("--smooth", type=int, default=20, help="moving-average width of the plot (default 20)")
    p.add_argument("--plot", type=Path, default=None, help="write the recovery curves to this PNG")
    args = p.parse_args(argv)

    curves: dict[str, np.ndarray] = {}
    print(f"{'learner':14s} {'seeds':>5s} {'switches':>8s} {'acc first ' + str(args.first):>18s} {'acc rest of task':>18s}")
    for item in args.runs:
        label, _, pattern = item.partition("=")
        dirs = sorted(Path(d) for d in glob.glob(pattern)) if pattern else []
        if not dirs:
            raise SystemExit(f"error: {item!r}: no run directory matches (expected LABEL=DIR_OR_GLOB)")
        first, rest, per_seed = [], [], []
        for d in dirs:
            task, correct = load_steps(d)
            m = accuracy_after_switches(task, correct, max(args.length, len(task)))
            first.append(np.nanmean(m[:, : args.first]))
            rest.append(np.nanmean(m[:, args.first :]))
            per_seed.append(m[:, : args.length])
        curves[label] = np.nanmean(np.concatenate(per_seed), axis=0)
        print(f"{label:14s} {len(dirs):5d} {sum(len(s) for s in per_seed):8d} "
              f"{np.mean(first):10.4f} ± {np.std(first):.4f} {np.mean(rest):10.4f} ± {np.std(rest):.4f}")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        kernel = np.ones(args.smooth) / args.smooth
        for label, c in curves.items():
            c = c[~np.isnan(c)]
            ax.plot(np.arange(len(c) - args.smooth + 1) + args.smooth / 2, np.convolve(c, kernel, "valid"), label=label)
        ax.axvline(args.first, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("examples since the switch")
        ax.set_ylabel(f"online accuracy (moving average of {args.smooth})")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
