import functools
import math

import torch

from ocl.learners.checks import assert_log_probs, prequential
from ocl.learners.checks import clusters as make_clusters
from ocl.learners.ncm import NCMLearner

D, K = 8, 4
clusters = functools.partial(make_clusters, dim=D, classes=K, spread=3.0)  # (n, D) features, (n,) labels


def test_ncm_beats_chance_with_proper_log_probs():
    x, y = clusters(400)
    lp = prequential(NCMLearner(D, K), x, y, 1)
    assert_log_probs(lp)
    assert (lp.argmax(1) == y).float()[-200:].mean() > 0.8


def test_running_means_match_batch_means():
    x, y = clusters(90)
    ncm = NCMLearner(D, K, normalize=False)
    prequential(ncm, x, y, 7)
    for c in range(K):
        torch.testing.assert_close(ncm.means[c], x[y == c].double().mean(0))


def test_hand_computed_probabilities_and_floor_for_unseen_classes():
    ncm = NCMLearner(2, 3, normalize=False, temperature=2.0, floor=0.3)
    assert torch.allclose(ncm.predict(torch.zeros(1, 2)), torch.full((1, 3), -math.log(3)))
    ncm.update(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 0, 2]))
    # means: class 0 -> (1, 0); class 2 -> (0, 4); class 1 unseen
    p = ncm.predict(torch.tensor([[1.0, 1.0]])).exp()[0]
    d0, d2 = 1.0, 1.0 + 9.0  # squared distances
    s0 = math.exp(-d0 / 2) / (math.exp(-d0 / 2) + math.exp(-d2 / 2))
    expected = torch.tensor([0.7 * s0 + 0.1, 0.1, 0.7 * (1 - s0) + 0.1])
    torch.testing.assert_close(p, expected)


def test_ncm_is_label_blind_and_pure():
    x, y = clusters(60)
    y2 = y.clone()
    y2[20:30] = (y[20:30] + 1) % K
    a = prequential(NCMLearner(D, K), x, y, 10)
    b = prequential(NCMLearner(D, K), x, y2, 10)
    assert torch.equal(a[:30], b[:30]) and not torch.allclose(a[30:], b[30:])
    assert torch.equal(NCMLearner(D, K).predict(x), NCMLearner(D, K).predict(x))
