"""Experience replay (ER) with a reservoir buffer, and the bounded example memory it uses.

ER (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"): each update
takes one gradient step on the new chunk concatenated with a batch sampled from a
fixed-size memory of past examples; the memory is then updated by reservoir sampling, so
at any time it is a uniform sample of everything seen so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.learners.linear import RunningStandardizer
from ocl.learners.mlp import make_head, make_optimizer


class ExampleBuffer:
    """Fixed-capacity memory of ``(x, y)`` pairs, preallocated, filled by a policy.

    Policies:
        ``reservoir``: Vitter's algorithm R. Example number ``n`` (0-based) is stored while
            the buffer is not full, afterwards it replaces a uniformly chosen slot with
            probability ``capacity / (n + 1)``: every example seen so far is in the buffer
            with the same probability.
        ``fifo``: a ring buffer holding the most recent ``capacity`` examples.

    Args:
        capacity: maximum number of examples kept.
        dim: D, the feature size.
        policy: ``"reservoir"`` or ``"fifo"``.
        seed: seeds the reservoir's slot choices and :meth:`sample`.
    """

    def __init__(self, capacity: int, dim: int, policy: str = "reservoir", seed: int = 0) -> None:
        if capacity < 1:
            raise OCLError(f"buffer capacity must be >= 1; got {capacity}.")
        if policy not in ("reservoir", "fifo"):
            raise OCLError(f"buffer policy must be 'reservoir' or 'fifo'; got {policy!r}.")
        self.capacity = capacity
        self.policy = policy
        self.x = torch.zeros(capacity, dim)  # (M, D) preallocated: memory never grows
        self.y = torch.zeros(capacity, dtype=torch.long)  # (M,)
        self.size = 0  # filled slots
        self.seen = 0  # examples offered so far
        self.gen = torch.Generator().manual_seed(seed)

    def _slots(self, c: int) -> tuple[list[int], list[int]]:
        """Destination slot for each of ``c`` new examples; rows that are dropped are skipped.

        If two rows of one chunk pick the same slot, only the later one is kept (exactly
        as if they were added one at a time).
        """
        n = torch.arange(self.seen, self.seen + c)  # stream position of each new row
        if self.policy == "fifo":
            dest = n % self.capacity
        else:
            u = torch.rand(c, generator=self.gen, dtype=torch.float64)
            j = (u * (n + 1)).long()  # uniform in [0, n]
            dest = torch.where(n < self.capacity, n, j)
        last: dict[int, int] = {}
        for row, slot in enumerate(dest.tolist()):
            if slot < self.capacity:
                last[slot] = row  # a later row overwrites an earlier one
        return list(last.values()), list(last.keys())

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer a chunk ``x: (C, D)``, ``y: (C,)`` to the memory."""
        rows, slots = self._slots(x.shape[0])
        if rows:
            self.x[slots] = x[rows].to(self.x.dtype)
            self.y[slots] = y[rows]
        self.seen += x.shape[0]
        self.size = min(self.seen, self.capacity)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` distinct stored examples, uniformly: ``(n', D)``, ``(n',)``."""
        if n >= self.size:
            idx = torch.arange(self.size)
        else:
            idx = torch.randperm(self.size, generator=self.gen)[:n]
        return self.x[idx], self.y[idx]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the filled part: ``(size, D)``, ``(size,)`` (slot order, not stream order)."""
        return self.x[: self.size], self.y[: self.size]


class ERLearner(Learner):
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
        self.head = make_head(feature_dim, num_classes, hidden, seed)
        self.opt = make_optimizer(optimizer, self.head.parameters(), lr, momentum, weight_decay)
        self.norm = RunningStandardizer(feature_dim) if standardize else None
        self.buffer = ExampleBuffer(buffer_size, feature_dim, buffer_policy, seed)
        self.replay_batch_size = replay_batch_size
        self.steps = steps

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x) if self.norm is not None else x)  # (C, K)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self._logits(x), dim=1)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for _ in range(self.steps):
            bx, by = self.buffer.sample(self.replay_batch_size)  # past chunks only
            loss = F.cross_entropy(self._logits(torch.cat([x, bx])), torch.cat([y, by]))
            self.opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                self.opt.step()
        self.buffer.add(x, y)
        if self.norm is not None:
            self.norm.update(x)
