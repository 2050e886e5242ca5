"""AdamW with global gradient-norm clipping over parameters kept in one flat buffer.

A learner that takes one optimizer step per example on a small network pays per tensor:
``clip_grad_norm_`` and ``torch.optim.AdamW.step`` loop over every parameter (about 40
here) in Python and launch kernels per tensor, and ``zero_grad`` frees and the backward
reallocates every gradient. Here every parameter is a view of one contiguous buffer
(ordered by group) and its ``.grad`` a view of a second one; AdamW's moments are two more
flat buffers. Zeroing the gradients is then one fill, clipping one norm (the fused kernel
divides the gradients by the clipping factor as it reads them: its ``grad_scale``), and the
AdamW step one fused kernel per group (``torch.optim.adamw.adamw``, the functional form of
``torch.optim.AdamW``: the same update). The backward accumulates into the gradient views
in place (autograd adds to an existing ``.grad``).

The parameters keep their identity, names and modules; only their storage moves. A
parameter that gets no gradient in a step has a zero one (AdamW still decays it, as it would
a parameter whose gradient is exactly zero).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.optim.adamw import adamw


class FlatAdamW:
    """AdamW (fused) over flat parameter groups, with ``clip_grad_norm_``'s clipping.

    Args:
        groups: ``(parameters, weight_decay)`` pairs; every parameter float32, on one device.
        betas, eps: AdamW's.
        grad_clip: max global gradient norm; 0 = no clipping.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[nn.Parameter], float]],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, grad_clip: float = 0.0) -> None:
        self.params = [p for ps, _ in groups for p in ps]
        self.betas, self.eps, self.grad_clip = betas, eps, grad_clip
        n = sum(p.numel() for p in self.params)
        like = dict(device=self.params[0].device, dtype=torch.float32)
        self.flat = torch.empty(n, **like)  # every parameter's storage
        self.flat_grad = torch.zeros(n, **like)  # every gradient's
        self.exp_avg, self.exp_avg_sq = torch.zeros(n, **like), torch.zeros(n, **like)  # AdamW's moments
        self.groups: list[tuple[slice, float, torch.Tensor]] = []  # (range in the buffers, weight decay, step)
        offset = 0
        for ps, weight_decay in groups:
            start = offset
            offset += sum(p.numel() for p in ps)
            # the fused kernel counts steps in a float32 tensor on the parameters' device
            self.groups.append((slice(start, offset), weight_decay, torch.zeros((), **like)))
        self._bind()

    @torch.no_grad()
    def _bind(self) -> None:
        """Make each parameter a view of ``flat`` (holding its current value) and its ``.grad`` a
        view of ``flat_grad``. Again after unpickling (pickled parameters do not carry their
        gradients) or a deep copy (which copies parameters apart from the buffer)."""
        offset = 0
        for p in self.params:
            view = self.flat[offset : offset + p.numel()].view_as(p)
            view.copy_(p)
            p.data = view
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_grad(self) -> None:
        """Zero every gradient (one fill), before a backward."""
        first = self.params[0]  # at offset 0 of both buffers
        if first.data_ptr() != self.flat.data_ptr() or first.grad is None or (
                first.grad.data_ptr() != self.flat_grad.data_ptr()):
            self._bind()
        self.flat_grad.zero_()

    @torch.no_grad()
    def step(self, lr: float | torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """Clip the global gradient norm to ``grad_clip``, then one AdamW step at ``lr``.

        ``skip``: a 0-dim bool tensor; where true, nothing changes (the kernel checks it on the
        device, so a captured step needs no host synchronisation). ``lr`` may be a 0-dim tensor
        on the parameters' device (a captured step reads it there)."""
        divide_by = None
        if self.grad_clip > 0:  # clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when that is < 1,
            norm = torch.linalg.vector_norm(self.flat_grad)  # here as the fused kernel's gradient divisor
            divide_by = ((norm + 1e-6) / self.grad_clip).clamp(min=1.0)
        for part, weight_decay, step in self.groups:
            adamw([self.flat[part]], [self.flat_grad[part]], [self.exp_avg[part]], [self.exp_avg_sq[part]], [],
                  [step], fused=True, grad_scale=divide_by, found_inf=None if skip is None else skip.float(),
                  amsgrad=False, beta1=self.betas[0],
                  beta2=self.betas[1], lr=lr, weight_decay=weight_decay, eps=self.eps, maximize=False)
