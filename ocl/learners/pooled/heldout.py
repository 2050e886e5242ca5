"""The held-out pool: the weights the pooled learner's ``evaluate`` combines its experts with.

Held-out predictions (test sets at task boundaries, near-future accuracy) are not the stream's
next example, so the expert that wins online by following the current run of labels need not
win there. :class:`HeldOutPool` is a second pool (``heldout_mixture``), fitted on held-out
scores of the experts (``heldout_scores``), through the :class:`~ocl.learners.base.Learner`
interface only:

- ``past``: examples of the revealed past, drawn uniformly from all but the newest
  ``heldout_skip`` (the transformer's context: an example still in it is a look-up, not a
  held-out one), scored by the experts' :meth:`~ocl.learners.base.Learner.evaluate` as they
  are: an evaluation on every class seen so far. Drawn in batches of :attr:`PAST_BATCH`,
  learned from one per chunk. The past lives in the pool's own
  :class:`~ocl.learners.memory.History` (a side file in the run directory);
- ``mixed`` (default): those, and the newest chunk as the online pool scored it, one step each
  (between the two: near-future accuracy wants the current task, a test set every class seen);
- ``lagged``: the newest chunk as the experts' ``evaluate`` would have scored it ``lag`` to
  ``2 lag`` examples earlier: :meth:`~ocl.learners.base.Learner.frozen` copies of the experts,
  renewed every ``lag`` examples.

Prequential like the online pool: it learns from a chunk (and past examples) only in
``update``, after the chunk was scored, before the experts learn it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.learners.memory import History
from ocl.learners.pooled.pools import FixedShare, LogLinearPool

#: The ``heldout_scores`` option's values.
HELDOUT_SCORES = ("mixed", "past", "lagged")


class HeldOutPool:
    """A pool fitted on held-out scores of the experts (see the module docstring).

    Args:
        pool: the (fresh) pool whose weights ``evaluate`` uses.
        scores: one of :data:`HELDOUT_SCORES`. lag: ``lagged``'s renewal period, in examples.
        skip: ``past``/``mixed``: the newest examples never drawn.
        feature_dim: D (the past's store). seed: seeds which past examples are drawn.
    """

    #: past|mixed: past examples scored per batch, then learned from one per chunk. Scoring with
    #: the transformer's network one example at a time cost 18-21% of a step at C = 1; one batch
    #: per 16 examples 2-7% (side by side, scripts/bench_speed.py), and the scores the pool learns
    #: from are at most 15 examples staler.
    PAST_BATCH = 16

    def __init__(self, pool: FixedShare | LogLinearPool, scores: str, lag: int, skip: int, feature_dim: int,
                 seed: int) -> None:
        if scores not in HELDOUT_SCORES:
            raise OCLError(f"learner.heldout_scores={scores!r}: must be one of {list(HELDOUT_SCORES)}.")
        if lag < 1:
            raise OCLError(f"learner.heldout_lag={lag!r}: must be >= 1.")
        if skip < 0:
            raise OCLError(f"learner.heldout_skip={skip!r}: must be >= 0.")
        self.pool, self.scores, self.lag, self.skip = pool, scores, lag, skip
        self.history = History(feature_dim) if scores != "lagged" else None  # the revealed past
        self._rng = np.random.default_rng([seed, 1])  # which past examples
        self._past: list[tuple[torch.Tensor, torch.Tensor]] = []  # scored past examples still to learn from
        self._lagged: list[Learner] | None = None  # frozen experts, lag to 2 lag examples old
        self._newest: list[Learner] | None = None  # the newest frozen ones
        self._frozen_at = 0  # the example count they were made at
        self.t = 0  # examples learned

    def set_workdir(self, path: Path) -> None:
        if self.history is not None:
            self.history.relocate(os.path.join(path, "pooled_history.bin"))

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        """The held-out pool of the experts' ``scores (M, N, K)``: log-probs ``(N, K)``."""
        return self.pool.predict(scores)

    def _freeze(self, experts: Sequence[Learner]) -> list[Learner]:
        self._frozen_at = self.t
        return [e.frozen() for e in experts]

    @staticmethod
    def _evaluate(experts: Sequence[Learner], x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The experts' held-out log-probs of ``x (N, D)``, ``(M, N, K)`` as ``like``."""
        return torch.stack([e.evaluate(x).to(like) for e in experts])

    def update(self, scores: torch.Tensor, x: torch.Tensor, y: torch.Tensor, experts: Sequence[Learner]) -> None:
        """After a chunk ``x (C, D)``, ``y (C,)`` was scored online with ``scores (M, C, K)``, before
        the ``experts`` learn it: one step on the held-out scores (and, past|mixed, the chunk
        joins the past; ``lagged``: the experts are copied every ``lag`` examples)."""
        if self.scores == "lagged":
            if self._lagged is None:  # the first chunk: nothing learned yet
                self._lagged = self._newest = self._freeze(experts)
            elif self.t // self.lag > self._frozen_at // self.lag:  # a multiple of lag passed since the newest
                self._lagged, self._newest = self._newest, self._freeze(experts)
            self.pool.update(self._evaluate(self._lagged, x, scores), y)
        else:
            if self.scores == "mixed":  # the newest chunk as the online pool saw it, too
                self.pool.update(scores, y)
            if not self._past:
                past = self.history.sample(self._rng, self.t - self.skip, x.device, self.PAST_BATCH)
                if past is not None:
                    xo, yo = past
                    held = self._evaluate(experts, xo, scores)  # (M, P, K)
                    self._past = list(zip(held.split(1, dim=1), yo.split(1)))  # [((M, 1, K), (1,))] * P
            if self._past:
                self.pool.update(*self._past.pop(0))
            self.history.append(x, y)
        self.t += x.shape[0]

    def frozen(self) -> HeldOutPool:
        """A copy whose :meth:`predict` stays what it is now (it cannot learn: no past)."""
        snap = copy.copy(self)
        snap.pool, snap.history, snap._past, snap._lagged, snap._newest = copy.deepcopy(self.pool), None, [], None, None
        return snap
