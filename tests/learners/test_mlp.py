from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ocl.errors import OCLError
from ocl.learners.common import make_head
from ocl.learners.mlp import MLPLearner

D, K = 8, 4
CONFIGS = Path(__file__).parents[2] / "configs" / "learner"


def clusters(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable Gaussian clusters: ``(n, D)`` features, ``(n,)`` labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g) * 3
    y = torch.randint(K, (n,), generator=g)
    return centres[y] + torch.randn(n, D, generator=g), y


def prequential(learner, x, y, chunk):
    out = []
    for s in range(0, len(y), chunk):
        out.append(learner.predict(x[s : s + chunk]))
        learner.update(x[s : s + chunk], y[s : s + chunk])
    return torch.cat(out)


def assert_proper(lp):
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    torch.testing.assert_close(lp.logsumexp(1), torch.zeros(lp.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 10])
@pytest.mark.parametrize("opt,lr", [("sgd", 0.3), ("adam", 0.01)])
def test_mlp_beats_chance_with_proper_log_probs(chunk, opt, lr):
    x, y = clusters()
    lp = prequential(MLPLearner(D, K, seed=0, hidden=32, lr=lr, optimizer=opt), x, y, chunk)
    assert_proper(lp)
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


def test_config_instantiates():
    learner = instantiate(OmegaConf.load(CONFIGS / "mlp.yaml"))(feature_dim=D, num_classes=K, seed=0)
    assert isinstance(learner, MLPLearner)
