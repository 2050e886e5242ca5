"""Fixed-share mixture of experts' predictive distributions (Herbster & Warmuth 1998).

The transformer learner predicts with a Bayesian mixture of two experts that see the same
features: its network and an online linear read-out (softmax regression with a large SGD
step, :class:`ocl.learners.linear.LinearLearner`). Why: early in a stream, and after every
shift, a linear model on good pretrained features learns within tens of examples, while the
network needs hundreds of steps before its in-weights and in-context learning pay off; later
the network is better (label-permuted and bursty streams, where context matters). The mixture
follows whichever expert has predicted better *recently*: its weights are the posterior of a
prior that lets the best expert switch at any step with probability ``share``, so its
log-loss is at most the best switching sequence's plus ``log(M/share)`` per switch and
``log(1/(1-share))`` (about ``share``) per example (Herbster & Warmuth, *Tracking the best
expert*, 1998; ``tests/learners/transformer/test_mixture.py`` checks the bound).

Prequential by construction: the weights used for a chunk depend only on the labels of
earlier chunks (:meth:`FixedShare.update` is called after the chunk has been scored).
"""

from __future__ import annotations

import math

import torch

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
