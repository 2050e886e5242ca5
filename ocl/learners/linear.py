"""Online softmax regression trained with SGD: the simplest baseline over features."""

from __future__ import annotations

from ocl.learners.common import HeadLearner


class LinearLearner(HeadLearner):
    """Online multinomial logistic regression: one SGD step per chunk on its mean loss.

    The weights start at zero: the first prediction is uniform (log-loss log K), the honest
    prior. The SGD step is computed in closed form, without autograd
    (:meth:`~ocl.learners.common.HeadLearner._sgd_step_closed_form`): the same step, several
    times cheaper.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: unused (zero initialisation is deterministic) but accepted for uniformity.
        lr: SGD learning rate.
        standardize: standardise inputs with running statistics of past inputs; makes one
            learning rate work for pixels and for ViT features of very different scales.
        weight_decay: L2 penalty.

    Attributes:
        skipped_updates: steps skipped because the loss or a gradient was NaN/inf.
    """

    name = "linear"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        seed: int = 0,
        lr: float = 1.0,
        standardize: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(feature_dim, num_classes, seed, hidden=0, lr=lr, weight_decay=weight_decay,
                         standardize=standardize)
