"""The replay-stream cursors that walk over the history of revealed examples
(:class:`~ocl.learners.memory.History`).

Replay streams (Bornschein et al. 2024, after Transformer-XL training): besides stream 0,
which always carries the newest chunk, R-1 cursors each read the already-revealed history
chunk by chunk, in stream order, with their own KV cache. Now and then a cursor jumps to
another point of the past (and its cache is reset), so over time each stream's position is
spread over the whole history: multi-epoch training that stays strictly sequential.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

import torch

from ocl.learners.memory import History  # noqa: F401  (the store the replay streams read)


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
    after: tuple[np.ndarray, dict[str, Any]] | None = None  # cursor positions and RNG state once taken


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
        plan = self.plan(n_revealed, length)
        self.commit(plan)
        return plan

    def plan(self, n_revealed: int, length: int) -> ReplayPlan:
        """What :meth:`step` would do, without doing it: the cursors stay where they are until
        :meth:`commit`. (The transformer plans in ``predict``, where it may run the training
        forward, and commits in ``update``; a second ``plan`` before that gives the same plan.)"""
        n, c = n_revealed, length
        active = np.full(self.n_streams, n >= c)
        if n < c:
            return ReplayPlan(active, np.zeros(self.n_streams, dtype=np.int64), np.zeros(self.n_streams, bool))
        state = self.rng.bit_generator.state
        u = self.rng.random(self.n_streams)
        jump = (self.pos < 0) | (u < c / n)  # not started yet, or the C/t coin
        jump |= self.pos + c > n  # reached the present
        if self.reset_rule == "prob":
            targets = self.rng.integers(0, n - c + 1, size=self.n_streams)
        else:
            targets = np.zeros(self.n_streams, dtype=np.int64)
        after = self.rng.bit_generator.state
        self.rng.bit_generator.state = state  # planning draws nothing for good
        starts = np.where(jump, targets, self.pos)
        assert (starts >= 0).all() and (starts + c <= n).all(), "replay must only read revealed examples"
        return ReplayPlan(active, starts, jump, (starts + c, after))

    def commit(self, plan: ReplayPlan) -> None:
        """Take a plan of :meth:`plan` (made from the current state): the cursors move on."""
        if plan.after is not None:
            self.pos, self.rng.bit_generator.state = plan.after


class StepBatch(NamedTuple):
    """The inputs of one training forward: stream 0 (the new chunk) and, once there is history,
    the R-1 replay streams' chunks (B = 1 or R; stream b is cache row b)."""

    plan: ReplayPlan  # the replay streams' chunks (committed when the step is taken)
    xs: torch.Tensor  # (B, C, D)
    ys: torch.Tensor  # (B, C) labels; stream 0's are "unknown" (K) until they are revealed
    pos: torch.Tensor  # (B, C) example positions in each stream
    ctx_pos: torch.Tensor  # (B, S) token positions of the streams' cache slots; -1: empty, or the stream jumps
    q_lo: torch.Tensor | None = None  # (B, T) lowest token position each query sees (segment > 1), else None


@functools.lru_cache(maxsize=64)  # made once per shape: the training step only reads it (never modify it)
def stream_weights(B: int, C: int, w0: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Loss weight of each example of a step over B streams of C examples, ``(B, 1)``: stream 0's
    (the newest chunk's) share ``w0``, the replay streams' share the rest equally, so the step's
    loss is ``(ce (B, C) * weights).sum()``: one product and one sum, not per-stream means."""
    w = torch.full((B, 1), (1 - w0) / ((B - 1) * C), device=device)
    w[0] = w0 / C
    return w
