"""Memories of revealed ``(x, y)`` pairs: bounded ones (:class:`ExampleBuffer`: replay buffers,
kNN memories) and the whole revealed past on disk (:class:`History`: the transformer's replay
streams, the pooled learner's held-out scoring)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ocl.errors import OCLError
from ocl.sidefile import RecordFile


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
