import math

import torch

from ocl.learners.checks import prequential
from ocl.learners.recent import RecentLabelsLearner

D, K = 8, 4


def test_exact_distribution_of_the_window():
    r = RecentLabelsLearner(D, K, window=3, alpha=1.0)
    torch.testing.assert_close(r.predict(torch.zeros(2, D)), torch.full((2, K), -math.log(K)))
    r.update(torch.zeros(2, D), torch.tensor([0, 1]))
    torch.testing.assert_close(r.predict(torch.zeros(1, D)).exp()[0], torch.tensor([2, 2, 1, 1]) / 6.0)
    r.update(torch.zeros(2, D), torch.tensor([1, 2]))  # window is now [1, 1, 2]: label 0 evicted
    torch.testing.assert_close(r.predict(torch.zeros(1, D)).exp()[0], torch.tensor([1, 3, 2, 1]) / 7.0)
    r.update(torch.zeros(5, D), torch.tensor([0, 0, 3, 3, 3]))  # chunk longer than the window
    torch.testing.assert_close(r.predict(torch.zeros(1, D)).exp()[0], torch.tensor([1, 1, 1, 4]) / 7.0)


def test_blind_predictor_beats_chance_on_label_correlated_stream_only():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(K, (20,), generator=g).repeat_interleave(20)  # runs of 20 equal labels
    x = torch.randn(400, D, generator=g)
    lp = prequential(RecentLabelsLearner(D, K, window=10), x, y, 1)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.logsumexp(1), torch.zeros(400), atol=1e-5, rtol=0)
    assert (lp.argmax(1) == y).float().mean() > 0.8  # chance is 0.25
    iid = torch.randint(K, (400,), generator=g)
    assert (prequential(RecentLabelsLearner(D, K), x, iid, 1).argmax(1) == iid).float().mean() < 0.4


def test_ignores_x_is_label_blind_and_pure():
    x = torch.randn(30, D)
    y = torch.randint(K, (30,))
    y2 = y.clone()
    y2[10:20] = (y[10:20] + 1) % K
    a = prequential(RecentLabelsLearner(D, K, window=8), x, y, 10)
    b = prequential(RecentLabelsLearner(D, K, window=8), x, y2, 10)
    assert torch.equal(a[:20], b[:20]) and not torch.allclose(a[20:], b[20:])
    r = RecentLabelsLearner(D, K)
    r.update(x, y)
    assert torch.equal(r.predict(x), r.predict(-x))
