"""Bounded example memories of revealed ``(x, y)`` pairs (replay buffers, kNN memories)."""

from __future__ import annotations

import torch

from ocl.errors import OCLError


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
