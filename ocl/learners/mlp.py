"""Online one-hidden-layer MLP head trained with one optimizer step per chunk."""

from __future__ import annotations

from ocl.learners.common import HeadLearner


class MLPLearner(HeadLearner):
    """One-hidden-layer MLP, one optimizer step per chunk on the chunk's mean loss.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: seeds the hidden layer's initialisation.
        hidden: hidden width H (``0`` gives a linear head).
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty.
        standardize: standardise inputs with running statistics of past inputs.

    Attributes:
        skipped_updates: steps skipped because the loss or a gradient was NaN/inf.
    """

    name = "mlp"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        seed: int = 0,
        hidden: int = 256,
        lr: float = 0.3,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        standardize: bool = True,
    ) -> None:
        super().__init__(feature_dim, num_classes, seed, hidden, lr, optimizer, momentum, weight_decay, standardize)
