import functools
import math

import pytest
import torch

from ocl.learners.checks import assert_log_probs, prequential
from ocl.learners.checks import clusters as make_clusters
from ocl.learners.knn import KNNLearner

D, K = 8, 4
clusters = functools.partial(make_clusters, dim=D, classes=K, spread=3.0)  # (n, D) features, (n,) labels


@pytest.mark.parametrize("policy,normalize", [("reservoir", True), ("fifo", False)])
def test_knn_beats_chance_with_proper_log_probs(policy, normalize):
    x, y = clusters(400)
    lp = prequential(KNNLearner(D, K, k=5, memory_size=64, memory_policy=policy, normalize=normalize), x, y, 5)
    assert_log_probs(lp)
    assert (lp.argmax(1) == y).float()[-200:].mean() > 0.8


def test_exact_neighbours_and_smoothed_vote():
    knn = KNNLearner(2, 3, k=3, normalize=False, alpha=0.5)
    assert torch.allclose(knn.predict(torch.zeros(1, 2)), torch.full((1, 3), -math.log(3)))  # empty memory
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [6.0, 5.0]])
    knn.update(pts, torch.tensor([0, 1, 1, 2, 2]))
    q = torch.tensor([[0.1, 0.1], [5.4, 5.0]])
    dist, idx = knn.neighbours(q)
    assert idx[0].tolist() == [0, 1, 2] and idx[1].tolist() == [3, 4, 2]  # nearest first
    torch.testing.assert_close(dist[1], torch.tensor([0.4, 0.6, (5.4**2 + 3**2) ** 0.5]))
    p = knn.predict(q).exp()
    # (votes + alpha) / (k + K alpha): query 0 -> votes [1, 2, 0]; query 1 -> [0, 1, 2]
    torch.testing.assert_close(p, torch.tensor([[1.5, 2.5, 0.5], [0.5, 1.5, 2.5]]) / 4.5)


def test_fewer_stored_than_k_uses_what_is_there():
    knn = KNNLearner(2, 2, k=10, normalize=False, alpha=1.0)
    knn.update(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
    torch.testing.assert_close(knn.predict(torch.zeros(1, 2)).exp(), torch.tensor([[1 / 3, 2 / 3]]))


def test_distance_weighted_votes_still_proper():
    x, y = clusters(100)
    lp = prequential(KNNLearner(D, K, k=4, distance_weighted=True), x, y, 10)
    assert_log_probs(lp)
    assert (lp.argmax(1) == y).float()[-50:].mean() > 0.8


def test_knn_is_label_blind_and_pure():
    x, y = clusters(60)
    y2 = y.clone()
    y2[20:30] = (y[20:30] + 1) % K
    a = prequential(KNNLearner(D, K, k=3), x, y, 10)
    b = prequential(KNNLearner(D, K, k=3), x, y2, 10)
    assert torch.equal(a[:30], b[:30]) and not torch.allclose(a[30:], b[30:])
    knn = KNNLearner(D, K)
    knn.update(x, y)
    assert torch.equal(knn.predict(x), knn.predict(x))


def test_memory_bounded():
    knn = KNNLearner(D, K, memory_size=16)
    x, y = clusters(100)
    prequential(knn, x, y, 7)
    assert knn.memory.size == 16 and knn.memory.x.shape == (16, D)



def test_neighbour_distances_match_cdist_on_wide_features():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 512, generator=g)
    learner = KNNLearner(512, 3, k=7, normalize=False)
    learner.update(x[:250], torch.randint(0, 3, (250,), generator=g))
    dist, idx = learner.neighbours(x[250:])
    ref = torch.cdist(x[250:], learner.memory.contents()[0]).topk(7, dim=1, largest=False)
    torch.testing.assert_close(dist, ref.values, rtol=1e-4, atol=1e-3)
    assert (idx == ref.indices).float().mean() > 0.99  # ties/rounding may swap near-equal neighbours
