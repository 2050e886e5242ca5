"""The pooled learner: any learners (experts) of the same features, combined by an online pool."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.learners.pooled.experts import build_experts
from ocl.learners.pooled.heldout import HeldOutPool
from ocl.learners.pooled.pools import make_pool


class PooledLearner(Learner):
    """Experts pooled online (see the package docstring).

    ``predict``: each expert predicts the chunk (``(C, K)`` log-probs; calibrated ones through
    their temperature), the pool combines the ``(M, C, K)`` stack. ``update``: the pool learns
    how each expert scored the chunk, then the held-out pool, then every expert learns the chunk
    as it would alone. ``evaluate``: the experts' ``evaluate``, combined with the held-out
    pool's weights (``heldout_mixture``), else the online ones.

    Args:
        feature_dim: D. num_classes: K. seed: every expert's seed, and the held-out pool's.
        experts: the learners to pool, names or mappings (:mod:`.experts`); default: the
            transformer with a linear read-out and SLDA (``configs/learner/pooled.yaml``).
        pool: ``loglinear`` (a product of experts, exponents fitted online) | ``fixed_share``
            (a Bayesian mixture following the recently best expert) (:mod:`.pools`).
        share: ``fixed_share``'s rate (how fast the weight can move back to an expert).
        temp_lr: Adam step size of the calibrated experts' temperatures.
        heldout_mixture: ``evaluate`` uses a second pool fitted on held-out scores (:mod:`.heldout`).
        heldout_scores: what it is fitted on: ``mixed`` | ``past`` | ``lagged``.
        heldout_lag: ``lagged``: how far ahead the held-out scores look, in examples.
        heldout_skip: ``past``/``mixed``: the newest examples never drawn as past ones (the
            default transformer's window, 64: examples still in its context are look-ups).
    """

    name = "pooled"

    def __init__(self, feature_dim: int, num_classes: int, seed: int = 0,
                 experts: Sequence[Any] = ("transformer", "linear", "slda"), pool: str = "loglinear",
                 share: float = 0.01, temp_lr: float = 0.01, heldout_mixture: bool = True,
                 heldout_scores: str = "mixed", heldout_lag: int = 100, heldout_skip: int = 64) -> None:
        super().__init__(feature_dim, num_classes, seed)
        if not 0 <= share < 1:
            raise OCLError(f"learner.share={share!r}: must be in [0, 1).")
        if not temp_lr >= 0:
            raise OCLError(f"learner.temp_lr={temp_lr!r}: must be >= 0.")
        self.expert_names, self.experts = build_experts(experts, feature_dim, num_classes, seed, temp_lr)
        M = len(self.experts)
        self.pool = make_pool(pool, M, share)
        self.heldout = HeldOutPool(make_pool(pool, M, share), heldout_scores, heldout_lag, heldout_skip, feature_dim,
                                   seed) if heldout_mixture else None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, the experts' scores of x)

    @property
    def skipped_updates(self) -> int | None:  # type: ignore[override]
        counts = [e.skipped_updates for e in self.experts if e.skipped_updates is not None]
        return sum(counts) if counts else None

    def set_workdir(self, path: Path) -> None:
        """Each expert keeps its side files in ``path/expert<i>-<name>``, the held-out pool its past
        in ``path/pooled_history.bin``."""
        for i, (name, expert) in enumerate(zip(self.expert_names, self.experts)):
            sub = os.path.join(path, f"expert{i}-{name}")
            os.makedirs(sub, exist_ok=True)
            expert.set_workdir(Path(sub))
        if self.heldout is not None:
            self.heldout.set_workdir(path)

    def on_task_boundary(self, task: int) -> None:
        for expert in self.experts:
            expert.on_task_boundary(task)

    def _scores(self, x: torch.Tensor, held_out: bool = False) -> torch.Tensor:
        """The experts' log-probs of ``x (C, D)`` (``predict``, or ``evaluate`` if ``held_out``),
        stacked ``(M, C, K)`` as the first expert's (float32 on ``x``'s device)."""
        scores = [e.evaluate(x) if held_out else e.predict(x) for e in self.experts]
        return torch.stack([s.to(scores[0]) for s in scores])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        scores = self._scores(x)
        self._pending = (x, scores)
        return self.pool.predict(scores)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        pending, self._pending = self._pending, None
        if pending is not None and (pending[0] is x or torch.equal(pending[0], x)):
            scores = pending[1]
        else:  # not the chunk just predicted: the experts score it now, as they would have
            with torch.no_grad():
                scores = self._scores(x)
        self.pool.update(scores, y)  # the pools learn how each expert scored the chunk, before any expert learns it
        if self.heldout is not None:
            self.heldout.update(scores, x, y, self.experts)
        for expert in self.experts:
            expert.update(x, y)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return (self.heldout or self.pool).predict(self._scores(x, held_out=True))

    def frozen(self) -> PooledLearner:
        snap = copy.copy(self)
        snap.experts = [e.frozen() for e in self.experts]
        snap.pool, snap._pending = copy.deepcopy(self.pool), None
        snap.heldout = self.heldout.frozen() if self.heldout is not None else None
        return snap
