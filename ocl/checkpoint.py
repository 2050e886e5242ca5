"""Checkpoint and resume of a prequential run.

A checkpoint is one file, ``<run dir>/checkpoint.pt``, written with :func:`torch.save`:

- ``learner``: the learner object itself, pickled whole (parameters, optimizer state,
  private RNGs, KV caches, replay cursors, buffers). Pickling is the one mechanism that
  works for every learner without each one writing a ``state_dict``, Avalanche strategies
  included; storage shared between objects (a parameter and its optimizer entry) stays
  shared. Large append-only state lives in side files in the run directory (the
  transformer's replay history), which pickle as a path and a count.
- ``run``: the runner's position (steps done, current task, accuracy-matrix rows so far,
  timings), the tracker's ``state_dict`` (its records live in ``steps.npy``) and the
  near-future evaluations so far (one small record per evaluation, in the checkpoint).
- ``rng``: the global python, numpy and torch (CPU and CUDA) RNG states.
- ``config``: the resolved run config, and a digest of the stream, to refuse resuming a
  different experiment.

Writes are atomic: a temp file in the same directory, fsync, ``os.replace``, fsync of the
directory. A crash (or SIGKILL) at any moment leaves either the previous checkpoint or
the new one, never a torn file. Side files are fsynced before the checkpoint that counts
their records is renamed into place, and rows past that count are never read back.

A checkpoint can run arbitrary code when loaded (it is a pickle): load only your own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ocl.errors import OCLError
from ocl.learners.base import Learner
from ocl.runner import RunState

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # bump when the checkpoint layout changes (2: the run state holds near-future records)
#: Top-level config keys that may change between a run and its resume: they affect how the
#: run is executed or displayed, never what it computes (``data_dir``/``cache_dir`` only say
#: where files are; the data itself is pinned by the stream digest).
RESUME_FREE_KEYS = frozenset({"progress", "threads", "checkpoint_every", "resume", "cache_dir", "data_dir"})


class RunInterrupted(OCLError):
    """The run was stopped by SIGINT/SIGTERM after writing a checkpoint."""


# ---------------------------------------------------------------- files


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` via a temp file in the same directory + fsync + rename.

    If anything fails (serialisation, disk full, a crash) the previous file at ``path`` is
    untouched and the temp file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :class:`Checkpointer`; :class:`OCLError` if absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise OCLError(
            f"resume=true but {path} does not exist: there is no checkpoint to resume in {path.parent}. "
            "Point hydra.run.dir=DIR at the directory of the interrupted run, or drop resume=true "
            "to start a new run."
        )
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, unknown class: all "unreadable"
        raise OCLError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); it is corrupt or was "
            "written by an incompatible version. Start a new run in another directory."
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise OCLError(f"{path}: not an ocl checkpoint of format {FORMAT}; start a new run in another directory.")
    return ck


# ---------------------------------------------------------------- RNG, config, stream identity


def rng_state() -> dict[str, Any]:
    """The global RNG states a learner or library may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: saved -> now"`` for every config value that differs in a way that matters."""
    a = {k: v for k, v in _flatten(saved).items() if k.split(".")[0] not in RESUME_FREE_KEYS}
    b = {k: v for k, v in _flatten(now).items() if k.split(".")[0] not in RESUME_FREE_KEYS}
    missing = object()
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def stream_digest(stream: Any, feature_shape: tuple[int, ...]) -> str:
    """sha1 of what the learner will see: order, labels, tasks, K and the feature shape."""
    h = hashlib.sha1(repr((len(stream), stream.num_classes, tuple(feature_shape))).encode())
    for a in (stream.order, stream.labels, stream.tasks):
        h.update(np.ascontiguousarray(a, dtype=np.int64).data)
    return h.hexdigest()


def check_resumable(ck: dict[str, Any], config: dict[str, Any], digest: str | None, path: Path) -> None:
    """Refuse to resume ``ck`` under a different config or stream, saying what differs."""
    diff = config_differences(ck["config"], config)
    if diff:
        raise OCLError(
            f"cannot resume {path}: the config differs from the checkpointed run's:\n  " + "\n  ".join(diff)
            + "\nResume with the original settings, or start a new run in another directory."
        )
    if digest is not None and ck["stream"] != digest:
        raise OCLError(
            f"cannot resume {path}: the stream (data, order or labels) is not the one the checkpoint was "
            "trained on, although the config matches: the data files changed. Restore them, or start a "
            "new run in another directory."
        )


# ---------------------------------------------------------------- the runner hook


class Checkpointer:
    """Writes checkpoints of one run: every ``every`` examples, on demand, and on a signal.

    Pass it as ``run_stream(on_chunk=...)``: after each chunk it saves when ``every``
    examples have passed since the last save, or when SIGINT/SIGTERM arrived during
    :meth:`catch_signals` (then it raises :class:`RunInterrupted` after saving).

    Args:
        path: the checkpoint file.
        every: examples between checkpoints; ``None`` = only at the end and on a signal.
        learner: the learner being trained (pickled whole into every checkpoint).
        config: the resolved run config (plain containers).
        digest: :func:`stream_digest` of the run's stream.
        resume_hint: how to resume, for the interruption message.
    """

    def __init__(self, path: Path, every: int | None, learner: Learner, config: dict[str, Any],
                 digest: str, resume_hint: str = "") -> None:
        if every is not None and (isinstance(every, bool) or int(every) != every or every < 1):
            raise OCLError(f"checkpoint_every={every!r}: must be a positive number of examples, or null "
                           "(checkpoint only at the end and on Ctrl-C).")
        self.path, self.every, self.learner = Path(path), None if every is None else int(every), learner
        self.config, self.digest, self.resume_hint = config, digest, resume_hint
        self.last_saved = 0  # steps at the last save (or where a resumed run started)
        self.signal: int | None = None
        self.saves = 0

    def save(self, state: RunState) -> None:
        """Checkpoint ``state`` (and the learner, and the global RNGs) atomically."""
        save_atomic(self.path, {
            "format": FORMAT,
            "config": self.config,
            "stream": self.digest,
            "learner": self.learner,
            "run": state.state_dict(),
            "rng": rng_state(),
        })
        self.last_saved = state.steps
        self.saves += 1
        log.debug("checkpoint at step %d: %s", state.steps, self.path)

    def __call__(self, state: RunState) -> None:
        # Saves fall where the step count crosses a multiple of `every`, whatever the chunk size.
        if self.every is not None and state.steps // self.every > self.last_saved // self.every:
            self.save(state)
        if self.signal is not None:
            if self.last_saved != state.steps:
                self.save(state)
            name = signal.Signals(self.signal).name
            raise RunInterrupted(
                f"{name} received: stopped after {state.steps} of {state.tracker.n} examples and saved "
                f"the checkpoint {self.path}. Continue with: {self.resume_hint or 'resume=true'}"
            )

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """While active, SIGINT (Ctrl-C) and SIGTERM stop the run cleanly at the end of the
        current chunk (checkpoint, then :class:`RunInterrupted`); a second Ctrl-C aborts at once.

        Only the main thread can install handlers; elsewhere this is a no-op.
        """
        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # asked twice: stop now, the last checkpoint stays valid
            self.signal = signum
            log.warning("%s: finishing the current chunk, then checkpointing (Ctrl-C again to abort now)",
                        signal.Signals(signum).name)

        try:
            old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
