"""RanPAC (McDonnell et al., NeurIPS 2023, "RanPAC: Random Projections and Pre-trained Models for
Continual Learning") on frozen features: a random ReLU projection and streaming ridge regression."""

from __future__ import annotations

import torch

from ocl.errors import OCLError
from ocl.learners.random_features import RandomFeatureLearner, RandomFeatures
from ocl.learners.ridge import StreamingRidge, log_grid

#: The paper's ridge grid (its code: ``10.0 ** np.arange(-8, 14)``).
PAPER_LAMBDAS: tuple[float, ...] = tuple(log_grid(-8, 13))


class RanPACLearner(RandomFeatureLearner):
    """RanPAC: ``h = relu(x W)`` with a frozen seeded ``W`` (D, M), then class prototypes
    decorrelated by the Gram matrix, i.e. ridge regression of one-hot labels on ``h``:
    ``score(x) = h (G + lam I)^-1 C`` with ``G = sum h h^T``, ``C = sum h onehot(y)^T`` over the
    examples learned so far (:class:`~ocl.learners.ridge.StreamingRidge`: exact after every chunk,
    O(M^2) per example, ``lam`` chosen from ``lambdas`` by prequential accuracy on examples already
    learned), calibrated by an online temperature
    (:class:`~ocl.learners.random_features.RandomFeatureLearner`).

    What the paper does that this does not: adapt the backbone on the first task (its "phase 1",
    parameter-efficient fine-tuning): our features are frozen; and pick ``lam`` once, on an 80/20
    split of the first task's training data: a stream has no training set, so the choice is made
    online from labels already revealed, and revised as the stream goes on.

    Args:
        feature_dim, num_classes, seed: as every learner's (``seed`` draws ``W``).
        dim: M, the projection's width (paper: 10,000 on ViT-B features, D = 768; ours 2,048:
            on D = 1,280 features, M = 2,048 runs at a few hundred examples/s on one thread; the
            cost grows as M^2 per example plus M^3 per refresh).
        lambdas: the ridge grid (the paper's, ``1e-8 ... 1e13``).
        initial_lambda: the strength used before the first choice (a member of ``lambdas``).
        refresh_every: examples between eigendecompositions once they are that far apart
            (``"auto"``: M; see :class:`~ocl.learners.ridge.StreamingRidge`).
        first_refresh: examples before the first eigendecomposition (and the first choice of ``lam``).
        precision_dtype: of the eigendecomposition and the O(M^2) products (statistics are float64):
            ``"float32"`` is about twice as fast; ``"float64"`` matches a direct float64 solve to ~1e-9.
        floor: weight of the uniform mixture.
        temp_lr, temp_init: the online temperature (ridge scores of one-hot targets lie in ~[0, 1]:
            it starts at 10 rather than 1 so that early predictions are not near-uniform).
    """

    name = "ranpac"

    def __init__(self, feature_dim: int, num_classes: int, seed: int = 0, dim: int = 2048,
                 lambdas: list[float] | tuple[float, ...] = PAPER_LAMBDAS, initial_lambda: float = 1.0,
                 refresh_every: int | str = "auto", first_refresh: int = 64, precision_dtype: str = "float32",
                 floor: float = 0.01,
                 temp_lr: float = 0.01, temp_init: float = 10.0) -> None:
        lambdas = [float(v) for v in lambdas]
        if refresh_every == "auto":
            refresh_every = dim
        if not isinstance(refresh_every, int) or initial_lambda not in lambdas:
            raise OCLError(f"ranpac: refresh_every must be an integer >= 1 or 'auto', and initial_lambda one of "
                           f"lambdas; got {refresh_every!r}, {initial_lambda!r} (lambdas {lambdas}).")
        features = RandomFeatures(feature_dim, dim, seed, kind="relu")
        super().__init__(feature_dim, num_classes, seed, features, floor, temp_lr, temp_init)
        self.ridge = StreamingRidge(dim, num_classes, lambdas, lambdas.index(initial_lambda), refresh_every,
                                    first_refresh, precision_dtype)

    def seen(self) -> torch.Tensor:
        return self.ridge.counts > 0

    def scores(self, h: torch.Tensor, for_update: bool = False) -> torch.Tensor:
        return self.ridge.logits(h, keep=for_update)[:, self.seen()]

    def learn(self, h: torch.Tensor, y: torch.Tensor) -> None:
        self.ridge.update(h, y)
