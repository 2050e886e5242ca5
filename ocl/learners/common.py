"""Parts the gradient baselines share: input standardisation with running statistics, an
optimizer step that skips non-finite losses and gradients, a classifier head and its
optimizer, and :class:`HeadLearner`, the base of the linear, MLP and ER learners."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ocl.errors import OCLError
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


class HeadLearner(Learner):
    """Base of the gradient baselines: a classifier head over (optionally standardised)
    features, trained by one optimizer.

    ``predict`` is ``log_softmax(head(standardise(x)))``. Subclasses decide what a step
    learns from (:meth:`step`) and call :meth:`observe` on every revealed chunk, so that the
    standardiser only ever holds statistics of inputs already learned from.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: seeds the hidden layer's initialisation (:func:`make_head`).
        hidden: hidden width (``0`` = linear head).
        lr, optimizer, momentum, weight_decay: see :func:`make_optimizer`.
        standardize: standardise inputs with running statistics of past inputs; makes one
            learning rate work for pixels and for ViT features of very different scales.

    Attributes:
        skipped_updates: steps skipped because the loss or a gradient was NaN/inf.
    """

    def __init__(self, feature_dim: int, num_classes: int, seed: int, hidden: int, lr: float,
                 optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0,
                 standardize: bool = True) -> None:
        super().__init__(feature_dim, num_classes, seed)
        self.head = make_head(feature_dim, num_classes, hidden, seed)
        self.opt = make_optimizer(optimizer, self.head.parameters(), lr, momentum, weight_decay)
        self.norm = RunningStandardizer(feature_dim) if standardize else None
        self.skipped_updates = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, D) -> (C, K)`` logits of the current head."""
        return self.head(self.norm(x) if self.norm is not None else x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return F.log_softmax(self.logits(x), dim=1)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the mean loss of ``x (B, D)``, ``y (B,)``, skipped (and
        counted) when the loss or a gradient is not finite: one bad chunk must not poison the
        weights."""
        loss = F.cross_entropy(self.logits(x), y)
        if not guarded_step(loss, self.opt, self.name, self.skipped_updates):
            self.skipped_updates += 1

    def observe(self, x: torch.Tensor) -> None:
        """Add a revealed chunk ``(C, D)`` to the input statistics (never a non-finite one:
        one bad input must not poison them)."""
        if self.norm is not None and torch.isfinite(x).all():
            self.norm.update(x)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        self.step(x, y)
        self.observe(x)
