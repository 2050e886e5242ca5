"""Parts the gradient learners share: input standardisation with running statistics, an
optimizer step that skips non-finite losses and gradients, a classifier head and its
optimizer, :class:`HeadLearner` (the base of the linear, MLP and ER learners), and the
closed-form Adam of a few scalars (:class:`Adam`) with the online output
:class:`Temperature` it fits (the transformer's, the pooled learner's calibrated experts'; the pool's
exponents take the same step)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ocl.errors import OCLError
from ocl.learners.base import Learner

log = logging.getLogger(__name__)

Scalars = float | torch.Tensor  # a Python float, or a float64 tensor of a few scalars


class Adam:
    """``torch.optim.Adam``'s update (no weight decay) of a few scalars whose gradient has a
    closed form: no autograd, no optimizer object. The one home of that step, used by
    :class:`Temperature` (a float) and the pooled learner's log-linear pool (a float64 vector).

    Args:
        lr: step size. betas, eps: Adam's (torch's defaults).
        zeros: the moments' initial value, shaped like the parameters (``0.0`` for a float).
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 zeros: Scalars = 0.0) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = self.v = zeros  # the moments (never updated in place: safe to share the start)
        self.steps = 0

    def delta(self, grad: Scalars) -> Scalars:
        """One step for ``grad``: what to subtract from the parameters (``torch.optim.Adam``'s
        ``lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``)."""
        b1, b2 = self.betas
        self.steps += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        root = self.v.sqrt() if isinstance(self.v, torch.Tensor) else math.sqrt(self.v)
        denom = root / math.sqrt(1 - b2**self.steps) + self.eps
        return self.lr / (1 - b1**self.steps) * self.m / denom


class Temperature:
    """Output calibration ``logits * exp(s)``, s fitted online: one Adam step per scored chunk on
    that chunk's log-loss (the chunk was scored before, so the fit never sees a label early).
    Log-probabilities are logits too (a per-row constant changes no softmax): the pooled learner
    calibrates an expert's log-probabilities with it.

    One scalar needs no autograd: the gradient has a closed form,
    ``d/ds CE(z e^s, y) = e^s * mean_i(sum_k p_ik z_ik - z_i,y_i)`` with ``p = softmax(z e^s)``,
    stepped by :class:`Adam`.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.adam = Adam(lr, betas, eps)
        self.log_scale = 0.0

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    @property
    def steps(self) -> int:
        return self.adam.steps

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated log-probs ``(C, K)`` of ``logits (C, K)``."""
        return F.log_softmax(logits * self.scale, dim=1)

    def step(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """One step on raw logits ``(C, K)`` and labels ``(C,)``; skipped if the gradient is not finite."""
        s = self.scale
        z = logits.detach().float()
        p = torch.softmax(z * s, dim=1)
        grad = s * float(((p * z).sum(1) - z.gather(1, y[:, None])[:, 0]).mean())
        if math.isfinite(grad):
            self.log_scale -= self.adam.delta(grad)


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
        std = getattr(self, "_std", None)  # cached until the next update (predict and update share it)
        if std is None:
            var = self.m2 / (self.n - 1)
            std = self._std = (var + 1e-2 * var.mean() + 1e-12).sqrt() * math.sqrt(x.shape[1])
        return ((x.double() - self.mean) / std).to(x.dtype)

    def update(self, x: torch.Tensor) -> None:
        """Chan et al.'s parallel update of mean and M2 with a chunk ``(C, D)``."""
        self._std = None
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
    _log_skip(who, skipped + 1)
    return False


def _log_skip(who: str, n: int) -> None:
    """Log the n-th skipped update the first time and then at powers of two."""
    if n & (n - 1) == 0:
        log.warning("%s: skipped an update with a non-finite loss or gradient (%d so far)", who, n)


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

    @property
    def _closed_form(self) -> bool:
        """Plain SGD on a linear head: steps without autograd (:meth:`_sgd_step_closed_form`)."""
        return (isinstance(self.head, nn.Linear) and type(self.opt) is torch.optim.SGD
                and self.opt.param_groups[0]["momentum"] == 0)

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
        if self._closed_form:
            ok = self._sgd_step_closed_form(x, y)
        else:
            ok = guarded_step(F.cross_entropy(self.logits(x), y), self.opt, self.name, self.skipped_updates)
        if not ok:
            self.skipped_updates += 1

    @torch.no_grad()
    def _sgd_step_closed_form(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """:func:`guarded_step` of plain SGD on a linear head, without autograd.

        The gradient of the mean cross-entropy of softmax regression has a closed form,
        ``dL/dz = (softmax(z) - onehot(y)) / B``, ``dL/dW = (dL/dz)^T x``, ``dL/db = sum_i dL/dz_i``,
        and SGD's weight decay adds ``wd * param``: the same step as ``torch.optim.SGD`` after
        ``backward()`` (to float rounding; ``tests/learners/test_common.py`` compares them), at a
        fraction of the cost: autograd and the optimizer were ~90% of a step of this learner and
        of the pooled learner's linear read-out. Returns whether the step was taken.
        """
        head = self.head
        xs = self.norm(x) if self.norm is not None else x
        z = xs @ head.weight.T + head.bias  # (B, K)
        g = torch.softmax(z, dim=1)
        g[torch.arange(len(y)), y] -= 1
        g /= len(y)
        # One scalar check instead of three full ones (they were half the step's cost): a NaN/inf
        # input or logit makes the sum non-finite, and when both are finite so are the gradients
        # (|g| <= 1). Conservative: inputs whose sum overflows (past ~3e38) also skip the step.
        if not bool(torch.isfinite(xs.sum() + z.sum())):
            _log_skip(self.name, self.skipped_updates + 1)
            return False
        group = self.opt.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        gw, gb = g.T @ xs, g.sum(0)  # (K, D), (K,)
        if wd:
            gw.add_(head.weight, alpha=wd)
            gb.add_(head.bias, alpha=wd)
        head.weight.sub_(gw, alpha=lr)
        head.bias.sub_(gb, alpha=lr)
        return True

    def observe(self, x: torch.Tensor) -> None:
        """Add a revealed chunk ``(C, D)`` to the input statistics (never a non-finite one:
        one bad input must not poison them)."""
        if self.norm is not None:
            xd = x.double()  # a sum of finite float32 values cannot overflow in float64: exact check
            if bool(torch.isfinite(xd.sum())):
                self.norm.update(xd)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        self.step(x, y)
        self.observe(x)
