"""Recording a prequential run: every step's outcome (:class:`Tracker`, in memory or in an
append-only file) and the near-future evaluations (:class:`NearFutureTracker`).

Conventions: losses are natural-log (nats); a prediction is scored before the learner sees
its label.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Iterator

import numpy as np
import torch

from ocl.sidefile import RecordFile


def score(logp: torch.Tensor, y: torch.Tensor, out: np.ndarray) -> int:
    """Score predictions into the records ``out`` (fields ``loss``, ``p_true``, ``pred``, ``label``).

    Args:
        logp: ``(C, K)`` log-probabilities.
        y: ``(C,)`` true labels.
        out: ``(C,)`` structured array to fill.
    Returns:
        how many predictions were not finite: they are scored as probability ~0 (loss ~69
        nats) rather than poisoning the sums.
    """
    logp = logp.detach().float().cpu()
    y = y.cpu()
    lp_true = logp.gather(1, y[:, None])[:, 0].double()
    bad = ~torch.isfinite(lp_true)
    n_bad = int(bad.sum())
    if n_bad:
        lp_true = torch.where(bad, torch.full_like(lp_true, math.log(1e-30)), lp_true)
    out["loss"] = (-lp_true).numpy()
    out["p_true"] = lp_true.exp().numpy()
    out["pred"] = logp.argmax(1).numpy()
    out["label"] = y.numpy()
    return n_bad


#: One per-step record: loss (nats), probability of the true label, predicted and true label, task.
STEP_DTYPE = np.dtype([("loss", "<f8"), ("p_true", "<f4"), ("pred", "<i8"), ("label", "<i8"), ("task", "<i8")])
_BLOCK = 1 << 16  # steps per block when streaming records from disk (~2.4 MB)


class Tracker:
    """Records per-step prequential outcomes (fixed memory).

    Call :meth:`record` with each chunk's log-probabilities *before* the learner sees
    the chunk's labels.

    Two storages, same interface:

    - in memory (``path=None``): one preallocated ``(n,)`` structured array of
      :data:`STEP_DTYPE` (36 bytes per step; fine for tests and short streams);
    - on disk (``path`` given): an ``.npy`` file of ``(n,)`` :data:`STEP_DTYPE` records,
      appended chunk by chunk to a :class:`~ocl.sidefile.RecordFile` (``pwrite``, never
      mapped; checkpoints refer to it by relative path and checksum), so the process's memory does
      not grow with the stream. Everything that reads the records (:meth:`summary`,
      :meth:`blocks`, the CSV writer) streams them in blocks. The file is a plain
      ``np.load``-able structured array once the run is complete.

    Args:
        n: total number of steps the stream will have.
        tasks: ``(n,)`` task index of each step (stored with each record).
        path: the ``.npy`` file for on-disk records, or ``None`` for memory.
        resume: do not create ``path``: its records come, verified, with the checkpoint's
            state (see :meth:`load_state_dict`).
    """

    def __init__(self, n: int, tasks: np.ndarray | None = None, path: str | None = None,
                 resume: bool = False) -> None:
        self.n = n
        self.t = 0
        self.nonfinite = 0  # predictions that were NaN/inf (scored as the worst case)
        self._tasks = np.zeros(n, dtype=np.int64) if tasks is None else np.asarray(tasks, dtype=np.int64)
        self.path = None if path is None else os.path.abspath(path)
        self._mem: np.ndarray | None = None
        self._file: RecordFile | None = None
        if self.path is None:
            self._mem = np.zeros(n, dtype=STEP_DTYPE)
            self._mem["task"] = self._tasks
            return
        if not resume:
            # A valid .npy header for (n,) records; records are appended as they come. The whole
            # file is allocated now: a disk too small for the run is refused at its start.
            header = _npy_header(n)
            self._file = RecordFile(self.path, STEP_DTYPE, "the per-step records", header)
            self._file.reserve(len(header) + n * STEP_DTYPE.itemsize)
        # resume: the records file comes, verified, with the checkpoint (load_state_dict)

    def close(self) -> None:
        """Close the records file (the tracker can still be read through :meth:`blocks`)."""
        if self._file is not None:
            self._file.close()

    def __del__(self) -> None:
        self.close()

    def record(self, logp: torch.Tensor, y: torch.Tensor) -> None:
        """Score one chunk. ``logp``: ``(C, K)`` log-probabilities; ``y``: ``(C,)`` labels."""
        C = y.shape[0]
        if logp.shape[0] != C:
            raise ValueError(f"learner returned {logp.shape[0]} predictions for a chunk of {C}")
        if self.t + C > self.n:
            raise ValueError("more steps recorded than the stream has")
        rec = np.empty(C, dtype=STEP_DTYPE)
        self.nonfinite += score(logp, y, rec)
        rec["task"] = self._tasks[self.t : self.t + C]
        if self._mem is not None:
            self._mem[self.t : self.t + C] = rec
        else:
            assert len(self._file) == self.t, "records are appended in order"
            self._file.append_records(rec)
        self.t += C

    # ------------------------------------------------------------ reading
    def blocks(self, block: int = _BLOCK) -> Iterator[np.ndarray]:
        """The records ``[0, t)`` in order, as ``(<=block,)`` :data:`STEP_DTYPE` arrays."""
        for s in range(0, self.t, block):
            m = min(block, self.t - s)
            if self._mem is not None:
                yield self._mem[s : s + m]
            else:
                yield self._file.read([s], m)[0]

    def _column(self, name: str) -> np.ndarray:
        if self._mem is not None:
            return self._mem[name]  # (n,) view; entries past t are zeros
        return np.concatenate([b[name] for b in self.blocks()]) if self.t else np.zeros(0, STEP_DTYPE[name])

    # Whole columns, for tests and small streams (on disk they are read into memory: use
    # :meth:`blocks` on long streams).
    loss = property(lambda self: self._column("loss"), doc="``(n,)`` (memory) or ``(t,)`` (disk) losses, nats")
    p_true = property(lambda self: self._column("p_true"), doc="probability of the true label")
    pred = property(lambda self: self._column("pred"), doc="predicted labels")
    label = property(lambda self: self._column("label"), doc="true labels")
    task = property(lambda self: self._tasks, doc="``(n,)`` task of each step")

    @property
    def correct(self) -> np.ndarray:
        """``(t,)`` booleans."""
        return np.concatenate([b["pred"] == b["label"] for b in self.blocks()]) if self.t else np.zeros(0, bool)

    def summary(self) -> dict[str, float]:
        """Online metrics over the steps recorded so far (streamed: constant memory)."""
        n = self.t
        loss = correct = 0.0
        for b in self.blocks():
            loss += float(np.sum(b["loss"]))
            correct += int(np.count_nonzero(b["pred"] == b["label"]))
        return {
            "n_examples": n,
            "avg_online_accuracy": correct / n if n else float("nan"),
            "cumulative_log_loss": loss,
            "mean_log_loss": loss / n if n else float("nan"),
        }

    def accuracy_curve_at(self, steps: np.ndarray, window: int) -> np.ndarray:
        """:func:`online_accuracy_curve` evaluated only at ``steps`` (sorted, ``< t``), streamed."""
        steps = np.asarray(steps, dtype=np.int64)
        # curve[s] = (c[s+1] - c[lo]) / (s+1-lo) with c the cumsum (c[0] = 0), lo = max(0, s+1-window)
        hi = steps + 1
        lo = np.maximum(0, hi - window)
        need = np.unique(np.concatenate([hi, lo]))
        vals = np.zeros(need.size, dtype=np.float64)
        total, start = 0.0, 0
        for b in self.blocks():
            c = total + np.concatenate([[0.0], np.cumsum(b["pred"] == b["label"], dtype=np.float64)])
            sel = (need >= start) & (need <= start + b.size)
            vals[sel] = c[need[sel] - start]
            total, start = c[-1], start + b.size
        cval = dict(zip(need.tolist(), vals.tolist()))
        return np.array([(cval[h] - cval[l]) / (h - l) for h, l in zip(hi.tolist(), lo.tolist())])

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs. On disk the records stay in their file, which the state refers
        to as a :class:`~ocl.sidefile.RecordFile` (pickled: relative path, size and checksum);
        in memory they are copied."""
        state: dict[str, Any] = {"n": self.n, "t": self.t, "nonfinite": self.nonfinite}
        if self._mem is not None:
            state["records"] = self._mem[: self.t].copy()
        else:
            state["records"] = self._file
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (unpickled from a checkpoint, which verified the records
        file). Records past ``t`` in the file (written after the checkpoint by a run that then
        died) are simply overwritten as the run goes on."""
        if state["n"] != self.n:
            raise ValueError(f"checkpointed tracker has n={state['n']}, this one {self.n}")
        t = int(state["t"])
        if self._mem is not None:
            self._mem[:t] = state["records"]
        else:
            records = state["records"]
            if not isinstance(records, RecordFile) or records.path is None:
                raise ValueError("the checkpointed tracker kept its records in memory; this one is on disk")
            if os.path.realpath(records.path) != os.path.realpath(self.path):
                raise ValueError(f"the checkpoint's records are in {records.path}, not {self.path}")
            if records.dtype != STEP_DTYPE or records.size != records.offset + t * STEP_DTYPE.itemsize:
                raise ValueError(f"{self.path}: the checkpoint counts {t} records but {records.size} bytes")
            _check_npy_header(records.pread(records.offset, 0), self.n, self.path)
            self.close()
            self._file = records
        self.t, self.nonfinite = t, int(state["nonfinite"])


def _npy_header(n: int) -> bytes:
    """The ``.npy`` (format 1.0) header of an ``(n,)`` :data:`STEP_DTYPE` array."""
    d = {"descr": np.lib.format.dtype_to_descr(STEP_DTYPE), "fortran_order": False, "shape": (n,)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.getvalue()


def _check_npy_header(header: bytes, n: int, path: str) -> None:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    if shape != (n,) or dtype != STEP_DTYPE:
        raise ValueError(f"{path} holds {shape} {dtype}, expected ({n},) step records")


# ---------------------------------------------------------------- near-future accuracy

#: One near-future evaluation: after learning step ``step`` the learner scored the (unseen)
#: input of step ``target``; loss (nats), probability of the true label, predicted and true label.
NEAR_FUTURE_DTYPE = np.dtype([("step", "<i8"), ("target", "<i8"), ("loss", "<f8"), ("p_true", "<f4"),
                              ("pred", "<i8"), ("label", "<i8")])


class NearFutureTracker:
    """Near-future accuracy (Hammoud et al. 2023, "Rapid Adaptation in Online Continual
    Learning: Are We Evaluating It Right?"): the learner *as it stands after step t* is
    evaluated on the input ``x_{t+1+S}`` of an example it has not seen yet, and scored
    against that example's label::

        a_t = 1[ argmax f_t(x_{t+1+S}) == y_{t+1+S} ],   near-future accuracy = mean of a_t

    Online accuracy scores ``x_{t+1}`` (S = 0) and rewards a learner for exploiting label
    correlation between neighbouring steps (a blind predictor of the last labels scores
    high on a bursty stream); S steps further on, that correlation has decayed, so only
    what the learner knows about *inputs* still pays.

    To keep the cost small, not every step is evaluated: an evaluation follows each chunk
    ``[start, end)`` that contains a step t with ``(t + 1) % every == 0`` (with chunks of
    one example: after steps m-1, 2m-1, ...; with chunks of C: at most one per chunk, after
    the chunk's update, so t is the chunk's last step ``end - 1``). Targets past the
    stream's end are skipped.

    Args:
        offset: S >= 0, how far past the next example the evaluated input lies.
        every: m >= 1, steps between evaluations.
    """

    def __init__(self, offset: int, every: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ValueError(f"near-future offset must be an integer >= 0; got {offset!r}")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"near-future every must be an integer >= 1; got {every!r}")
        self.offset, self.every = int(offset), int(every)
        self._rec = np.zeros(64, dtype=NEAR_FUTURE_DTYPE)  # grows by doubling
        self.n = 0  # evaluations recorded
        self.nonfinite = 0

    def target(self, start: int, end: int, n: int) -> int | None:
        """The step whose input is evaluated after the chunk ``[start, end)`` of a stream of
        ``n`` steps, or ``None`` (no evaluation due, or the target lies past the end)."""
        if end // self.every == start // self.every:
            return None
        j = end + self.offset  # t + 1 + S with t = end - 1, the chunk's last step
        return j if j < n else None

    def record(self, step: int, target: int, logp: torch.Tensor, y: torch.Tensor) -> None:
        """Record one evaluation: ``logp`` ``(1, K)`` log-probabilities for the input of
        ``target``, ``y`` ``(1,)`` its label; ``step`` is the last step learned."""
        if self.n == self._rec.size:
            self._rec = np.concatenate([self._rec, np.zeros_like(self._rec)])
        rec = self._rec[self.n : self.n + 1]
        self.nonfinite += score(logp, y, rec)
        rec["step"], rec["target"] = step, target
        self.n += 1

    @property
    def records(self) -> np.ndarray:
        """``(n,)`` :data:`NEAR_FUTURE_DTYPE` records, in stream order."""
        return self._rec[: self.n]

    def summary(self) -> dict[str, Any]:
        """``near_future_accuracy`` and ``near_future_mean_log_loss`` (``nan`` without any
        evaluation), the number of evaluations, S and m."""
        r = self.records
        return {
            "near_future_accuracy": float(np.mean(r["pred"] == r["label"])) if self.n else float("nan"),
            "near_future_mean_log_loss": float(np.mean(r["loss"])) if self.n else float("nan"),
            "near_future_evaluations": self.n,
            "near_future_offset": self.offset,
            "near_future_every": self.every,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "every": self.every, "records": self.records.copy(),
                "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (same S and m)."""
        if (state["offset"], state["every"]) != (self.offset, self.every):
            raise ValueError(f"checkpointed near-future evaluation has S={state['offset']}, m={state['every']}; "
                             f"this one S={self.offset}, m={self.every}")
        rec = np.asarray(state["records"], dtype=NEAR_FUTURE_DTYPE)
        self._rec = np.zeros(max(64, rec.size), dtype=NEAR_FUTURE_DTYPE)
        self._rec[: rec.size] = rec
        self.n, self.nonfinite = int(rec.size), int(state["nonfinite"])


def near_future_summary(nf: NearFutureTracker | None) -> dict[str, Any]:
    """:meth:`NearFutureTracker.summary`, or the same keys all ``None`` when it was off."""
    if nf is None:
        return {k: None for k in ("near_future_accuracy", "near_future_mean_log_loss", "near_future_evaluations",
                                  "near_future_offset", "near_future_every")}
    return nf.summary()
