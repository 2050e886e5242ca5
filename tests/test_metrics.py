import math

import numpy as np
import pytest

from ocl.metrics import (accuracy_after_switches, average_anytime_accuracy, backward_transfer, final_average_accuracy,
                         forgetting, online_accuracy_curve)

ACC = np.array([
    [0.9, 0.1, 0.0],
    [0.6, 0.8, 0.2],
    [0.3, 0.7, 0.9],
])


def test_boundary_metrics_hand_computed():
    assert final_average_accuracy(ACC) == pytest.approx((0.3 + 0.7 + 0.9) / 3)
    # forgetting: task0 max(0.9, 0.6) - 0.3 = 0.6; task1 max(0.8) - 0.7 = 0.1
    assert forgetting(ACC) == pytest.approx(0.35)
    # bwt: (0.3 - 0.9 + 0.7 - 0.8) / 2
    assert backward_transfer(ACC) == pytest.approx(-0.35)
    # anytime: mean(0.9, mean(0.6, 0.8), mean(0.3, 0.7, 0.9))
    assert average_anytime_accuracy(ACC) == pytest.approx((0.9 + 0.7 + 1.9 / 3) / 3)
    assert math.isnan(forgetting(ACC[:1, :1]))


def test_online_curve():
    c = np.array([1, 0, 1, 1, 0], dtype=bool)
    np.testing.assert_allclose(online_accuracy_curve(c, 2), [1, 0.5, 0.5, 1, 0.5])
    np.testing.assert_allclose(online_accuracy_curve(c, 10), [1, 0.5, 2 / 3, 0.75, 0.6])


def test_accuracy_after_switches_aligns_every_task_but_the_first():
    task = np.repeat([0, 1, 2], [5, 4, 6])
    correct = (np.arange(15) % 2).astype(float)
    m = accuracy_after_switches(task, correct, 5)
    assert m.shape == (2, 5)
    np.testing.assert_array_equal(m[0, :4], correct[5:9])
    assert np.isnan(m[0, 4])  # task 1 has only 4 examples
    np.testing.assert_array_equal(m[1], correct[9:14])
