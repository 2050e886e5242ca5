"""How the pooled learner's experts combine their predictive distributions (``pool``): :class:`FixedShare`, a Bayesian mixture that follows whichever
expert has predicted better *recently* (Herbster & Warmuth 1998): its weights are the
posterior of a prior that lets the best expert switch at any step with probability
``share``, so its log-loss is at most the best switching sequence's plus ``log(M/share)`` per
switch and ``log(1/(1-share))`` (about ``share``) per example
(``tests/learners/pooled/test_pools.py`` checks the bound); and
:class:`LogLinearPool` (the default), a product of experts with exponents fitted online,
which can beat every expert where their errors differ.

Prequential by construction: the weights used for a chunk depend only on the labels of
earlier chunks (``update`` is called after the chunk has been scored).
"""

from __future__ import annotations

import math

import torch

from ocl.errors import OCLError
from ocl.learners.common import Adam

# A log-probability floor: an expert that gave the true label probability 0 (or NaN) loses
# all its weight for that example but the mixture stays finite.
_LOG_FLOOR = -1e4


class FixedShare:
    """Weights over M experts, in log space (float64), updated one example at a time.

    Args:
        n_experts: M.
        share: alpha in [0, 1): after each example every expert gets ``alpha / M`` of the
            total weight back, so an expert that was bad for a while can take over again
            within ``~log(1/alpha)`` nats of evidence.
    """

    def __init__(self, n_experts: int, share: float) -> None:
        if not 0 <= share < 1:
            raise ValueError(f"share must lie in [0, 1); got {share!r}")
        self.share = share
        self.log_w = torch.full((n_experts,), -math.log(n_experts), dtype=torch.float64)

    @staticmethod
    def _clean(log_probs: torch.Tensor) -> torch.Tensor:
        return log_probs.double().nan_to_num(nan=_LOG_FLOOR).clamp_min(_LOG_FLOOR)

    def predict(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Experts' log-probs ``(M, C, K)`` -> the mixture's ``(C, K)`` (float32, on their device)."""
        lw = self.log_w.to(log_probs.device)[:, None, None]
        return torch.logsumexp(lw + self._clean(log_probs), dim=0).float()

    def update(self, log_probs: torch.Tensor, y: torch.Tensor) -> None:
        """Bayes' rule on each example of a scored chunk in turn, then the share step.

        Args:
            log_probs: ``(M, C, K)`` the experts' log-probs for the chunk, as it was scored.
            y: ``(C,)`` its labels.
        """
        lp = self._clean(log_probs).cpu()
        hit = lp.gather(2, y.cpu()[None, :, None].expand(lp.shape[0], -1, 1))[..., 0]  # (M, C)
        M = lp.shape[0]
        lw = self.log_w
        for i in range(hit.shape[1]):  # sequential: example i's weights depend on examples < i
            post = lw + hit[:, i]
            post = post - torch.logsumexp(post, 0)
            lw = torch.log((1 - self.share) * post.exp() + self.share / M)
        self.log_w = lw

    @property
    def weights(self) -> list[float]:
        """The experts' current weights (they sum to 1)."""
        return self.log_w.exp().tolist()


class LogLinearPool:
    """Experts pooled geometrically, ``log p ∝ sum_m a_m log p_m``, with the exponents ``a``
    fitted online (one :class:`~ocl.learners.common.Adam` step per scored chunk on its log-loss,
    as :class:`~ocl.learners.common.Temperature` fits its scale). Unlike a mixture, a product
    of experts can be more accurate than every one of them where their errors differ; ``a`` also calibrates (its sum is a temperature).

    Args:
        n_experts: M; ``a`` starts at ``1/M`` each (the geometric mean).
        lr: Adam step size of ``a``.
    """

    #: Log-probabilities are clamped here: an expert's 0 must not decide the pool alone.
    FLOOR = -50.0

    def __init__(self, n_experts: int, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.a = torch.full((n_experts,), 1.0 / n_experts, dtype=torch.float64)
        self.adam = Adam(lr, betas, eps, zeros=torch.zeros_like(self.a))

    @property
    def steps(self) -> int:
        """Adam steps taken (scored chunks learned from)."""
        return self.adam.steps

    def _pool(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp = log_probs.double().nan_to_num(nan=self.FLOOR).clamp_min(self.FLOOR)  # (M, C, K)
        z = (self.a.to(lp.device)[:, None, None] * lp).sum(0)
        return lp, torch.log_softmax(z, dim=1)

    def predict(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Experts' log-probs ``(M, C, K)`` -> the pool's ``(C, K)`` (float32, on their device)."""
        return self._pool(log_probs)[1].float()

    def update(self, log_probs: torch.Tensor, y: torch.Tensor) -> None:
        """One Adam step on the chunk's log-loss, ``d/da_m = mean_c(sum_k p_ck lp_mck - lp_mcy)``."""
        lp, out = self._pool(log_probs.cpu())
        p = out.exp()  # (C, K)
        grad = ((p[None] * lp).sum(2) - lp.gather(2, y.cpu()[None, :, None].expand(lp.shape[0], -1, 1))[..., 0]).mean(1)
        if bool(torch.isfinite(grad).all()):
            self.a = self.a - self.adam.delta(grad)

    @property
    def weights(self) -> list[float]:
        """The exponents ``a``."""
        return self.a.tolist()


#: The ``pool`` option's values.
POOLS = ("loglinear", "fixed_share")


def make_pool(kind: str, n_experts: int, share: float) -> FixedShare | LogLinearPool:
    """A fresh pool of ``n_experts``: ``kind`` one of :data:`POOLS` (``share``: fixed_share's rate)."""
    if kind not in POOLS:
        raise OCLError(f"learner.pool={kind!r}: must be one of {list(POOLS)}.")
    return LogLinearPool(n_experts) if kind == "loglinear" else FixedShare(n_experts, share)
