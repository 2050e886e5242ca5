"""Online softmax regression trained with SGD: the simplest baseline over features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ocl.learners.base import Learner
from ocl.learners.common import RunningStandardizer, guarded_step


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
