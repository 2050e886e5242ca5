"""Checkpoint and resume of a prequential run.

A checkpoint is one file, ``<run dir>/checkpoint.pt``: a one-line header
(``OCL-CHECKPOINT`` and a JSON object with the payload's size and sha256), then the
payload, a :func:`torch.save` of a dict:

- ``learner``: the learner object itself, pickled whole (parameters, optimizer state,
  private RNGs, KV caches, replay cursors, buffers). Pickling is the one mechanism that
  works for every learner without each one writing a ``state_dict``, Avalanche strategies
  included; storage shared between objects (a parameter and its optimizer entry) stays
  shared. Large append-only state lives in side files in the run directory (the
  transformer's replay history), which pickle as a :class:`~ocl.sidefile.SideFile`: a path
  relative to the run directory, a size and the sha256 of the bytes ``[0, size)``.
- ``run``: the runner's position (steps done, current task, accuracy-matrix rows so far,
  timings), the tracker's ``state_dict`` (its records live in ``steps.npy``, a side file) and
  the near-future evaluations so far (one small record per evaluation, in the checkpoint).
- ``rng``: the global python, numpy and torch (CPU and CUDA) RNG states.
- ``config``: the resolved run config, and a digest of the stream, to refuse resuming a
  different experiment.

Writes are atomic: a temp file in the same directory, fsync, ``os.replace``, fsync of the
directory. A crash (or SIGKILL) at any moment leaves either the previous checkpoint or
the new one, never a torn file. Side files are fsynced before the checkpoint that counts
their records is renamed into place, and rows past that count are never read back.

Loading verifies everything: the payload against its sha256, then (while unpickling)
every side file against its recorded range, resolved inside the checkpoint's directory
(a copied run directory resumes into its own files). A mismatch, from a flipped byte in
the checkpoint to an edited row of ``steps.npy``, is refused with a message naming the
file. Only the latest checkpoint is kept: a damaged one is not replaced by an older one
(the side files have moved on since); the run must then start afresh.

A checkpoint can run arbitrary code when loaded (it is a pickle): load only your own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import random
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ocl import sidefile
from ocl.errors import OCLError
from ocl.signals import handling
from ocl.learners.base import Learner
from ocl.files import write_atomic
from ocl.runner import RunState

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = 10  # bump when the checkpoint layout changes (2: near-future records; 3: checksummed header, relative
#            side files; 4: learner classes moved, e.g. ocl.learners.transformer became a package: a checkpoint
#            pickles the learner by its classes' module paths, so older ones are refused, not half-loaded;
#            5: the transformer's read-out experts and Temperature moved to ocl.learners.transformer.readouts;
#            6: SLDALearner gained precision_dtype, which an older pickled one lacks;
#            7: SLDALearner gained is_frozen; the transformer's held-out pool keeps frozen copies of every
#            expert (heldout_scores=lagged) and the learner an RNG for past examples (past, mixed);
#            8: the held-out pool scores past examples in batches and keeps the scored ones until used;
#            9: the read-outs and pools left the transformer for the pooled learner (ocl.learners.pooled),
#            History moved to ocl.learners.memory;
#            10: the transformer gained segments and the copy read-out (its cache keeps labels); see LAST_CHANGE)
#: What the newest format changed, for the message that refuses an older checkpoint.
LAST_CHANGE = ("the transformer gained Transformer-XL segments (learner.segment) and a copy read-out "
               "(learner.copy, on by default), and its cache keeps each example's label")
MAGIC = b"OCL-CHECKPOINT "
#: Top-level config keys that may change between a run and its resume: they affect how the
#: run is executed or displayed, never what it computes (``data_dir``/``cache_dir`` only say
#: where files are; the data itself is pinned by the stream digest).
RESUME_FREE_KEYS = frozenset({"progress", "threads", "checkpoint_every", "resume", "cache_dir", "data_dir"})


class RunInterrupted(OCLError):
    """The run was stopped by SIGINT/SIGTERM after writing a checkpoint."""


# ---------------------------------------------------------------- files


def dumps(obj: Any, run_dir: str | Path) -> bytes:
    """The bytes of a checkpoint of ``obj`` whose side files lie in ``run_dir``: header line + payload."""
    buf = io.BytesIO()
    with sidefile.relative_to(run_dir):
        torch.save(obj, buf)
    payload = buf.getvalue()
    header = {"format": FORMAT, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header).encode() + b"\n" + payload


def save_atomic(path: Path, obj: Any) -> None:
    """Write the checkpoint ``obj`` to ``path`` via a temp file in the same directory + fsync + rename.

    The payload is serialised in memory first, so its size is known (a full disk is reported
    with the bytes needed) and the file is written in one go. If anything fails (serialisation,
    disk full, a crash) the previous file at ``path`` is untouched and the temp file is removed.
    """
    path = Path(path)
    write_atomic(path, dumps(obj, path.parent), what="writing the checkpoint")


def load(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint written by :class:`Checkpointer` (see the module docstring).

    Raises:
        OCLError: absent, unreadable, not a checkpoint of this format, or its bytes or a side
            file's do not match what was recorded when it was written.
    """
    path = Path(path)
    if not path.is_file():
        raise OCLError(
            f"resume=true but {path} does not exist: there is no checkpoint to resume in {path.parent}. "
            "Point hydra.run.dir=DIR at the directory of the interrupted run, or drop resume=true "
            "to start a new run."
        )
    fresh = "Start a new run in another directory."
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OCLError(f"{path}: cannot read the checkpoint ({e.strerror or e}).") from e
    head, sep, payload = raw.partition(b"\n")
    try:
        if not head.startswith(MAGIC) or not sep:
            raise ValueError
        header = json.loads(head[len(MAGIC):])
        size, sha = int(header["bytes"]), str(header["sha256"])
        written = header.get("format")
        if written != FORMAT:
            if isinstance(written, int) and written < FORMAT:
                raise OCLError(f"{path}: the checkpoint was written by an older version of ocl (checkpoint format "
                               f"{written}; this version reads format {FORMAT}: learner classes have moved since; last: "
                               f"{LAST_CHANGE}). "
                               f"{fresh}")
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise OCLError(f"{path}: cannot read the checkpoint: it is not an ocl checkpoint of format {FORMAT} "
                       f"(written by an older version, or not a checkpoint at all). {fresh}") from None
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != sha:
        what = (f"it holds {len(payload):,} bytes where {size:,} were written" if len(payload) != size else
                "its sha256 differs from the one recorded when it was written")
        raise OCLError(
            f"cannot resume {path}: the checkpoint is corrupt ({what}: damaged on disk or edited). Only the "
            f"latest checkpoint is kept, so the run cannot continue. {fresh}"
        )
    try:
        with sidefile.relative_to(path.parent):
            ck = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except OCLError as e:  # a side file is missing or does not match
        raise OCLError(f"cannot resume {path}: {e}") from None
    except Exception as e:  # bad pickle, unknown class: unreadable
        raise OCLError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}); it was written by an "
            f"incompatible version of ocl or of a learner's code. {fresh}"
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise OCLError(f"{path}: not an ocl checkpoint of format {FORMAT}; {fresh[0].lower()}{fresh[1:]}")
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


