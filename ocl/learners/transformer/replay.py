"""History of revealed examples and the replay-stream cursors that walk over it.

Replay streams (Bornschein et al. 2024, after Transformer-XL training): besides stream 0,
which always carries the newest chunk, R-1 cursors each read the already-revealed history
chunk by chunk, in stream order, with their own KV cache. Now and then a cursor jumps to
another point of the past (and its cache is reset), so over time each stream's position is
spread over the whole history: multi-epoch training that stays strictly sequential.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ocl.errors import OCLError
from ocl.sidefile import RecordFile


class History:
    """Append-only store of every revealed ``(x, y)``, in stream order, kept in a file.

    Replay needs exact access to the whole revealed past (a cursor may jump back to the
    start), so nothing can be dropped; but nothing needs to be in memory either. Each
    example is one fixed-size record (``D`` float32 features + an int64 label) appended with
    ``pwrite`` and read back with ``pread`` (one read per replay chunk); the file is never
    memory-mapped, so the process's memory stays flat however long the stream (the OS page
    cache keeps recent records fast). On a 2-core CPU the reads cost ~10 us per replay
    chunk, against milliseconds for the transformer step.

    Args:
        feature_dim: D.
        device: where :meth:`chunks` returns its tensors (the learner's device).
        capacity: unused (kept for callers of the earlier in-memory store).
        path: the file; ``None`` uses an anonymous temporary file that disappears with the
            process (see :meth:`relocate` to put it in a run directory, which checkpoints need).

    The file is a :class:`~ocl.sidefile.RecordFile`: a checkpoint stores its path relative to
    the run directory, the count ``n`` and the sha256 of records ``[0, n)`` (fsynced first,
    never rewritten afterwards), not the data; resuming verifies them. An anonymous-file
    history pickles its data instead.
    """

    def __init__(self, feature_dim: int, device: torch.device | str = "cpu", capacity: int = 1024,
                 path: str | os.PathLike | None = None) -> None:
        self.D = int(feature_dim)
        self.device = torch.device(device)
        self.n = 0  # number of revealed examples stored
        self._file = RecordFile(path, self.record, "the replay history")

    @property
    def record(self) -> np.dtype:
        """One stored example: ``x (D,) float32`` and ``y int64``."""
        return np.dtype([("x", "<f4", (self.D,)), ("y", "<i8")])

    @property
    def path(self) -> str | None:
        return self._file.path

    def relocate(self, path: str | os.PathLike) -> None:
        """Keep the store in ``path`` (e.g. inside the run directory). Only before any append."""
        if self.n:
            raise RuntimeError("History.relocate must be called before anything is stored")
        self._file.close()
        self._file = RecordFile(path, self.record, "the replay history")

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return self.n

    def append(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Store a revealed chunk ``x (C, D)``, ``y (C,)``."""
        c = x.shape[0]
        rec = np.empty(c, dtype=self.record)
        rec["x"] = x.detach().to("cpu", torch.float32).numpy()
        rec["y"] = y.detach().cpu().numpy()
        self._file.append_records(rec)
        self.n += c

    def chunks(self, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``length`` consecutive examples from each start: ``(B, length, D)``, ``(B, length)``.

        Only revealed examples can be read: asserted (a violation would leak labels).
        """
        assert starts.min() >= 0 and int(starts.max()) + length <= self.n, (
            f"replay read [{starts.min()}, {starts.max() + length}) beyond the {self.n} revealed examples"
        )
        rec = self._file.read(starts, length)  # (B, length)
        x = torch.from_numpy(rec["x"].copy()).to(self.device)  # (B, length, D), a writable copy
        y = torch.from_numpy(rec["y"].copy()).to(self.device)  # (B, length)
        return x, y

    def sample(self, rng: np.random.Generator, end: int, device: torch.device | str, n: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``n`` examples of ``[0, end)`` drawn uniformly (with replacement) with ``rng``: ``(n, D)``,
        ``(n,)`` on ``device``; None when ``end <= 0``. Only ever revealed ones (``end`` is checked like
        :meth:`chunks`)."""
        if end <= 0:
            return None
        x, y = self.chunks(rng.integers(0, end, size=n), 1)  # (n, 1, D), (n, 1)
        return x[:, 0].to(device), y[:, 0].to(device)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # the SideFile verified its bytes while unpickling
        if len(self._file) != self.n or self._file.size != self.n * self.record.itemsize:
            raise OCLError(f"{self._file.where}: the checkpoint counts {self.n} replay examples but "
                           f"{self._file.size} bytes; start the run afresh in a new directory.")


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
