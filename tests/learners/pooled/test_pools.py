"""The pooled learner's pools (ocl/learners/pooled/pools.py): the fixed-share mixture's loss
bounds, the log-linear pool's Adam step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.learners.pooled.pools import FixedShare, LogLinearPool, make_pool


def _experts(T: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two experts' log-probs ``(2, T, K)`` and labels ``(T,)``: expert 0 is good in the first
    half, expert 1 in the second."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (T,), generator=g)
    logits = torch.randn(2, T, K, generator=g)
    first = torch.arange(T) < T // 2
    logits[0, first, y[first]] += 3.0
    logits[1, ~first, y[~first]] += 3.0
    return F.log_softmax(logits, dim=2), y


def _mixture_loss(mix: FixedShare, lp: torch.Tensor, y: torch.Tensor) -> float:
    """Total log-loss of the mixture fed one example at a time (predict, then update)."""
    total = 0.0
    for t in range(y.shape[0]):
        total -= float(mix.predict(lp[:, t : t + 1])[0, y[t]])
        mix.update(lp[:, t : t + 1], y[t : t + 1])
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bayes_mixture_is_within_log_m_of_the_best_expert(seed):
    lp, y = _experts(200, 5, seed)
    loss = _mixture_loss(FixedShare(2, share=0.0), lp, y)
    expert_loss = -lp.gather(2, y[None, :, None].expand(2, -1, 1)).sum((1, 2))
    assert loss <= float(expert_loss.min()) + math.log(2) + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_share_tracks_the_expert_that_is_best_now(seed):
    """One switch of the best expert half way: fixed share pays at most the switching
    sequence's loss + log M + log(M / alpha) (one switch) + (T - 2) log(1 / (1 - alpha))
    (Herbster & Warmuth 1998), and clearly beats both single experts and the plain Bayes mixture."""
    T, alpha = 200, 0.01
    lp, y = _experts(T, 5, seed)
    hits = lp.gather(2, y[None, :, None].expand(2, -1, 1))[..., 0]  # (2, T)
    switching = float(-(hits[0, : T // 2].sum() + hits[1, T // 2 :].sum()))
    loss = _mixture_loss(FixedShare(2, share=alpha), lp, y)
    bound = switching + math.log(2) + math.log(2 / alpha) + (T - 2) * math.log(1 / (1 - alpha))
    assert loss <= bound + 1e-6
    assert loss < float(-hits.sum(1).min()) - 20
    assert loss < _mixture_loss(FixedShare(2, share=0.0), lp, y) - 20


def test_fixed_share_survives_an_expert_that_gives_the_truth_probability_zero():
    mix = FixedShare(2, share=0.01)
    lp = torch.log(torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]]))  # expert 0: p(y=1) = 0
    mix.update(lp, torch.tensor([1]))
    out = mix.predict(lp)
    assert torch.isfinite(out).all() and mix.weights[1] > 0.98
    assert torch.allclose(out.exp().sum(1), torch.ones(1))


def test_loglinear_pool_steps_adam_on_its_log_loss():
    """LogLinearPool's closed-form gradient is autograd's, its step torch.optim.Adam's."""
    lp, y = _experts(12, 4, seed=0)
    pool = LogLinearPool(2, lr=0.05)
    a = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a], lr=0.05)
    for t in range(0, 12, 3):
        chunk, yc = lp[:, t : t + 3], y[t : t + 3]
        torch.testing.assert_close(pool.predict(chunk), torch.log_softmax((a.detach()[:, None, None] * chunk.double()).sum(0), 1).float())
        opt.zero_grad()
        F.cross_entropy((a[:, None, None] * chunk.double()).sum(0), yc).backward()
        opt.step()
        pool.update(chunk, yc)
        torch.testing.assert_close(pool.a, a.detach())
    assert pool.steps == 4


def test_make_pool_builds_the_named_pool_and_refuses_others():
    assert isinstance(make_pool("loglinear", 3, 0.01), LogLinearPool)
    assert isinstance(make_pool("fixed_share", 3, 0.01), FixedShare)
    with pytest.raises(OCLError, match="learner.pool='product'"):
        make_pool("product", 3, 0.01)
