"""Online one-hidden-layer MLP head trained with one optimizer step per chunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ocl.learners.base import Learner
from ocl.learners.common import RunningStandardizer, guarded_step, make_head, make_optimizer


class MLPLearner(Learner):
    """One-hidden-layer MLP, one optimizer step per chunk on the chunk's mean loss.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: seeds the hidden layer's initialisation.
        hidden: hidden width H (``0`` gives a linear head).
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty.
        standardize: standardise inputs with running statistics of past inputs.

    Attributes:
        skipped_updates: steps skipped because the loss or a gradient was NaN/inf.
    """

    name = "mlp"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        seed: int = 0,
        hidden: int = 256,
        lr: float = 0.3,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        standardize: bool = True,
    ) -> None:
        self.head = make_head(feature_dim, num_classes, hidden, seed)
        self.opt = make_optimizer(optimizer, self.head.parameters(), lr, momentum, weight_decay)
        self.norm = RunningStandardizer(feature_dim) if standardize else None
        self.skipped_updates = 0

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x) if self.norm is not None else x)  # (C, K)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self._logits(x), dim=1)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self._logits(x), y)
        if not guarded_step(loss, self.opt, self.name, self.skipped_updates):  # one bad chunk must not poison the weights
            self.skipped_updates += 1
        if self.norm is not None and torch.isfinite(x).all():
            self.norm.update(x)
