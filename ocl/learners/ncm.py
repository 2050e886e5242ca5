"""Nearest class mean with running means."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.learners.base import Learner


class NCMLearner(Learner):
    """Nearest class mean: a running mean per class, softmax over negative distances.

    For the classes seen so far::

        p(c | x) = (1 - floor) * softmax_c(-||x - mu_c||^2 / temperature) + floor / K

    and classes never seen get only ``floor / K``. The uniform mixture keeps log-loss finite
    when the nearest mean is confidently wrong; before any label, the prediction is uniform.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: unused (NCM is deterministic) but accepted for uniformity.
        temperature: softmax temperature on squared distances; smaller = more confident.
            The default suits L2-normalised features (squared distances in [0, 4]).
        normalize: L2-normalise features before averaging and measuring distances
            (cosine NCM, the usual choice for pretrained features).
        floor: weight of the uniform mixture (probability floor, in (0, 1)).
    """

    name = "ncm"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        seed: int = 0,
        temperature: float = 0.03,
        normalize: bool = True,
        floor: float = 0.01,
    ) -> None:
        if temperature <= 0 or not 0 < floor < 1:
            raise OCLError(f"ncm: need temperature > 0 and 0 < floor < 1; got {temperature}, {floor}.")
        super().__init__(feature_dim, num_classes, seed)
        self.temperature = temperature
        self.normalize = normalize
        self.floor = floor
        self.sums = torch.zeros(num_classes, feature_dim, dtype=torch.float64)  # (K, D)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)  # (K,)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return F.normalize(x, dim=1) if self.normalize else x

    @property
    def means(self) -> torch.Tensor:
        """``(K, D)`` class means (rows of unseen classes are zero)."""
        return self.sums / self.counts.clamp_min(1)[:, None]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        c, k = x.shape[0], self.num_classes
        seen = self.counts > 0  # (K,)
        if not bool(seen.any()):
            return torch.full((c, k), -math.log(k))
        d2 = torch.cdist(self._prep(x), self.means[seen]).square()  # (C, K_seen)
        p_seen = torch.softmax(-d2 / self.temperature, dim=1)
        p = torch.full((c, k), self.floor / k, dtype=torch.float64)
        p[:, seen] += (1 - self.floor) * p_seen
        return p.log().float()

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        self.sums.index_add_(0, y, self._prep(x))
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
