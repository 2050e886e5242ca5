"""Online one-hidden-layer MLP head trained with one optimizer step per chunk.

Also home of the small pieces the other gradient baselines share: :func:`make_head` (a
linear or one-hidden-layer head, seeded, output layer zero-initialised) and
:func:`make_optimizer`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.learners.linear import RunningStandardizer, guarded_step


def make_head(feature_dim: int, num_classes: int, hidden: int, seed: int) -> nn.Module:
    """A classifier head over features: linear (``hidden == 0``) or Linear-ReLU-Linear.

    The hidden layer gets PyTorch's default (Kaiming-uniform) init drawn from a private
    generator seeded with ``seed``, so building a head never touches the global RNG.
    The output layer is zero-initialised: the first prediction is uniform (log-loss
    ``log K``), the honest prior, as in :class:`~ocl.learners.linear.LinearLearner`.

    Returns:
        a module mapping ``(C, D) -> (C, K)`` logits.
    """
    if hidden < 0:
        raise OCLError(f"hidden must be >= 0 (0 = linear head); got {hidden}.")
    out = nn.Linear(hidden or feature_dim, num_classes)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    if hidden == 0:
        return out
    gen = torch.Generator().manual_seed(seed)
    first = nn.Linear(feature_dim, hidden)
    # Same distributions as nn.Linear.reset_parameters, but from our generator.
    nn.init.kaiming_uniform_(first.weight, a=math.sqrt(5), generator=gen)
    bound = 1.0 / math.sqrt(feature_dim)
    nn.init.uniform_(first.bias, -bound, bound, generator=gen)
    return nn.Sequential(first, nn.ReLU(), out)


def make_optimizer(
    name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``"sgd"`` (with optional momentum) or ``"adam"``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise OCLError(f"optimizer must be 'sgd' or 'adam'; got {name!r}.")


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