def config_differences(saved: dict[str, Any], now: dict[str, Any],
                       free: frozenset[str] = RESUME_FREE_KEYS) -> list[str]:
    """``"key: saved -> now"`` for every config value that differs in a way that matters
    (the keys in ``free``, and everything under them, may differ: ``threads``, ``backbone.threads``)."""

    def kept(key: str) -> bool:
        parts = key.split(".")
        return not any(".".join(parts[:i]) in free for i in range(1, len(parts) + 1))

    a = {k: v for k, v in _flatten(saved).items() if kept(k)}
    b = {k: v for k, v in _flatten(now).items() if kept(k)}
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
        resumed_at: the step of the checkpoint a resumed run started from (``None``: a new run,
            no checkpoint yet).
    """

    def __init__(self, path: Path, every: int | None, learner: Learner, config: dict[str, Any],
                 digest: str, resume_hint: str = "", resumed_at: int | None = None) -> None:
        if every is not None and (isinstance(every, bool) or int(every) != every or every < 1):
            raise OCLError(f"checkpoint_every={every!r}: must be a positive number of examples, or null "
                           "(checkpoint only at the end and on Ctrl-C).")
        self.path, self.every, self.learner = Path(path), None if every is None else int(every), learner
        self.config, self.digest, self.resume_hint = config, digest, resume_hint
        self.last_saved = resumed_at or 0  # steps at the last save (or where a resumed run started)
        self.has_checkpoint = resumed_at is not None
        self.total: int | None = None  # stream length, known at the first save
        self.signal: int | None = None
        self.saves = 0

    def recovery(self) -> str:
        """What a run that failed now (disk full, ...) leaves to continue from, for its message."""
        if not self.has_checkpoint:
            return "No checkpoint had been written yet: fix the cause, then start the run again."
        at = (f"example {self.last_saved:,}" + (f" of {self.total:,}" if self.total else "")
              if self.last_saved != self.total else "the end of the stream")
        return (f"The last checkpoint, {self.path} (at {at}), is intact: fix the cause (e.g. free space), "
                f"then continue with: {self.resume_hint or 'resume=true'}")

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
        self.last_saved, self.total = state.steps, state.tracker.n
        self.has_checkpoint = True
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

        with handling(handler, signal.SIGINT, signal.SIGTERM):
            yield
