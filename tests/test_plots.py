"""ocl.plots on hand-made records (no runs): valid PNGs, mean over seeds, failures skipped."""

import numpy as np
import pytest
from matplotlib.image import imread

from ocl.plots import mean_curve, plot_accuracy_matrices, plot_online_curves


def record(learner, seed, steps, acc, matrix=None, status="ok"):
    return {"learner": learner, "seed": seed, "status": status, "task_boundaries": [50],
            "online_accuracy_curve": {"window": 10, "step": list(steps), "accuracy": list(acc)},
            "accuracy_matrix": matrix}


def test_mean_curve_averages_seeds_and_interpolates_other_grids():
    a = record("a", 0, [0, 10, 20], [0.0, 0.5, 1.0])
    b = record("a", 1, [0, 10, 20], [1.0, 0.5, 0.0])
    c = record("a", 2, [0, 20], [0.0, 1.0])  # sampled elsewhere: interpolated onto a's steps
    steps, acc = mean_curve([a, b])
    assert steps.tolist() == [0, 10, 20] and acc.tolist() == [0.5, 0.5, 0.5]
    assert mean_curve([a, c])[1].tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_plots_are_valid_pngs_and_skip_failed_runs(tmp_path):
    m = [[0.9, 0.0], [0.4, 0.8]]
    recs = [record("lin", s, range(0, 100, 5), np.linspace(0, 1, 20), m) for s in (0, 1)]
    recs.append(record("broken", 0, [], [], None, status="failed"))
    recs.append(record("nomatrix", 0, range(0, 100, 5), np.full(20, 0.3)))
    curves = plot_online_curves(recs, tmp_path / "curves.png")
    mats = plot_accuracy_matrices(recs, tmp_path / "acc.png")
    assert curves == tmp_path / "curves.png" and mats == tmp_path / "acc.png"
    for p in (curves, mats):
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(tmp_path.glob(".*"))  # temp files renamed away


def test_nothing_to_plot_writes_nothing(tmp_path):
    failed = [record("x", 0, [], [], None, status="failed")]
    assert plot_online_curves(failed, tmp_path / "c.png") is None
    no_test = [record("x", 0, [0, 1], [0.0, 1.0], None)]
    assert plot_accuracy_matrices(no_test, tmp_path / "m.png") is None
    assert not list(tmp_path.iterdir())
