import math

import torch

from ocl.learners.common import RunningStandardizer
from ocl.learners.linear import LinearLearner


def test_first_prediction_is_uniform_and_learning_reduces_loss():
    torch.manual_seed(0)
    K, D = 3, 5
    centers = torch.randn(K, D) * 3
    lin = LinearLearner(D, K, lr=0.1)
    y0 = torch.tensor([1])
    lp = lin.predict(centers[y0])
    assert torch.allclose(lp, torch.full((1, K), -math.log(K)))
    correct = []
    for t in range(300):
        y = torch.randint(K, (1,))
        x = centers[y] + torch.randn(1, D)
        correct.append(int(lin.predict(x).argmax(1) == y))
        lin.update(x, y)
    assert sum(correct[-100:]) > 90


def test_predict_does_not_change_state():
    lin = LinearLearner(4, 2, lr=0.5)
    x = torch.randn(3, 4)
    lin.update(x, torch.tensor([0, 1, 0]))
    a = lin.predict(x)
    b = lin.predict(x)
    assert torch.equal(a, b)


def test_running_standardizer_matches_batch_statistics():
    x = torch.randn(50, 3, dtype=torch.float64) * 4 + 2
    rs = RunningStandardizer(3)
    for s in range(0, 50, 7):
        rs.update(x[s : s + 7])
    torch.testing.assert_close(rs.mean, x.mean(0))
    torch.testing.assert_close(rs.m2 / 49, x.var(0))
