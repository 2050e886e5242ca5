"""History of revealed examples and the replay-stream cursors that walk over it.

Replay streams (Bornschein et al. 2024, after Transformer-XL training): besides stream 0,
which always carries the newest chunk, R-1 cursors each read the already-revealed history
chunk by chunk, in stream order, with their own KV cache. Now and then a cursor jumps to
another point of the past (and its cache is reset), so over time each stream's position is
spread over the whole history: multi-epoch training that stays strictly sequential.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class History:
    """Append-only store of every revealed ``(x, y)``, in stream order.

    Buffers grow by doubling (amortised O(1) per example). Everything lives in memory on
    ``device``; a later issue moves the store to disk (memory-mapped) so memory stays flat
    on streams of millions of examples.

    Args:
        feature_dim: D.
        device: where the buffers live (the learner's device: replay chunks are gathered
            there without a transfer).
        capacity: initial number of rows.
    """

    def __init__(self, feature_dim: int, device: torch.device | str = "cpu", capacity: int = 1024) -> None:
        self.x = torch.empty((capacity, feature_dim), device=device)  # (N_cap, D)
        self.y = torch.empty((capacity,), device=device, dtype=torch.long)  # (N_cap,)
        self.n = 0  # number of revealed examples stored

    def __len__(self) -> int:
        return self.n

    def append(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Store a revealed chunk ``x (C, D)``, ``y (C,)``."""
        c = x.shape[0]
        if self.n + c > self.x.shape[0]:
            cap = max(2 * self.x.shape[0], self.n + c)
            new_x = torch.empty((cap, self.x.shape[1]), device=self.x.device)
            new_y = torch.empty((cap,), device=self.y.device, dtype=torch.long)
            new_x[: self.n] = self.x[: self.n]
            new_y[: self.n] = self.y[: self.n]
            self.x, self.y = new_x, new_y
        self.x[self.n : self.n + c] = x
        self.y[self.n : self.n + c] = y
        self.n += c

    def chunks(self, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``length`` consecutive examples from each start: ``(B, length, D)``, ``(B, length)``.

        Only revealed examples can be read: asserted (a violation would leak labels).
        """
        assert starts.min() >= 0 and int(starts.max()) + length <= self.n, (
            f"replay read [{starts.min()}, {starts.max() + length}) beyond the {self.n} revealed examples"
        )
        idx = torch.as_tensor(starts, device=self.x.device)[:, None] + torch.arange(length, device=self.x.device)
        return self.x[idx], self.y[idx]  # (B, length, D), (B, length)


@dataclass
class ReplayPlan:
    """What the replay streams read in one step (arrays over the R-1 replay streams).

    Attributes:
        active: streams that read a chunk this step (False while the history is too short).
        starts: first history index of each active stream's chunk.
        reset: streams that jumped this step; their KV caches must be emptied first.
    """

    active: np.ndarray
    starts: np.ndarray
    reset: np.ndarray


class ReplayCursors:
    """R-1 cursors over the revealed history, each walking forward one chunk per step.

    Reset rule (a jump always empties that stream's cache):

    - ``"prob"``: each step a cursor jumps, with probability ``min(1, C / n)`` (n = revealed
      examples), to a uniformly random earlier point. Positions then have the stationary
      density ``-log(1 - f)`` over the fraction f of the past: recency-weighted (mean 3/4;
      about half of the replay falls in the most recent quarter, 3% in the oldest).
    - ``"start"``: same random timing (the predecessor paper's 1/(t+2) per example), but the
      cursor goes back to the start of the stream; positions are then uniform over the past.

    (At jump rate C/t the time since a cursor's last jump is uniform over the past; it then
    walks forward at the stream's own pace.)

    Under both rules a cursor whose next chunk is not fully revealed (it reached the present)
    jumps too. Streams stay inactive until at least one chunk of history exists.

    Args:
        n_streams: R-1, the number of replay cursors.
        reset_rule: ``"prob"`` or ``"start"``.
        seed: seeds the cursors' own RNG (independent of torch's).
    """

    def __init__(self, n_streams: int, reset_rule: str = "prob", seed: int = 0) -> None:
        if reset_rule not in ("prob", "start"):
            raise ValueError(f"reset_rule must be 'prob' or 'start'; got {reset_rule!r}")
        self.n_streams = n_streams
        self.reset_rule = reset_rule
        self.rng = np.random.default_rng(seed)
        self.pos = np.full(n_streams, -1, dtype=np.int64)  # next history index to read; -1 = not started

    def step(self, n_revealed: int, length: int) -> ReplayPlan:
        """Advance every cursor by one chunk of ``length`` over ``n_revealed`` revealed examples."""
        n, c = n_revealed, length
        active = np.full(self.n_streams, n >= c)
        if n < c:
            return ReplayPlan(active, np.zeros(self.n_streams, dtype=np.int64), np.zeros(self.n_streams, bool))
        u = self.rng.random(self.n_streams)
        jump = (self.pos < 0) | (u < c / n)  # not started yet, or the C/t coin
        jump |= self.pos + c > n  # reached the present
        if self.reset_rule == "prob":
            targets = self.rng.integers(0, n - c + 1, size=self.n_streams)
        else:
            targets = np.zeros(self.n_streams, dtype=np.int64)
        starts = np.where(jump, targets, self.pos)
        assert (starts >= 0).all() and (starts + c <= n).all(), "replay must only read revealed examples"
        self.pos = starts + c
        return ReplayPlan(active, starts, jump)
