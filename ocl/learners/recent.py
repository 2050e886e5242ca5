"""A blind baseline: predict the label distribution of the most recent revealed labels.

It never looks at ``x``. On a stream whose labels are correlated in time (class-incremental
splits, video-like streams such as CLOC) it scores far above chance for free, so any
learner has to beat it before its use of the inputs means anything.
"""

from __future__ import annotations

import torch

from ocl.errors import OCLError
from ocl.learners.base import Learner


class RecentLabelsLearner(Learner):
    """Predicts ``p(c) = (count_c + alpha) / (n + K * alpha)`` over the last ``window`` labels.

    ``n = min(window, labels seen)``; with no label yet the prediction is uniform. Every
    example of a chunk gets the same distribution (its labels are not revealed yet).

    Args:
        feature_dim: D (unused: the predictor is blind).
        num_classes: K.
        seed: unused but accepted for uniformity.
        window: N, how many of the most recent labels are counted.
        alpha: add-alpha smoothing (the probability floor; > 0 keeps log-loss finite).
    """

    name = "recent"

    def __init__(
        self, feature_dim: int, num_classes: int, seed: int = 0, window: int = 100, alpha: float = 0.5
    ) -> None:
        if window < 1 or alpha <= 0:
            raise OCLError(f"recent: need window >= 1 and alpha > 0; got {window}, {alpha}.")
        super().__init__(feature_dim, num_classes, seed)
        self.window = window
        self.alpha = alpha
        self.labels = torch.zeros(window, dtype=torch.long)  # ring buffer of the last N labels
        self.counts = torch.zeros(num_classes, dtype=torch.float64)  # (K,) counts in the window
        self.seen = 0

    def distribution(self) -> torch.Tensor:
        """``(K,)`` the current smoothed label distribution."""
        n = min(self.seen, self.window)
        return (self.counts + self.alpha) / (n + self.num_classes * self.alpha)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.distribution().log().float().expand(x.shape[0], -1).clone()

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        for label in y[-self.window :].tolist():  # only the last N of a long chunk can matter
            slot = self.seen % self.window
            if self.seen >= self.window:
                self.counts[self.labels[slot]] -= 1  # evict the label N steps back
            self.labels[slot] = label
            self.counts[label] += 1
            self.seen += 1
