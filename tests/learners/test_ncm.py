import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ocl.learners.ncm import NCMLearner

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


def test_ncm_beats_chance_with_proper_log_probs():
    x, y = clusters()
    lp = prequential(NCMLearner(D, K), x, y, 1)
    assert_proper(lp)
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


def test_config_instantiates():
    learner = instantiate(OmegaConf.load(CONFIGS / "ncm.yaml"))(feature_dim=D, num_classes=K, seed=0)
    assert isinstance(learner, NCMLearner)
