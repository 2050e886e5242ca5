"""RanDumb (Prabhu et al. 2024, "RanDumb: Random Representations Outperform Online Continually
Learned Representations") on frozen features: random Fourier features and streaming LDA."""

from __future__ import annotations

import torch

from ocl.learners.random_features import RandomFeatureLearner, RandomFeatures
from ocl.learners.slda import SLDALearner


class RanDumbLearner(RandomFeatureLearner):
    """RanDumb: random Fourier features ``h(x)`` (an RBF kernel's, frozen, seeded), then a
    Mahalanobis nearest-class-mean classifier with running class means and a running, shrunk
    covariance, one example at a time, no exemplars. That classifier is streaming LDA with equal
    priors, ``argmin_k (h - mu_k)^T Sigma_s^-1 (h - mu_k)``, so it *is*
    :class:`~ocl.learners.slda.SLDALearner` on ``h`` (exact statistics; precision refreshed
    lazily, ``refresh_every``), calibrated by an online temperature
    (:class:`~ocl.learners.random_features.RandomFeatureLearner`).

    What differs from the paper: it embeds raw pixels into ~25,000 dimensions; on D = 1,280
    pretrained features the default M = 2,048 (the covariance costs M^2 memory and M^2 per example,
    its inversion M^3 per refresh; the table in the docs shows what a larger M buys). Its covariance
    is that of all examples; SLDA's is the pooled within-class one (the same up to the between-class
    part, which a class-mean classifier does not want in its metric). The features are
    L2-normalised before the map so that one ``gamma`` fits any backbone.

    Args:
        feature_dim, num_classes, seed: as every learner's (``seed`` draws the map).
        dim: M, the number of random Fourier features.
        gamma: RBF width ``exp(-gamma ||x - x'||^2)`` on L2-normalised features.
        shrinkage: SLDA's covariance shrinkage towards ``(tr Sigma / M) I``.
        refresh_every: SLDA's examples between precision inversions (``"auto"``: ``ceil(M^2 / 2^14)``).
        precision_dtype: SLDA's (``"float32"`` or ``"float64"``).
        floor: weight of the uniform mixture.
        temp_lr, temp_init: the online temperature.
    """

    name = "randumb"

    def __init__(self, feature_dim: int, num_classes: int, seed: int = 0, dim: int = 2048, gamma: float = 1.0,
                 shrinkage: float = 0.1, refresh_every: int | str = "auto", precision_dtype: str = "float32",
                 floor: float = 0.01, temp_lr: float = 0.01, temp_init: float = 1.0) -> None:
        features = RandomFeatures(feature_dim, dim, seed, kind="fourier", gamma=gamma, normalize=True)
        self.lda = SLDALearner(dim, num_classes, seed, shrinkage=shrinkage, priors=False, floor=floor,
                               refresh_every=refresh_every, precision_dtype=precision_dtype)
        super().__init__(feature_dim, num_classes, seed, features, floor, temp_lr, temp_init)

    def seen(self) -> torch.Tensor:
        return self.lda.counts > 0

    def scores(self, h: torch.Tensor, for_update: bool = False) -> torch.Tensor:
        return self.lda.scores(h)

    def learn(self, h: torch.Tensor, y: torch.Tensor) -> None:
        self.lda.update(h, y)
