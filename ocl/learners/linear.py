"""Online softmax regression trained with SGD: the simplest baseline over features."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ocl.learners.base import Learner

log = logging.getLogger(__name__)


class RunningStandardizer:
    """Standardises features with running mean/variance of the inputs seen so far.

    Statistics are updated only in :meth:`update`, i.e. from examples the learner has
    already been trained on, so prediction never uses anything it has not been given.

    Args:
        dim: D, the feature size.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, D) -> (C, D)`` standardised and scaled by ``1/sqrt(D)`` so ``||x|| ~ 1``.

        The unit norm makes one learning rate fit any D. The variance floor is relative
        (1% of the mean variance): near-constant inputs such as image borders would
        otherwise blow up the first time they change.
        """
        if self.n < 2:
            return x / math.sqrt(x.shape[1])
        var = self.m2 / (self.n - 1)
        std = (var + 1e-2 * var.mean() + 1e-12).sqrt() * math.sqrt(x.shape[1])
        return ((x.double() - self.mean) / std).to(x.dtype)

    def update(self, x: torch.Tensor) -> None:
        """Chan et al.'s parallel update of mean and M2 with a chunk ``(C, D)``."""
        x = x.double()
        c = x.shape[0]
        mean_c = x.mean(0)
        m2_c = ((x - mean_c) ** 2).sum(0)
        delta = mean_c - self.mean
        tot = self.n + c
        self.mean += delta * c / tot
        self.m2 += m2_c + delta**2 * self.n * c / tot
        self.n = tot


def guarded_step(loss: torch.Tensor, opt: torch.optim.Optimizer, who: str, skipped: int) -> bool:
    """One optimizer step on ``loss`` unless the loss or any gradient is NaN/inf.

    A single bad chunk (an overflow, an extreme input) must not poison the weights for the
    rest of the stream: the step is skipped, its gradients are dropped, and the skip is
    logged (the first time and then at powers of two, so a long bad stretch does not flood
    the log). ``skipped`` is the count so far (for the message).

    Returns:
        whether the step was taken.
    """
    opt.zero_grad(set_to_none=True)
    ok = bool(torch.isfinite(loss))
    if ok:
        loss.backward()
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        ok = all(bool(torch.isfinite(g).all()) for g in grads)
    if ok:
        opt.step()
        return True
    opt.zero_grad(set_to_none=True)
    n = skipped + 1
    if n & (n - 1) == 0:
        log.warning("%s: skipped an update with a non-finite loss or gradient (%d so far)", who, n)
    return False


class LinearLearner(Learner):
    """Online multinomial logistic regression: one SGD step per chunk on its mean loss.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: unused (zero initialisation is deterministic) but accepted for uniformity.
        lr: SGD learning rate.
        standardize: standardise inputs with running statistics of past inputs; makes one
            learning rate work for pixels and for ViT features of very different scales.
        weight_decay: L2 penalty.

    Attributes:
        skipped_updates: steps skipped because the loss or a gradient was NaN/inf.
    """

    name = "linear"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        seed: int = 0,
        lr: float = 1.0,
        standardize: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        self.linear = torch.nn.Linear(feature_dim, num_classes)
        # Zero init: the first prediction is uniform (log-loss log K), the honest prior.
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.opt = torch.optim.SGD(self.linear.parameters(), lr=lr, weight_decay=weight_decay)
        self.norm = RunningStandardizer(feature_dim) if standardize else None
        self.skipped_updates = 0

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x) if self.norm is not None else x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self._logits(x), dim=1)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self._logits(x), y)
        if not guarded_step(loss, self.opt, self.name, self.skipped_updates):
            self.skipped_updates += 1
        if self.norm is not None and torch.isfinite(x).all():  # never let one bad input poison the statistics
            self.norm.update(x)
