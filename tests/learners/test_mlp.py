import functools

import pytest
import torch

from ocl.errors import OCLError
from ocl.learners.checks import assert_log_probs, prequential
from ocl.learners.checks import clusters as make_clusters
from ocl.learners.common import make_head
from ocl.learners.mlp import MLPLearner

D, K = 8, 4
clusters = functools.partial(make_clusters, dim=D, classes=K, spread=3.0)  # (n, D) features, (n,) labels


@pytest.mark.parametrize("chunk", [1, 10])
@pytest.mark.parametrize("opt,lr", [("sgd", 0.3), ("adam", 0.01)])
def test_mlp_beats_chance_with_proper_log_probs(chunk, opt, lr):
    x, y = clusters(400)
    lp = prequential(MLPLearner(D, K, seed=0, hidden=32, lr=lr, optimizer=opt), x, y, chunk)
    assert_log_probs(lp)
    assert (lp.argmax(1) == y).float()[-200:].mean() > 0.8  # chance is 0.25


def test_first_prediction_uniform_and_predict_is_pure():
    m = MLPLearner(D, K, seed=0, hidden=16)
    x, y = clusters(20)
    torch.testing.assert_close(m.predict(x[:3]), torch.full((3, K), -torch.log(torch.tensor(4.0)).item()))
    m.update(x, y)
    assert torch.equal(m.predict(x), m.predict(x))


def test_prediction_is_label_blind_and_updates_use_labels():
    x, y = clusters(60)
    y2 = y.clone()
    y2[20:30] = (y[20:30] + 1) % K  # relabel chunk 2 only
    a = prequential(MLPLearner(D, K, seed=3, hidden=16), x, y, 10)
    b = prequential(MLPLearner(D, K, seed=3, hidden=16), x, y2, 10)
    assert torch.equal(a[:30], b[:30])  # chunk 2 was scored before its labels arrived
    assert not torch.allclose(a[30:], b[30:])  # ... and its labels were then learnt from


def test_seeded_init_and_linear_head():
    a, b, c = make_head(D, K, 16, seed=1), make_head(D, K, 16, seed=1), make_head(D, K, 16, seed=2)
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)
    assert isinstance(make_head(D, K, 0, seed=0), torch.nn.Linear)
    with pytest.raises(OCLError):
        MLPLearner(D, K, optimizer="rmsprop")
