"""Experience replay (ER) with a reservoir buffer (:class:`~ocl.learners.memory.ExampleBuffer`).

ER (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"): each update
takes one gradient step on the new chunk concatenated with a batch sampled from a
fixed-size memory of past examples; the memory is then updated by reservoir sampling, so
at any time it is a uniform sample of everything seen so far.
"""

from __future__ import annotations

import torch

from ocl.errors import OCLError
from ocl.learners.common import HeadLearner
from ocl.learners.memory import ExampleBuffer


class ERLearner(HeadLearner):
    """Experience replay over a linear or MLP head.

    Each :meth:`update` takes ``steps`` optimizer steps, each on the new chunk plus a
    fresh batch of ``replay_batch_size`` examples drawn from the memory of *earlier*
    chunks; then the chunk is offered to the reservoir memory.

    Args:
        feature_dim: D.
        num_classes: K.
        seed: seeds the head's initialisation, the reservoir and the replay sampling.
        buffer_size: memory capacity M (examples), preallocated.
        replay_batch_size: memory examples added to each step.
        steps: optimizer steps per chunk.
        hidden: hidden width of the head (``0`` = linear head).
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        standardize: standardise inputs with running statistics of past inputs; memory
            stores raw features and is standardised with the current statistics.
        buffer_policy: ``"reservoir"`` (uniform over the past) or ``"fifo"`` (most recent).

    Attributes:
        skipped_updates: steps skipped because the loss or a gradient was NaN/inf.
    """

    name = "er"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        seed: int = 0,
        buffer_size: int = 1000,
        replay_batch_size: int = 10,
        steps: int = 1,
        hidden: int = 0,
        lr: float = 0.5,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        standardize: bool = True,
        buffer_policy: str = "reservoir",
    ) -> None:
        if steps < 1 or replay_batch_size < 0:
            raise OCLError(f"er: need steps >= 1 and replay_batch_size >= 0; got {steps}, {replay_batch_size}.")
        super().__init__(feature_dim, num_classes, seed, hidden, lr, optimizer, momentum, weight_decay, standardize)
        self.buffer = ExampleBuffer(buffer_size, feature_dim, buffer_policy, seed)
        self.replay_batch_size = replay_batch_size
        self.steps = steps

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.check(x, y)
        for _ in range(self.steps):
            bx, by = self.buffer.sample(self.replay_batch_size)  # past chunks only
            self.step(torch.cat([x, bx]), torch.cat([y, by]))
        self.buffer.add(x, y)
        self.observe(x)
